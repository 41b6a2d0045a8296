"""The `throughput` workload (1000 requests, input 1024, output 256, all at once) on one pinned shape.

    python benchmarks/throughput.py --shape qwen3-30b-a3b --out-dir $OUT

Roofline, moeserve and transformers in the same run; every bench_suite.py flag applies.
"""

import sys

from bench_suite import main

if __name__ == "__main__":
    sys.exit(main(["--workloads", "throughput", *sys.argv[1:]]))
