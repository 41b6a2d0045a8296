"""bench_default_model.py's moeserve measurement for several variants, interleaved: each variant is a set of
environment variables (PYTHONPATH to run an unpacked tree, or a switch that a patched tree reads).

    python benchmarks/cpu/bench_variants.py '{"base": {"PYTHONPATH": "/tmp/base"}, "new": {"PYTHONPATH": "/tmp/new"}}' 3

Run it from outside the repository's root (there the editable install's tree shadows PYTHONPATH). One thread, as
the bench's --threads 1; one JSON line per repeat and variant, then medians (load peak = ru_maxrss at the end of
the load, run peak = over load, batch 1 and batch 16).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_default_model.py")


def main() -> None:
    variants: dict[str, dict[str, str]] = json.loads(sys.argv[1])
    reps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    results: dict[str, list[dict]] = {name: [] for name in variants}
    print(f"# {time.strftime('%Y-%m-%d %H:%M')} load average {os.getloadavg()}; variants {variants}", flush=True)
    for rep in range(reps):
        for name, env in variants.items():
            proc = subprocess.run([sys.executable, BENCH, "--worker", "moeserve", "--threads", "1"],
                                  capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1", **env))
            if proc.returncode:
                print(f"# rep {rep} {name}: FAILED\n{proc.stderr[-1500:]}", flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            results[name].append(r)
            print(f"rep {rep} {name:24s} {json.dumps(r)}  load-avg {os.getloadavg()[0]:.1f}", flush=True)
    print("\n| median | load s | b1 tok/s | b16 tok/s | load peak MB | run peak MB |\n|---|---|---|---|---|---|")
    for name, rs in results.items():
        if not rs:
            continue

        def med(key: str) -> float:
            return statistics.median(r[key] for r in rs)

        print(f"| {name} | {med('load_s'):.2f} | {med('b1_decode_tok_s'):.1f} | {med('b16_output_tok_s'):.1f} | "
              f"{med('rss_after_load_mb'):.0f} | {med('peak_rss_mb'):.0f} |")


if __name__ == "__main__":
    main()
