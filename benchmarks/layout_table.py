"""One table of the layouts that run_layouts.sh measured: TPOT per batch size and throughput, with ratios to the
first layout (one GPU), and where vLLM ran beside moeserve in a layout's suite, its row and moeserve's ratio to it."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(folder: Path, workload: str, engine: str = "moeserve") -> dict:
    for f in sorted(folder.glob(f"*-{workload}.json")):
        return json.loads(f.read_text()).get("engines", {}).get(engine, {})
    return {}


def main(out: str) -> None:
    rows = []
    folders = sorted((p for p in Path(out).iterdir() if p.is_dir()), key=lambda p: (p.name != "tp1", p.name))
    for folder in folders:  # one GPU first: the others are compared with it
        lat, thr = load(folder, "latency"), load(folder, "throughput")
        rows.append((folder.name, lat.get("tpot_ms", {}), thr.get("output_tok_s"), thr.get("num_requests")))
    if not rows:
        print("no results")
        return
    batches = sorted({b for _, t, _, _ in rows for b in t}, key=int)
    print("layout    " + "".join(f"TPOT b{b:>4} " for b in batches) + "  out tok/s (requests)")
    base = rows[0]
    for name, tpot, tps, n in rows:
        cells = "".join(f"{tpot.get(b, float('nan')):7.2f} ms " if b in tpot else "      -    " for b in batches)
        print(f"{name:9s} {cells}  {tps or float('nan'):8.0f} ({n})")
    for w in ("varlen", "prefix"):  # the traffic workloads (issue 16), where this run measured them
        got = [(f.name, load(f, w)) for f in folders]
        got = [(n, m) for n, m in got if m.get("output_tok_s")]
        if got:
            print(f"{w}: " + "; ".join(f"{n} {m['output_tok_s']:.0f} out tok/s, TTFT p50 "
                                       f"{m.get('ttft_ms_p50', float('nan')):.0f} ms" for n, m in got))
    for name, tpot, tps, _ in rows[1:]:
        ratios = " ".join(f"b{b} {tpot[b] / base[1][b]:.2f}x" for b in batches if b in tpot and b in base[1])
        thr = f", throughput {tps / base[2]:.2f}x" if tps and base[2] else ""
        print(f"{name} vs {base[0]}: TPOT {ratios}{thr}")
    for folder in folders:  # vLLM beside moeserve in the same suite (same layout, same machine, one after the other)
        vlat, vthr = load(folder, "latency", "vllm"), load(folder, "throughput", "vllm")
        if not (vlat or vthr):
            continue
        lat, thr = load(folder, "latency"), load(folder, "throughput")
        vt, mt = vlat.get("tpot_ms", {}), lat.get("tpot_ms", {})
        cells = " ".join(f"b{b} {vt[b]:.2f} ms ({vt[b] / mt[b]:.2f}x)" for b in batches if b in vt and b in mt)
        vtps, mtps = vthr.get("output_tok_s"), thr.get("output_tok_s")
        tail = f"; throughput {vtps:.0f} out tok/s (moeserve {mtps / vtps:.2f}x)" if vtps and mtps else ""
        print(f"{folder.name} vLLM: TPOT {cells}{tail}   [(x) = vLLM TPOT / moeserve TPOT: > 1 means moeserve faster]")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
