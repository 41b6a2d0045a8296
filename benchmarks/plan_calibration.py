"""Calibrate `moeserve plan` against the engine (issue 6, point 6). Device script; the lead runs it.

For each shape, loads the real architecture with dummy weights, reads `llm_engine.memory_report()`, and
compares with what the planner predicts for the same GPU, dtype and engine settings:
  weights     planner weight bytes on one GPU    vs  engine's sum of parameter bytes
  KV tokens   planner KV capacity (block-rounded) vs  engine's num_blocks x block_size
  overhead    planner activations + sampler + context  vs  budget - weights - KV bytes the engine left
Pass: weights and KV capacity within 5%. Each shape runs in its own subprocess so GPU memory starts clean.

    python benchmarks/plan_calibration.py                 # qwen3-30b-a3b and llama-3-8b
    python benchmarks/plan_calibration.py --shapes llama-3-8b --gpu-memory-utilization 0.9
    python benchmarks/plan_calibration.py --from-suite benchmarks/results/<suite run>.json   # no GPU needed

Writes benchmarks/results/<date>-<gpu>-plan-calibration.json and the raw log beside it (.log).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # the device has no `pip install -e .`
    sys.path.insert(0, str(REPO))
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

SHAPES = {"qwen3-30b-a3b": "Qwen/Qwen3-30B-A3B", "llama-3-8b": "meta-llama/Meta-Llama-3-8B"}
TOLERANCE = 0.05


def planner_prediction(hub_id: str, report: dict, max_model_len: int, max_num_batched_tokens: int,
                       max_num_seqs: int) -> dict:
    """The planner's numbers for one GPU with the memory the engine saw."""
    from moeserve.plan.arch import load_config, read_arch
    from moeserve.plan.fit import check_startup_fit

    spec = read_arch(load_config(hub_id))
    v = check_startup_fit(
        spec, weight_dtype="bf16", kv_dtype_bytes=2, max_model_len=max_model_len,
        device_memory_bytes=report["device_memory_bytes"], memory_utilization=report["gpu_memory_utilization"],
        tp=1, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
    )
    return {"weights_bytes": v.weights, "kv_capacity_tokens": v.kv_capacity_tokens,
            "kv_bytes_per_token": spec.kv_bytes_per_token(2), "overhead_bytes": v.overhead,
            "budget_bytes": v.budget, "fits": v.fits}


def measure_one(shape: str, a) -> dict:
    """In this process: start the engine on dummy weights and return its memory report and the planner's."""
    import torch

    from moeserve import LLM

    hub_id = SHAPES[shape]
    t0 = time.perf_counter()
    llm = LLM(model=hub_id, load_format="dummy", dtype="bfloat16", gpu_memory_utilization=a.gpu_memory_utilization,
              max_num_seqs=a.max_num_seqs, seed=0)
    startup_s = time.perf_counter() - t0
    eng = llm.llm_engine
    return compare(shape, hub_id, torch.cuda.get_device_name(0), eng.memory_report(), int(eng.max_model_len),
                   int(eng.max_num_batched_tokens), a.max_num_seqs, startup_s)


def compare(shape: str, hub_id: str, gpu: str, report: dict, max_model_len: int, mnbt: int, max_num_seqs: int,
            startup_s: float | None) -> dict:
    """One row: the engine's memory report beside the planner's prediction for the same settings."""
    plan = planner_prediction(hub_id, report, max_model_len, mnbt, max_num_seqs)
    budget = int(report["device_memory_bytes"] * report["gpu_memory_utilization"])
    kv_cache_bytes = report.get("kv_cache_bytes") or report["num_blocks"] * report["block_size"] * report["kv_bytes_per_token"]
    measured_overhead = budget - report["weights_bytes"] - kv_cache_bytes
    peak = report.get("profile_peak_bytes")
    return {
        "shape": shape, "model": hub_id, "gpu": gpu, "startup_s": startup_s,
        "max_model_len": max_model_len, "max_num_batched_tokens": mnbt, "max_num_seqs": max_num_seqs,
        "engine": {**{k: v for k, v in report.items() if k != "timings"},
                   "overhead_bytes": measured_overhead,
                   "activation_peak_bytes": (peak - report["weights_bytes"]) if peak else None},
        "planner": plan,
        "ratio": {
            "weights": plan["weights_bytes"] / report["weights_bytes"],
            "kv_capacity_tokens": plan["kv_capacity_tokens"] / max(1, report["kv_capacity_tokens"]),
            "kv_bytes_per_token": plan["kv_bytes_per_token"] / report["kv_bytes_per_token"],
            "overhead": plan["overhead_bytes"] / max(1, measured_overhead),
        },
    }


