"""The prompts a benchmark sends: random lengths (uniform or lognormal), shared-prefix, or a user's JSONL.

The load generator has no tokenizer (it imports no engine code and works against any server), so lengths are
counted in words drawn from a list of common English words, each about one token for the usual BPE
vocabularies. The server's `usage` (asked for with stream_options.include_usage) gives the exact token counts
that the report uses.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

WORDS = ("the of and to in is you that it he was for on are as with his they at be this have from or one had "
         "by word but not what all were we when your can said there use an each which she do how their if will "
         "up other about out many then them these so some her would make like him into time has look two more "
         "write go see number no way could people my than first water been call who oil its now find long down "
         "day did get come made may part").split()


@dataclass
class BenchRequest:
    prompt: str | None = None             # completions, or a chat turn made of it
    messages: list[dict] | None = None    # a conversation (chat endpoint)
    output_len: int = 128                 # max_tokens sent
    prompt_len: int = 0                   # words, until the server's usage says tokens
    meta: dict = field(default_factory=dict)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(n, 1)))


def _lengths(rng: random.Random, mean: int, dist: str, range_ratio: float, sigma: float) -> int:
    if dist == "lognormal":   # median `mean`, spread sigma (natural log)
        return max(1, round(rng.lognormvariate(0.0, sigma) * mean))
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--range-ratio must lie in [0, 1), got {range_ratio}")
    lo, hi = round(mean * (1 - range_ratio)), round(mean * (1 + range_ratio))
    return max(1, rng.randint(lo, hi))


def random_requests(n: int, input_len: int, output_len: int, *, range_ratio: float = 0.0,
                    dist: str = "uniform", sigma: float = 0.5, seed: int = 0) -> list[BenchRequest]:
    """Prompts of `input_len` words and outputs of `output_len` tokens: fixed (range_ratio 0), uniform in
    [len*(1-r), len*(1+r)] (vLLM's --random-range-ratio), or lognormal with median len."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        il = _lengths(rng, input_len, dist, range_ratio, sigma)
        ol = _lengths(rng, output_len, dist, range_ratio, sigma)
        out.append(BenchRequest(prompt=_words(rng, il), output_len=ol, prompt_len=il))
    return out


def shared_prefix_requests(n: int, prefix_len: int, input_len: int, output_len: int, *, num_prefixes: int = 1,
                           seed: int = 0) -> list[BenchRequest]:
    """`num_prefixes` groups; every prompt is its group's common prefix then `input_len` words of its own
    (what a system prompt or a few-shot preamble looks like to a prefix cache)."""
    rng = random.Random(seed)
    prefixes = [_words(rng, prefix_len) for _ in range(max(num_prefixes, 1))]
    return [BenchRequest(prompt=prefixes[i % len(prefixes)] + " " + _words(rng, input_len), output_len=output_len,
                         prompt_len=prefix_len + input_len, meta={"prefix": i % len(prefixes)})
            for i in range(n)]


def jsonl_requests(path: str, n: int | None, output_len: int, *, seed: int = 0,
                   shuffle: bool = False) -> list[BenchRequest]:
    """One JSON object a line: {"prompt": "..."} or {"messages": [{"role", "content"}, ...]}, optionally with
    "max_tokens" (or "output_len"); lines are cycled when n exceeds them."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON: {e}") from None
            if not isinstance(obj, dict) or not ("prompt" in obj or "messages" in obj):
                raise ValueError(f"{path}:{lineno}: expected an object with 'prompt' or 'messages'")
            ol = int(obj.get("max_tokens", obj.get("output_len", output_len)))
            text = obj.get("prompt") or " ".join(str(m.get("content", "")) for m in obj["messages"])
            rows.append(BenchRequest(prompt=obj.get("prompt"), messages=obj.get("messages"), output_len=ol,
                                     prompt_len=len(text.split())))
    if not rows:
        raise ValueError(f"{path}: no prompts")
    if shuffle:
        random.Random(seed).shuffle(rows)
    n = len(rows) if n is None else n
    return [rows[i % len(rows)] for i in range(n)]
