"""Where a decode step's time goes, on the GPU: TPOT at two depths (per-layer slope + fixed cost), the GPU's
busy time per step against the wall time (host overhead), and the kernels of one layer from a profile.

    python3 benchmarks/kernels/profile_decode.py --shape Qwen/Qwen3-30B-A3B --layers 4,8 --batches 1,32

The model is the shape's config.json with fewer layers and random weights: per-layer kernels are the real
ones, and the TPOT line a + b*L extrapolates to the full depth.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np


def build(shape: str, layers: int, eager: bool, max_model_len: int, **llm_kwargs):
    """The shape's config.json cut to `layers` layers, dummy bf16 weights (llm_kwargs: more LLM(...) arguments)."""
    from moeserve import LLM
    from moeserve.plan.catalog import resolve_catalog

    cfg = json.loads(Path(resolve_catalog(shape)).read_text())
    full = cfg["num_hidden_layers"]
    cfg["num_hidden_layers"] = layers
    d = Path(tempfile.mkdtemp()) / f"{shape.split('/')[-1]}-L{layers}"
    d.mkdir(parents=True)
    (d / "config.json").write_text(json.dumps(cfg))
    llm = LLM(model=str(d / "config.json"), load_format="dummy", dtype="bfloat16", max_model_len=max_model_len,
              enforce_eager=eager, **{"gpu_memory_utilization": 0.5, **llm_kwargs})
    return llm, full


def spread_routing(llm) -> int:
    """Zero every router's e_score_correction_bias (DeepSeek-V3/R1, GLM-4.x) in place. On dummy weights that bias
    (+-1e-3) outweighs the ~1e-5 logits and sends every token to the same top-k experts, so a batch reads k
    experts per layer; zeroed, as transformers initialises it, the choice follows the logits and a batch spreads
    over the experts as a trained router's does. Returns how many biases were zeroed."""
    import torch

    n = 0
    with torch.no_grad():
        for name, p in llm.llm_engine.model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                p.zero_()
                n += 1
    return n


def prompts(llm, b: int, n: int, seed: int = 0):
    vocab = llm.llm_engine.hf_config.vocab_size
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(0, vocab, n).tolist()} for _ in range(b)]