def from_suite(path: Path) -> dict:
    """A row from the memory report that a suite run (bench_suite.py) recorded for moeserve on the device."""
    d = json.loads(path.read_text())
    m = d["engines"]["moeserve"]
    args = m["engine_args"]
    row = compare(d["shape"], args["model"], d["gpu"], m["memory_report"], int(args["max_model_len"]),
                  int(args.get("max_num_batched_tokens") or 8192), int(args.get("max_num_seqs", 256)),
                  m["memory_report"].get("timings", {}).get("load_s"))
    row["source"] = f"{path.name}: engine memory report measured on the device at commit {d.get('commit')}"
    row["commit"], row["date"] = d.get("commit"), d.get("date")
    return row


def _table(rows: list[dict]) -> str:
    g = 1 << 30
    head = (f"{'shape':<15} {'weights plan':>13} {'engine':>10} {'ratio':>6}   {'KV tok plan':>12} {'engine':>10} "
            f"{'ratio':>6}   {'overhead plan':>13} {'engine':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['shape']:<15} ERROR {r['error']}")
            continue
        e, p, q = r["engine"], r["planner"], r["ratio"]
        lines.append(
            f"{r['shape']:<15} {p['weights_bytes'] / g:>9.2f} GiB {e['weights_bytes'] / g:>6.2f} GiB {q['weights']:>6.3f}   "
            f"{p['kv_capacity_tokens']:>12,} {e['kv_capacity_tokens']:>10,} {q['kv_capacity_tokens']:>6.3f}   "
            f"{p['overhead_bytes'] / g:>9.2f} GiB {e['overhead_bytes'] / g:>5.2f} GiB")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one shape in this process
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--timeout", type=float, default=280.0, help="seconds per shape")
    ap.add_argument("--from-suite", nargs="+", metavar="JSON",
                    help="no GPU: compare with the memory reports that suite runs recorded (benchmarks/results/*.json)")
    a = ap.parse_args(argv)

    if a.one:
        Path(a.out).write_text(json.dumps(measure_one(a.one, a)))
        return 0


    if a.from_suite:
        rows = [from_suite(Path(f)) for f in a.from_suite]
        return _write(rows, [f"from the memory reports of {', '.join(a.from_suite)}"],
                      rows[0]["date"], rows[0]["commit"], "-from-suite")

    shapes = [s.strip() for s in a.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {unknown}; known: {', '.join(SHAPES)}")
    log: list[str] = []

    def say(msg: str) -> None:
        print(msg, flush=True)
        log.append(msg)

    rows = []
    for shape in shapes:
        with tempfile.TemporaryDirectory() as td:
            out = Path(td) / "r.json"
            cmd = [sys.executable, __file__, "--one", shape, "--out", str(out),
                   "--gpu-memory-utilization", str(a.gpu_memory_utilization), "--max-num-seqs", str(a.max_num_seqs)]
            say(f"$ {' '.join(cmd)}")
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout)
                say(proc.stdout + proc.stderr)
                rows.append(json.loads(out.read_text()) if proc.returncode == 0 and out.exists()
                            else {"shape": shape, "error": f"exit {proc.returncode}: {proc.stderr.strip()[-500:]}"})
            except subprocess.TimeoutExpired:
                rows.append({"shape": shape, "error": f"timed out after {a.timeout:.0f}s"})
    commit = os.environ.get("MOESERVE_COMMIT") or subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()  # the device has no .git
    return _write(rows, log, dt.date.today().isoformat(), commit or None, "")


def _write(rows: list[dict], log: list[str], date: str, commit: str | None, suffix: str) -> int:
    from results_io import atomic_write_json, gpu_slug

    def say(msg: str) -> None:
        print(msg, flush=True)
        log.append(msg)

    table = _table(rows)
    say(table)
    ok = [r for r in rows if "error" not in r]
    passed = bool(ok) and len(ok) == len(rows) and all(
        abs(r["ratio"]["weights"] - 1) <= TOLERANCE and abs(r["ratio"]["kv_capacity_tokens"] - 1) <= TOLERANCE
        for r in ok)
    say(f"within {TOLERANCE:.0%}: {'PASS' if passed else 'FAIL'}")

    gpu = ok[0]["gpu"] if ok else "unknown-gpu"
    stem = f"{date}-{gpu_slug(gpu)}-plan-calibration{suffix}"
    result = {"date": date, "gpu": gpu, "commit": commit, "tolerance": TOLERANCE, "passed": passed, "shapes": rows}
    results = HERE / "results"
    atomic_write_json(results / f"{stem}.json", result)
    (results / f"{stem}.log").write_text("\n".join(log) + "\n")
    print(f"wrote {results / (stem + '.json')}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
