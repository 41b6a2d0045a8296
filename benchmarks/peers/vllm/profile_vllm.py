"""Where vLLM's time goes on a traffic workload: its GPU kernels under torch.profiler, beside moeserve's step_trace.

    python benchmarks/peers/vllm/profile_vllm.py --shape deepseek-v2-lite --workload prefix [--top 60]

vLLM's engine core runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so the profiler sees its kernels,
CUDA-graph replays included. The workload runs twice on fresh prompts (no prefix-cache hit from the first run):
once timed, once profiled. The table lists each kernel's total GPU time over the profiled run and per output
step (total / output_len), the unit of moeserve's step_trace tables.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import run_vllm  # noqa: E402  (puts benchmarks/ and the repo on sys.path)
from workloads import PrefixSpec, VarlenSpec, prefix_prompts, varlen_prompts  # noqa: E402


def workload(name: str, vocab: int, seed: int):
    """(prompts, max_tokens per prompt or one int, output steps) of the suite's default spec, reseeded."""
    if name == "prefix":
        spec = PrefixSpec(seed=seed)
        return prefix_prompts(spec, vocab), spec.output_len, spec.output_len
    spec = VarlenSpec(seed=seed)
    prompts, outs = varlen_prompts(spec, vocab)
    return prompts, outs, max(outs)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", required=True)
    ap.add_argument("--workload", choices=("prefix", "varlen"), default="prefix")
    ap.add_argument("--max-model-len", type=int, default=10240)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--top", type=int, default=60)
    ap.add_argument("--site", default=None)
    a = ap.parse_args()
    for k, v in {**run_vllm.QUIET_ENV, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}.items():
        os.environ.setdefault(k, v)
    run_vllm.use_site(a.site)
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM

    cfg = run_vllm.model_config(argparse.Namespace(model=None, shape=a.shape))
    vocab = int(cfg["vocab_size"])
    model_dir, _ = run_vllm.model_dir_for(cfg)
    t = time.perf_counter()
    llm = LLM(**run_vllm.engine_kwargs(argparse.Namespace(  # the suite worker's engine arguments
        dtype="bfloat16", max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs, gpu_memory_utilization=0.9,
        load_format="dummy", engine_arg=[]), model_dir))
    print(f"vLLM ready in {time.perf_counter() - t:.1f} s", flush=True)
    prompts, outs, steps = workload(a.workload, vocab, 101)
    run_vllm.generate(llm, prompts[:16], 4)  # warm-up
    res, wall = run_vllm.generate(llm, prompts, outs)
    n_out = sum(len(o.outputs[0].token_ids) for o in res)
    print(f"{a.workload}: {len(prompts)} requests, wall {wall:.2f} s, {n_out / wall:.0f} output tok/s", flush=True)
    prompts, outs, steps = workload(a.workload, vocab, 202)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        _, wall = run_vllm.generate(llm, prompts, outs)
        torch.cuda.synchronize()
    print(f"profiled run: wall {wall:.2f} s; kernels (GPU ms total, per output step = total / {steps}):")
    rows = [(e.device_time_total / 1e3, e.count, e.key) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(reverse=True)
    total = sum(r[0] for r in rows)
    print(f"  GPU total {total:.1f} ms, {total / steps:.2f} ms per output step")
    for ms, n, key in rows[:a.top]:
        print(f"  {key[:76]:<76} {n / steps:8.1f}/step {ms / steps:8.3f} ms/step {100 * ms / total:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