def tpot_ms(llm, b: int, out: int) -> float:
    from moeserve import SamplingParams

    p = SamplingParams(temperature=0, max_tokens=out, ignore_eos=True)
    llm.generate(prompts(llm, b, 128, 1), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    res = llm.generate(prompts(llm, b, 128), p)
    vals = [(o.metrics.last_token_time - o.metrics.first_token_time) / (out - 1) for o in res]
    return 1e3 * float(np.median(vals))


def profile(llm, b: int, steps: int, top: int, mixed: bool = False) -> None:
    """Decode steps of b requests; or (mixed) the throughput workload's steady state: b running requests of
    1024-token prompts with more waiting, so that most steps carry decodes plus a prefill chunk."""
    import torch
    from torch.profiler import ProfilerActivity, profile as tprofile

    from moeserve import SamplingParams

    eng = llm.llm_engine
    if mixed:
        eng.scheduler.max_num_seqs = b  # the concurrency the full model's KV cache allows (~100 for qwen3-30b-a3b)
        for i, pr in enumerate(prompts(llm, 4 * b, 1024)):
            eng.add_request(f"m{b}-{i}", pr["prompt_token_ids"], SamplingParams(temperature=0, max_tokens=256,
                                                                                ignore_eos=True))
        for _ in range(300):  # past the first wave's prefill, into the staggered steady state
            eng.step()
    else:
        for i, pr in enumerate(prompts(llm, b, 128)):
            eng.add_request(f"p{b}-{i}", pr["prompt_token_ids"], SamplingParams(temperature=0, max_tokens=steps + 8,
                                                                                ignore_eos=True))
        eng.step()  # prefill
        eng.step()
    torch.cuda.synchronize()
    with tprofile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            eng.step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / steps
    ev = prof.key_averages()
    eng.abort_request(list(eng.parents))  # the rest is not profiled
    gpu_us = sum(e.self_device_time_total for e in ev) / steps
    print(f"  {'mixed, ' if mixed else ''}batch {b}: wall {wall * 1e3:.2f} ms/step, GPU busy {gpu_us / 1e3:.2f} ms/step "
          f"({100 * gpu_us / 1e3 / (wall * 1e3):.0f}%)")
    rows = sorted((e for e in ev if e.self_device_time_total > 0), key=lambda e: -e.self_device_time_total)
    print(f"  {'kernel':70s} {'calls/step':>10s} {'us/call':>9s} {'us/step':>9s}")
    for e in rows[:top]:
        print(f"  {e.key[:70]:70s} {e.count / steps:10.1f} {e.self_device_time_total / max(1, e.count):9.1f} "
              f"{e.self_device_time_total / steps:9.1f}")
    cpu = sorted(ev, key=lambda e: -e.self_cpu_time_total)[:12]
    print(f"  host (self CPU, us/step): " + ", ".join(f"{e.key[:40]}={e.self_cpu_time_total / steps:.0f}" for e in cpu))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="Qwen/Qwen3-30B-A3B")
    ap.add_argument("--layers", default="4,8")
    ap.add_argument("--batches", default="1,32")
    ap.add_argument("--output", type=int, default=64)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--mixed", type=int, default=0, metavar="B",
                    help="also profile the throughput workload's mixed steps at this concurrency (e.g. 104)")
    ap.add_argument("--llm-args", default="{}", help='more LLM(...) arguments as JSON, e.g. {"tensor_parallel_size": 2}')
    ap.add_argument("--no-eager", action="store_true", help="skip the eager profile (one engine per process, e.g. TP)")
    ap.add_argument("--spread-routing", action="store_true",
                    help="zero the routers' correction biases after the dummy load (see spread_routing)")
    args = ap.parse_args()
    import torch

    llm_args = json.loads(args.llm_args)
    batches = [int(x) for x in args.batches.split(",")]
    depths = [int(x) for x in args.layers.split(",")]
    tp: dict[int, dict[int, float]] = {}
    full = None
    for L in depths:
        t = time.perf_counter()
        llm, full = build(args.shape, L, eager=False, max_model_len=args.max_model_len, **llm_args)
        if args.spread_routing:
            print(f"  spread routing: {spread_routing(llm)} correction biases zeroed", flush=True)
        print(f"== {L} layers (CUDA graphs): start-up {time.perf_counter() - t:.1f}s "
              f"{json.dumps(llm.llm_engine.timings)}", flush=True)
        tp[L] = {b: tpot_ms(llm, b, args.output) for b in batches}
        print(f"  TPOT ms: {json.dumps({b: round(v, 3) for b, v in tp[L].items()})}", flush=True)
        if L == depths[-1]:
            for b in batches:
                profile(llm, b, args.steps, args.top)
            if args.mixed:
                profile(llm, args.mixed, args.steps, args.top, mixed=True)
            if args.no_eager:
                llm.llm_engine.shutdown()  # stops the other ranks' processes (TP), else a no-op
                break
            del llm
            torch.cuda.empty_cache()
            llm, _ = build(args.shape, L, eager=True, max_model_len=args.max_model_len, **llm_args)
            if args.spread_routing:
                spread_routing(llm)
            print(f"== {L} layers, eager (one launch at a time)", flush=True)
            profile(llm, batches[0], args.steps, args.top)
        del llm
        torch.cuda.empty_cache()
    if len(depths) >= 2:
        a, c = depths[0], depths[-1]
        for b in batches:
            slope = (tp[c][b] - tp[a][b]) / (c - a)
            fixed = tp[a][b] - slope * a
            print(f"batch {b}: {slope * 1e3:.1f} us/layer + {fixed:.2f} ms fixed -> {full} layers "
                  f"{fixed + slope * full:.2f} ms")


if __name__ == "__main__":
    main()
