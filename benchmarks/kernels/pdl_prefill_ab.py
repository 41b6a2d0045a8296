"""Where programmatic dependent launch (PDL) loses on large launches. Session 18 measured prefill TTFT 5-25 % slower
with PDL on every launch, and still ~7 % slower with mode 2 (each kernel waits, none releases the next early), so
an early release is not the whole story. Each variant builds its engine in a process of its own (CUDA graphs are
captured under the variant's mode), the shape cut to a few layers with dummy weights. In one shared process
(session 20) each engine decoded slower than the one before it, whatever its mode: b1 TPOT 0.47, 0.54, 0.63,
0.89 ms in build order, though two of those variants launch a 1-row step identically. So nothing an earlier engine
or profiler left behind is shared now.

    off          MOESERVE_PDL=0
    landed       mode 1 for launches over <= pdl.MAX_ROWS tokens (the default; prefill should equal `off`)
    wait-all     mode 2 on every launch
    release-all  mode 1 on every launch

Per variant: the time to first token of one prompt of each length (fresh random tokens every repeat, so no prefix
hit), decode TPOT at a few batch sizes, and the kernels of one prefill of the longest prompt under the profiler.
A kernel that itself runs longer under PDL (its code, or a dependent's programs parked beside it on the SMs) shows
in that table; time lost between kernels shows only in the wall times.

    python3 benchmarks/kernels/pdl_prefill_ab.py --shape Qwen/Qwen3-30B-A3B --layers 4 --out pdl-prefill.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import time
from pathlib import Path

from profile_decode import build as build_shape, prompts, tpot_ms  # same folder

from moeserve.kernels import pdl

DEFAULT_MAX_ROWS = pdl.MAX_ROWS  # the landed gate, before apply() moves it
VARIANTS = {"off": (0, False), "landed": (1, False), "wait-all": (2, True), "release-all": (1, True)}


def apply(variant: str) -> None:
    """Set PDL's mode and row gate for the engine built next."""
    mode, every_launch = VARIANTS[variant]
    os.environ["MOESERVE_PDL"] = str(mode)
    pdl._on.clear()
    pdl.MAX_ROWS = 1 << 40 if every_launch else DEFAULT_MAX_ROWS


def build(args):
    from moeserve import LLM

    extra = json.loads(args.llm_args)
    if args.model:  # a local config.json (the CPU smoke test)
        return LLM(model=args.model, load_format="dummy", max_model_len=args.max_model_len, **extra)
    return build_shape(args.shape, args.layers, eager=False, max_model_len=args.max_model_len, **extra)[0]


def ttft_ms(llm, length: int, repeats: int) -> float:
    """Median time to first token of one `length`-token prompt, fresh tokens every time (no prefix-cache hit); the
    first run warms (autotune, first launches)."""
    from moeserve import SamplingParams

    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    times = []
    for i in range(repeats + 1):
        out = llm.generate(prompts(llm, 1, length, seed=1000 * length + i), one)[0]
        times.append(1e3 * (out.metrics.first_token_time - out.metrics.arrival_time))
    return statistics.median(times[1:])


def kernel_times(llm, length: int) -> tuple[dict[str, float], float]:
    """Each kernel's total time (us) in one prefill of `length` tokens (device time on a GPU, the op's own CPU time
    otherwise), and the prefill's wall time (ms)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from moeserve import SamplingParams

    cuda = torch.cuda.is_available()
    one = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        llm.generate(prompts(llm, 1, length, seed=2), one)  # a seed no other prompt here uses (no prefix hit)
        wall = time.perf_counter() - t0
    table: dict[str, float] = {}
    for e in prof.key_averages():
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0:
            table[e.key] = table.get(e.key, 0.0) + us
    return table, 1e3 * wall


def run_variant(args, variant: str) -> dict:
    apply(variant)
    t = time.perf_counter()
    llm = build(args)
    start_s = time.perf_counter() - t
    lengths = [int(x) for x in args.lengths.split(",")]
    res = {"variant": variant, "mode": VARIANTS[variant][0], "every_launch": VARIANTS[variant][1],
           "start_s": round(start_s, 1),
           "ttft_ms": {n: round(ttft_ms(llm, n, args.repeats), 3) for n in lengths},
           "tpot_ms": {b: round(tpot_ms(llm, b, args.steps), 3) for b in
                       (int(x) for x in args.batches.split(",") if x)}}
    kernels, wall = kernel_times(llm, max(lengths))
    res["profiled_prefill_ms"] = round(wall, 3)
    res["kernels_us"] = {k: round(v, 1) for k, v in kernels.items()}
    print(f"== {variant}: start-up {start_s:.1f} s, TTFT ms {res['ttft_ms']}, TPOT ms {res['tpot_ms']}", flush=True)
    llm.llm_engine.shutdown()
    return res


def report(results: list[dict], top: int) -> None:
    base = results[0]
    names = [r["variant"] for r in results]
    print("\nTTFT ms (ratio to " + base["variant"] + ")")
    for n, ms in base["ttft_ms"].items():
        print(f"  {n:>6} tokens: " + "  ".join(f"{r['variant']} {r['ttft_ms'][n]:.2f} ({r['ttft_ms'][n] / ms:.3f})"
                                          for r in results))
    for b, ms in base["tpot_ms"].items():
        print(f"  TPOT b{b}: " + "  ".join(f"{r['variant']} {r['tpot_ms'][b]:.3f} ({r['tpot_ms'][b] / ms:.3f})"
                                        for r in results))
    keys = sorted(base["kernels_us"], key=lambda k: -base["kernels_us"][k])[:top]
    print(f"\nkernels of one {max(base['ttft_ms'])}-token prefill, us (profiled wall ms: "
          + ", ".join(f"{r['variant']} {r['profiled_prefill_ms']:.1f}" for r in results) + ")")
    print(f"  {'kernel':60s} " + " ".join(f"{n:>12s}" for n in names))
    for k in keys:
        print(f"  {k[:60]:60s} " + " ".join(f"{r['kernels_us'].get(k, 0.0):12.1f}" for r in results))
    print(f"  {'total':60s} " + " ".join(f"{sum(r['kernels_us'].values()):12.1f}" for r in results))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="Qwen/Qwen3-30B-A3B")
    ap.add_argument("--model", default="", help="a local config.json instead of the shape's (testing)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lengths", default="1024,4096,16384", help="prompt lengths for TTFT; the longest is profiled")
    ap.add_argument("--batches", default="1,8,32,128", help="decode TPOT batch sizes ('' for none)")
    ap.add_argument("--steps", type=int, default=32, help="output tokens per TPOT request")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-model-len", type=int, default=17408)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="the first is the ratios' base")
    ap.add_argument("--llm-args", default='{"kv_cache_memory_bytes": 8589934592}',
                    help="more LLM(...) arguments as JSON; a fixed KV size by default, so that every variant gets the "
                         "same cache (and token budget) whatever an earlier engine left allocated")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default="", help="write the results as JSON here")
    args = ap.parse_args()
    results = []
    for variant in args.variants.split(","):
        with multiprocessing.get_context("spawn").Pool(1) as pool:  # a fresh process (and CUDA context) each
            results.append(pool.apply(run_variant, (args, variant)))
    report(results, args.top)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))

if __name__ == "__main__":
    main()
