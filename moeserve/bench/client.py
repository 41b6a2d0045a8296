"""One streaming request to an OpenAI-compatible server, timed chunk by chunk.

Times are `time.perf_counter()` seconds. `ttft` runs from just before the request is sent to the first chunk
that carries text; `itl` holds the gaps between successive text chunks; `latency` runs to the end of the
stream. The output token count is the server's usage.completion_tokens when it sends usage, else the number of
text chunks (one token a chunk for moeserve and vLLM).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from moeserve.bench.datasets import BenchRequest


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    start: float = 0.0              # perf_counter at send
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    usage_given: bool = False
    text: str = ""


def build_body(req: BenchRequest, *, endpoint: str, model: str, temperature: float, ignore_eos: bool) -> dict:
    body: dict = {"model": model, "max_tokens": req.output_len, "temperature": temperature, "stream": True,
                  "stream_options": {"include_usage": True}}
    if endpoint == "chat":
        body["messages"] = req.messages or [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt if req.prompt is not None else \
            "\n".join(str(m.get("content", "")) for m in req.messages or [])
    if ignore_eos:
        body["ignore_eos"] = True
    return body


def _chunk_text(chunk: dict) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if "delta" in c:  # chat: answer text, or a reasoning model's thinking (both are generated tokens)
        d = c["delta"] or {}
        return (d.get("content") or "") + (d.get("reasoning_content") or d.get("reasoning") or "")
    return c.get("text") or ""


async def send_request(client: httpx.AsyncClient, url: str, body: dict, headers: dict,
                       fallback_prompt_len: int) -> RequestResult:
    r = RequestResult(prompt_tokens=fallback_prompt_len)
    r.start = last = time.perf_counter()
    chunks = 0
    parts: list[str] = []
    try:
        async with client.stream("POST", url, json=body, headers=headers) as resp:
            if resp.status_code != 200:
                r.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
                return r
            async for line in resp.aiter_lines():
                r.latency = time.perf_counter() - r.start   # the stream ends at its last line ([DONE])
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    r.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return r
                now = time.perf_counter()
                if text := _chunk_text(chunk):
                    if chunks == 0:
                        r.ttft = now - r.start
                    else:
                        r.itl.append(now - last)
                    last = now
                    chunks += 1
                    parts.append(text)
                if usage := chunk.get("usage"):
                    r.usage_given = True
                    r.output_tokens = int(usage.get("completion_tokens") or 0)
                    r.prompt_tokens = int(usage.get("prompt_tokens") or r.prompt_tokens)
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        r.error = f"{type(e).__name__}: {e}"
        return r
    if not r.usage_given:
        r.output_tokens = chunks
    r.text = "".join(parts)
    r.success = chunks > 0
    if not r.success:
        r.error = "no text in the stream"
    return r
