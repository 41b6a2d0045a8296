"""vLLM's decode step kernel by kernel at a fixed batch, on one GPU or under tensor parallelism, beside
moeserve's `kernels/profile_decode.py` (same shape cut to the same layers, same prompts of 128 tokens).

    python benchmarks/peers/vllm/profile_vllm_decode.py --shape qwen3-30b-a3b --layers 12 --batches 1,8,32
    torchrun --nproc-per-node 2 benchmarks/peers/vllm/profile_vllm_decode.py --shape qwen3-30b-a3b --layers 12 \\
        --batches 8,32 --engine-arg tensor_parallel_size=2

Under torchrun every rank runs vLLM's engine in its own process (`distributed_executor_backend=
"external_launcher"`), so torch.profiler sees rank 0's kernels, CUDA-graph replays included; every rank runs the
same requests (vLLM's rule for that backend) and rank 0 prints. Per batch: TPOT from vLLM's request metrics, then
two profiled runs of fresh prompts, `steps + 1` tokens and 1 token; their difference over `steps` is the decode
step (prefill and sampling set-up cancel out).

Seen on 2xH200 (results/layouts/2026-11-27-session10-h200x2): under torchrun vLLM's TP TPOT is not its served
TPOT (TP=2 came out slower than TP=1 at batch 32, each rank running a scheduler of its own), and some
differences came out negative; read the kernels' names and per-call times from it, and take vLLM's TP TPOT from
the suite (`run_layouts.sh` with ENGINES=moeserve,vllm).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run_vllm  # noqa: E402  (puts benchmarks/ and the repo on sys.path)


def kernel_times(prof) -> dict[str, tuple[float, int]]:
    return {e.key: (e.device_time_total, e.count) for e in prof.key_averages() if e.device_time_total > 0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", required=True)
    ap.add_argument("--layers", type=int, default=0, help="cut the config to this many layers (0: all)")
    ap.add_argument("--batches", default="8,32")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--engine-arg", action="append", default=[], help="key=value for LLM(...)")
    ap.add_argument("--site", default=None)
    a = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    env = {**run_vllm.QUIET_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    run_vllm.use_site(a.site)
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from vllm import LLM

    rank0 = int(os.environ.get("RANK", "0")) == 0
    cfg = run_vllm.model_config(argparse.Namespace(model=None, shape=a.shape))
    if a.layers:
        cfg["num_hidden_layers"] = a.layers
    model_dir, _ = run_vllm.model_dir_for(cfg)
    kw = run_vllm.engine_kwargs(argparse.Namespace(
        dtype="bfloat16", max_model_len=a.max_model_len, max_num_seqs=256, gpu_memory_utilization=0.6,
        load_format="dummy", engine_arg=a.engine_arg), model_dir)
    if world > 1:
        kw["distributed_executor_backend"] = "external_launcher"
    llm = LLM(**kw)
    vocab = int(cfg["vocab_size"])

    def prompts(b: int, seed: int) -> list[list[int]]:
        return np.random.default_rng(seed).integers(0, vocab, (b, 128)).tolist()

    for b in (int(x) for x in a.batches.split(",")):
        run_vllm.generate(llm, prompts(b, 1), 4)
        outs, _ = run_vllm.generate(llm, prompts(b, 2), a.steps + 1)
        tpots = [t[1] for t in (run_vllm.request_times(o.metrics, a.steps + 1) for o in outs) if t]
        runs = []
        for n, seed in ((a.steps + 1, 3), (1, 4)):
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run_vllm.generate(llm, prompts(b, seed), n)
                torch.cuda.synchronize()
            runs.append(kernel_times(prof))
        if not rank0:
            continue
        long, short = runs
        rows = []
        for key, (us, n) in long.items():
            us0, n0 = short.get(key, (0.0, 0))
            rows.append(((us - us0) / a.steps, (n - n0) / a.steps, key))
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        tpot = f"{float(np.median(tpots)):.3f} ms" if tpots else "n/a"
        print(f"vLLM, {a.shape} L{a.layers or 'all'}, world {world}, batch {b}: TPOT {tpot}; "
              f"GPU per decode step {total / 1e3:.3f} ms", flush=True)
        print(f"  {'kernel':76s} {'calls/step':>10s} {'us/step':>9s}")
        for us, n, key in rows[:a.top]:
            print(f"  {key[:76]:76s} {n:10.1f} {us:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
