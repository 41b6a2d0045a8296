"""The `latency` workload (batch 1, 8, 32, 128; input 128, output 256; TTFT, TPOT) on one pinned shape.

    python benchmarks/latency.py --shape qwen3-30b-a3b --out-dir $OUT

Roofline, moeserve and transformers in the same run; every bench_suite.py flag applies.
"""

import sys

from bench_suite import main

if __name__ == "__main__":
    sys.exit(main(["--workloads", "latency", *sys.argv[1:]]))
