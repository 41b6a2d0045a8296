"""What both endpoints share: model-name check, SamplingParams from a request, tokenization and length checks,
handing requests to the engine (with their errors mapped to HTTP), and logprob formatting."""

from __future__ import annotations

import asyncio
import copy
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

from moeserve.engine.async_engine import AsyncLLMEngine, EngineDead, QueueFull, RequestStream
from moeserve.outputs import Logprob, RequestOutput
from moeserve.sampling_params import InvalidSamplingParam, SamplingParams
from moeserve.server.structured import structured_outputs_of
from moeserve.server.errors import APIError, bad_request


@dataclass
class ServerSettings:
    model_names: list[str]  # the first is the name responses carry when the request names none
    max_model_len: int
    chat_template: str | None = None  # overrides the tokenizer's own
    max_logprobs: int = 20
    api_key: str | None = None
    max_request_body_bytes: int = 16 * 1024 * 1024
    retry_after_s: int = 1
    vocab_size: int | None = None  # token ids (prompt, stop_token_ids) must lie in [0, vocab_size)
    # Caps on lists whose length costs every request in the batch (each stop string is searched for after
    # every step), or fills the waiting queue from one request (each prompt of a batch is its own request).
    max_stop_strings: int = 64
    max_stop_token_ids: int = 256
    max_prompts_per_request: int = 256
    # agents: vLLM's --enable-auto-tool-choice, --tool-call-parser, --reasoning-parser
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None


