"""The step's token budget (max_num_batched_tokens) when the user gives none: measured once per GPU and model shape.

Why measure: a mixed step carries prefill chunks and the running decodes together, so every token of budget past
the point where prefill throughput stops growing (the knee: GEMMs and expert matmuls already saturate the GPU)
only lengthens the step, and every decode riding in it waits that much longer for its next token. Where the knee
lies depends on the GPU and the model, so a fixed 8192 is too much for some and too little for others.

How: one eager prefill forward per candidate budget (powers of two, CANDIDATES, never below max_num_seqs), timed;
the choice is the smallest candidate whose prefill tokens/s is within a tolerance of the best measured, among
those that leave the KV cache at least KV_KEEP of what the smallest leaves (`memory_cap`). The tolerance follows the
engine's usage (config.usage), as vLLM's defaults do: a server takes the knee (KNEE_TOLERANCE: the decodes riding
in a mixed step wait for all of it), an offline batch job the best within measurement noise (THROUGHPUT_TOLERANCE:
fewer, larger steps; on an H100 qwen3-30b-a3b measured 62.7k tokens/s at 8192 and 66.9k at 16384). The choice and its
measurements are kept in the kernels' autotune cache (one JSON file per GPU), under a key of the model's shape
and the settings that move the answer, so a restart on the same GPU takes the same budget without measuring.
Only CUDA, one rank, and only without --max-num-batched-tokens; otherwise the fixed default holds.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping

DEFAULT_BATCHED_TOKENS = 8192  # the budget where nothing is measured (CPU, several ranks, MOESERVE_AUTOTUNE=0)
CANDIDATES = (2048, 16384)  # powers of two from..to, both included
KNEE_TOLERANCE = 0.10  # a server: within 10% of the best tokens/s counts as the best
THROUGHPUT_TOLERANCE = 0.03  # offline: within the timing's noise of the best
KV_KEEP = 0.9  # a larger budget's activations may cost the KV cache at most 10% of what the smallest leaves
MEASURE_SEQ_LEN = 2048  # prompts of this length (or max_model_len), so attention costs the same per token at every T
CACHE_KIND = "engine.max_num_batched_tokens"


def wanted(config, device_type: str) -> bool:
    """Whether this engine measures its budget: the user gave none, prefill is chunked (without chunking the budget
    must hold a whole prompt), CUDA, one rank (every rank would have to agree on one value), tuning not switched
    off (MOESERVE_AUTOTUNE=0, as for the kernels)."""
    return (config.max_num_batched_tokens is None and config.enable_chunked_prefill and device_type == "cuda"
            and config.world_size == 1 and os.environ.get("MOESERVE_AUTOTUNE", "1") != "0")


def candidates(max_num_seqs: int, max_model_len: int) -> list[int]:
    """The budgets worth measuring: powers of two in CANDIDATES, never below max_num_seqs (a full decode batch
    must fit in one step) and never above the largest step the scheduler can make (max_num_seqs x max_model_len).
    Fewer than two: nothing to choose between (the engine keeps the default)."""
    lo, hi = CANDIDATES
    largest = max_num_seqs * max_model_len
    out, t = [], 1
    while t <= hi:
        if t >= lo and max_num_seqs <= t <= largest:
            out.append(t)
        t *= 2
    return out


def memory_cap(kv_bytes_left: Mapping[int, int], need_bytes: int) -> int:
    """The largest measured budget whose activations leave at least need_bytes for the KV cache (0 if none does).
    A budget that ran out of memory is simply absent from kv_bytes_left."""
    return max((t for t, left in kv_bytes_left.items() if left >= need_bytes), default=0)


def choose(tokens_per_s: Mapping[int, float], floor: int, cap: int | None = None,
           tolerance: float = KNEE_TOLERANCE) -> int:
    """measurements -> budget: the smallest budget in [floor, cap] whose tokens/s is within `tolerance` of the best
    there (the knee). The best is the maximum, not the largest budget's, so a noisy or non-monotonic curve still
    picks a budget that is nearly as fast as any. Nothing usable (no measurement, or cap below floor): floor,
    the least budget that still schedules a full decode batch (max_num_seqs)."""
    usable = {t: v for t, v in tokens_per_s.items()
              if t >= floor and (cap is None or t <= cap) and math.isfinite(v) and v > 0}
    if not usable:
        return floor
    best = max(usable.values())
    return min(t for t, v in usable.items() if v >= (1.0 - tolerance) * best)


def tolerance(usage: str) -> float:
    return THROUGHPUT_TOLERANCE if usage == "offline" else KNEE_TOLERANCE


def choice(entry: Mapping, floor: int, usage: str) -> int:
    """The budget a cached entry's measurements give this engine's usage (the cache keeps measurements, so a server
    and a batch job on the same GPU and model share them)."""
    tps = {int(t): float(v) for t, v in entry.get("tokens_per_s", [])}
    if not tps:
        return int(entry["config"]["max_num_batched_tokens"])
    return choose(tps, floor=floor, cap=entry.get("cap"), tolerance=tolerance(usage))


def cache_key(hf_config, config, dtype_name: str, max_model_len: int) -> str:
    """The autotune-cache key: the model's shape (all of config.json but names and versions, hashed, with a few
    fields spelled out to be readable) and the engine settings that change the measurement or the memory cap.
    hf_config: a dict, or models/hf_config.HFConfig."""
    cfg = hf_config.to_dict() if hasattr(hf_config, "to_dict") else dict(hf_config)
    shape = {k: v for k, v in cfg.items()
             if not str(k).startswith("_") and k not in ("transformers_version", "name_or_path")}
    digest = hashlib.sha1(json.dumps(shape, sort_keys=True, default=str).encode()).hexdigest()[:12]
    kv_bytes = config.kv_cache_memory_bytes or 0
    blocks = config.num_gpu_blocks_override or 0
    return (f"{CACHE_KIND}|{cfg.get('model_type', '?')}|H={cfg.get('hidden_size', '?')}"
            f"|L={cfg.get('num_hidden_layers', '?')}|{dtype_name}|q={config.quantization or 'none'}"
            f"|kv={config.kv_cache_dtype}|seqs={config.max_num_seqs}|len={max_model_len}"
            f"|util={config.gpu_memory_utilization}|kvbytes={kv_bytes}|blocks={blocks}|bs={config.block_size}"
            f"|cfg={digest}")


def _tuner():
    from moeserve.kernels.autotune import get_tuner

    return get_tuner()


def cached(key: str, cands: list[int]) -> dict | None:
    """The stored entry for key if it was measured over exactly today's candidates (else it is measured again)."""
    entry = _tuner().stored(key)  # the kernels' autotune file: same file, same merge-on-write, no second cache
    if not entry or entry.get("candidates") != list(cands):
        return None
    chosen = entry.get("config", {}).get("max_num_batched_tokens")
    return entry if isinstance(chosen, int) and chosen >= 1 else None


def save(key: str, entry: dict) -> str:
    return str(_tuner().store(key, entry))


def cache_path(key: str) -> str:
    """The file the entry under key was read from: the user's cache, or the package's shipped choices."""
    return str(_tuner().stored_in(key))


def describe(entry: Mapping, chosen: int, usage: str = "server") -> str:
    """One line's worth: the chosen budget, the tokens/s per candidate, the memory cap, the rule."""
    tps = ", ".join(f"{t}={v:,.0f}" for t, v in entry.get("tokens_per_s", []))
    return (f"max_num_batched_tokens={chosen} "
            f"(prefill tokens/s: {tps or 'none measured'}; memory cap {entry.get('cap')}; {usage}: "
            f"the smallest within {tolerance(usage):.0%} of the best, not below max_num_seqs)")
