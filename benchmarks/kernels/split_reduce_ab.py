"""Split-K decode GEMMs, one tree against another: every split-K candidate of the bf16 skinny GEMM and the fp8 block
GEMM at decode shapes, timed by CUDA-graph replay, outputs kept for a bit-for-bit comparison. Written for the
one-launch reduce (the tile's last program sums the partials) against the two-launch one before it.

    PYTHONPATH=.base python3 benchmarks/kernels/split_reduce_ab.py run --out $OUT/base.pt
    PYTHONPATH=$PWD  python3 benchmarks/kernels/split_reduce_ab.py run --out $OUT/new.pt
    python3 benchmarks/kernels/split_reduce_ab.py compare $OUT/base.pt $OUT/new.pt

The tree comes from PYTHONPATH (moeserve is imported from there); inputs are seeded, so both runs see the same.
"""

from __future__ import annotations

import argparse
import statistics

import torch

# (name, rows, N, K): qwen3-30b-a3b's qkv / o projections and router, DeepSeek-R1's q_a / kv_a (fp8)
BF16_SHAPES = [("qwen3 qkv", 1, 5120, 2048), ("qwen3 o", 1, 2048, 4096), ("qwen3 router", 1, 128, 2048),
               ("qwen3 o", 8, 2048, 4096)]
FP8_SHAPES = [("qwen3 qkv", 1, 5120, 2048), ("qwen3 o", 1, 2048, 4096), ("R1 q_a", 1, 1536, 7168),
              ("R1 kv_a", 1, 576, 7168), ("qwen3 o", 8, 2048, 4096)]


def _median_us(fn) -> float:
    import triton.testing

    return 1000 * statistics.median(triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="all"))


def run(out_path: str) -> None:
    import moeserve
    from moeserve.kernels import fp8_linear as fl
    from moeserve.kernels import linear as ln
    from moeserve.layers.quant.fp8 import quantize_blocks

    print(f"moeserve from {moeserve.__file__}")
    dev = torch.device("cuda")
    sms = torch.cuda.get_device_properties(dev).multi_processor_count
    results = {}
    for name, m, n, k in BF16_SHAPES:
        g = torch.Generator(device=dev).manual_seed(n * 7 + k + m)
        x = torch.randn(m, k, device=dev, generator=g).bfloat16()
        w = (torch.randn(n, k, device=dev, generator=g) * 0.02).bfloat16()
        for cfg in ln.linear_candidates(m, n):
            if cfg.get("CUBLAS") or cfg["SPLIT_K"] == 1:
                continue
            out = torch.empty(m, n, dtype=x.dtype, device=dev)
            us = _median_us(lambda: ln.skinny_matmul(x, w, None, cfg, out))
            results[f"bf16 {name} M={m} {sorted(cfg.items())}"] = (us, out.cpu())
            print(f"bf16 {name} M={m} {cfg}: {us:.2f} us")
    for name, m, n, k in FP8_SHAPES:
        g = torch.Generator(device=dev).manual_seed(n * 5 + k + m)
        x = torch.randn(m, k, device=dev, generator=g).bfloat16()
        wq, ws = quantize_blocks(torch.randn(n, k, device=dev, generator=g) * 0.02, (128, 128))
        for cfg in fl.fp8_candidates(m, n, k, 128, sms):
            if cfg.get("QA") or cfg["SPLIT_K"] == 1:  # QA: the base tree's in-GEMM quant forms
                continue
            out = torch.empty(m, n, dtype=x.dtype, device=dev)
            us = _median_us(lambda: fl.run_config(cfg, x, wq, ws, None, out, 128, 128))
            results[f"fp8 {name} M={m} {sorted(cfg.items())}"] = (us, out.cpu())
            print(f"fp8 {name} M={m} {cfg}: {us:.2f} us")
    torch.save(results, out_path)


def compare(base_path: str, new_path: str) -> None:
    base, new = torch.load(base_path), torch.load(new_path)
    best: dict[str, list[float]] = {}
    same = 0
    for key in sorted(base.keys() & new.keys()):
        (tb, ob), (tn, on) = base[key], new[key]
        same += torch.equal(ob, on)
        print(f"{key}: {tb:.2f} -> {tn:.2f} us ({tn / tb:.2f}x){'' if torch.equal(ob, on) else '  OUTPUT DIFFERS'}")
        shape = key.split(" [")[0]
        b = best.setdefault(shape, [float("inf"), float("inf")])
        b[0], b[1] = min(b[0], tb), min(b[1], tn)
    print(f"\noutputs bit for bit equal: {same} of {len(base.keys() & new.keys())} configs")
    print("best split config per shape, base -> new:")
    for shape, (tb, tn) in best.items():
        print(f"  {shape}: {tb:.2f} -> {tn:.2f} us ({tn - tb:+.2f} us)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    c = sub.add_parser("compare")
    c.add_argument("base")
    c.add_argument("new")
    a = ap.parse_args()
    run(a.out) if a.cmd == "run" else compare(a.base, a.new)


if __name__ == "__main__":
    main()