class OpenAIServing:
    def __init__(self, engine: AsyncLLMEngine, tokenizer, settings: ServerSettings):
        self.engine = engine
        # Our own copy: the engine thread decodes with its tokenizer while we encode on the event loop.
        self.tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else None
        self.settings = settings
        self._token_text: dict[int, str] = {}

    # -- checks --
    def model_name(self, requested: str | None) -> str:
        names = self.settings.model_names
        if requested is None:
            return names[0]
        if requested not in names:
            raise APIError(404, f"The model `{requested}` does not exist. This server serves: {', '.join(names)}.",
                           param="model", code="model_not_found")
        return requested

    def sampling_params(self, req, *, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        settings = self.settings
        if req.logit_bias:
            raise bad_request("logit_bias is not supported by moeserve.", param="logit_bias")
        if logprobs is not None and logprobs > settings.max_logprobs:
            raise bad_request(f"At most {settings.max_logprobs} logprobs per token are served "
                              f"(--max-logprobs); got {logprobs}.", param="logprobs")
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(stop) > settings.max_stop_strings:
            raise bad_request(f"At most {settings.max_stop_strings} stop strings are served (--max-stop-strings); "
                              f"got {len(stop)}.", param="stop")
        stop_ids = req.stop_token_ids or []
        if len(stop_ids) > settings.max_stop_token_ids:
            raise bad_request(f"At most {settings.max_stop_token_ids} stop_token_ids are served "
                              f"(--max-stop-token-ids); got {len(stop_ids)}.", param="stop_token_ids")
        self.check_token_ids(stop_ids, "stop_token_ids")
        if req.min_tokens > settings.max_model_len:
            raise bad_request(f"min_tokens ({req.min_tokens}) is more than the model's maximum context length "
                              f"({settings.max_model_len}).", param="min_tokens")
        kwargs = dict(
            n=req.n, presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty,
            seed=req.seed, stop=stop, stop_token_ids=stop_ids, max_tokens=max_tokens,
            min_tokens=req.min_tokens, logprobs=logprobs, ignore_eos=req.ignore_eos,
            skip_special_tokens=req.skip_special_tokens, include_stop_str_in_output=req.include_stop_str_in_output,
            structured_outputs=structured_outputs_of(req),
        )
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            value = getattr(req, name)
            if value is not None:
                kwargs[name] = value
        try:
            return SamplingParams(**kwargs)
        except InvalidSamplingParam as e:
            raise bad_request(str(e), param=e.param) from None
        except (ValueError, TypeError) as e:
            raise bad_request(str(e)) from None

    def check_token_ids(self, ids: list[int], param: str) -> None:
        vocab = self.settings.vocab_size
        high = vocab if vocab is not None else 2**31
        for t in ids:
            if not 0 <= t < high:
                raise bad_request(f"{param}: token id {t} is outside the vocabulary [0, {high}).", param=param)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise bad_request("This model has no tokenizer: send the prompt as token ids.", param="prompt")
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def check_length(self, prompt_ids: list[int], max_tokens: int | None, param: str) -> None:
        limit, n = self.settings.max_model_len, len(prompt_ids)
        if n == 0:
            raise bad_request("The prompt is empty.", param=param)
        if n >= limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens, but the prompt has {n} "
                              f"tokens (the prompt plus at least one generated token must fit).",
                              param=param, code="context_length_exceeded")
        if max_tokens is not None and n + max_tokens > limit:
            raise bad_request(f"This model's maximum context length is {limit} tokens, but {n + max_tokens} were "
                              f"asked for ({n} in the prompt, {max_tokens} to generate). Lower max_tokens.",
                              param="max_tokens", code="context_length_exceeded")

    # -- the engine --
    async def start(self, request_id: str, prompt_ids: list[int], params: SamplingParams,
                    arrival_time: float) -> RequestStream:
        try:
            return await self.engine.add_request(request_id, prompt_ids, params, arrival_time)
        except QueueFull as e:
            raise APIError(503, str(e), code="queue_full",
                           headers={"Retry-After": str(self.settings.retry_after_s)}) from None
        except EngineDead as e:
            raise APIError(503, str(e), code="engine_dead") from None
        except ValueError as e:  # RequestRejected (e.g. code kv_cache_exceeded) and the engine's other checks
            raise bad_request(str(e), param=getattr(e, "param", None), code=getattr(e, "code", None)) from None

    async def start_all(self, base_id: str, prompts: list[list[int]], params: SamplingParams,
                        arrival_time: float) -> list[RequestStream]:
        streams: list[RequestStream] = []
        try:
            for i, ids in enumerate(prompts):
                rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
                streams.append(await self.start(rid, ids, params, arrival_time))
        except BaseException:
            for s in streams:
                s.close()
            raise
        return streams

    # -- logprobs --
    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id]) if self.tokenizer is not None else f"<{token_id}>"
            if len(self._token_text) < 1_000_000:
                self._token_text[token_id] = text
        return text

    def top(self, entry: dict[int, Logprob], n: int) -> list[tuple[int, float]]:
        ranked = sorted((lp.rank, tid, _finite(lp.logprob)) for tid, lp in entry.items() if lp.rank <= n)
        return [(tid, lp) for _, tid, lp in ranked[:n]]

    def chat_logprobs(self, token_ids: list[int], entries: list[dict[int, Logprob]], top_n: int) -> list[dict]:
        content = []
        for tid, entry in zip(token_ids, entries):
            text = self.token_text(tid)
            content.append({
                "token": text, "logprob": _lp(entry, tid), "bytes": list(text.encode()),
                "top_logprobs": [{"token": (t := self.token_text(i)), "logprob": lp, "bytes": list(t.encode())}
                                 for i, lp in self.top(entry, top_n)],
            })
        return content

    def completion_logprobs(self, token_ids: list[int], entries: list[dict[int, Logprob]], top_n: int,
                            offset: int) -> dict:
        tokens, token_lps, tops, offsets = [], [], [], []
        for tid, entry in zip(token_ids, entries):
            text = self.token_text(tid)
            tokens.append(text)
            token_lps.append(_lp(entry, tid))
            top: dict[str, float] = {}
            for i, lp in self.top(entry, top_n):  # two tokens may print alike: keep the likelier
                top.setdefault(self.token_text(i), lp)
            tops.append(top)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def _lp(entry: dict[int, Logprob], token_id: int) -> float:
    lp = entry.get(token_id)
    return _finite(lp.logprob) if lp is not None else LOGPROB_FLOOR


LOGPROB_FLOOR = -9999.0  # JSON has no -Infinity: an impossible token gets this instead


def _finite(x: float) -> float:
    return x if math.isfinite(x) else LOGPROB_FLOOR


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several requests as they come, tagged with the request's position; closing aborts them all."""
    if len(streams) == 1:
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            streams[0].close()
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as e:
            queue.put_nowait((i, e))
        finally:
            queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.close()


async def final_outputs(streams: list[RequestStream]) -> list[RequestOutput]:
    last: list[RequestOutput | None] = [None] * len(streams)
    async for i, out in merged(streams):
        last[i] = out
    return last  # type: ignore[return-value]


def engine_failure(e: Exception) -> APIError:
    return APIError(500, f"The request failed in the engine: {e}", code="engine_error")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
