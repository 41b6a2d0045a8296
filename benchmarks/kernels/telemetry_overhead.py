"""What expert-load telemetry (`--expert-load-telemetry`, layers/expert_load) costs a decode step (issue 18.2:
< 1% at batch 1 and 128). One engine per setting, same layer-truncated model and prompts; the two alternate and
each TPOT is the median over repeats, so drift on the machine falls on both.

    python3 benchmarks/kernels/telemetry_overhead.py --shape Qwen/Qwen3-30B-A3B --layers 8 --batches 1,128
"""

from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from profile_decode import build, tpot_ms  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="Qwen/Qwen3-30B-A3B")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batches", default="1,128")
    ap.add_argument("--output", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    import torch

    batches = [int(b) for b in args.batches.split(",")]
    # two engines in one process: a fixed KV size, not a share of the memory the other already holds
    engines = {t: build(args.shape, args.layers, False, 2048, kv_cache_memory_bytes=4 << 30,
                        expert_load_telemetry=t)[0] for t in (False, True)}
    runs: dict[bool, dict[int, list[float]]] = {t: {b: [] for b in batches} for t in engines}
    for _ in range(args.repeats):
        for b in batches:
            for t, llm in engines.items():
                runs[t][b].append(tpot_ms(llm, b, args.output))
    print(f"{args.shape}, {args.layers} layers, CUDA graphs, {torch.cuda.get_device_name()}")
    for b in batches:
        off, on = float(np.median(runs[False][b])), float(np.median(runs[True][b]))
        print(f"batch {b:4d}: TPOT off {off:.3f} ms, on {on:.3f} ms: {100 * (on / off - 1):+.2f}% "
              f"(off {['%.3f' % v for v in runs[False][b]]}, on {['%.3f' % v for v in runs[True][b]]})")
    del engines
    gc.collect()


if __name__ == "__main__":
    main()
