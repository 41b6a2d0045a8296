"""run_vllm.py's standalone and merge modes (see its docstring): results as `engines.vllm` in the suite's schema.

Standalone, on the device: the two ceilings (benchmarks/roofline.py in its own process), then the vLLM worker in
its own process group with a hard deadline, then per workload <out-dir>/<date>-<gpu>-<shape>-<workload>.json:
merged into when a suite result of the same name is there, else written new with this run's roofline.
Merge, here: engines.vllm of one result file into another of the same shape, workload and GPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE.parent.parent
sys.path.insert(0, str(BENCH))

from results_io import atomic_write_json, load_result, merge_engine, result_stem, validate  # noqa: E402
from workloads import LatencySpec, ThroughputSpec  # noqa: E402


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--merge-from", help="merge: a result JSON holding engines.vllm")
    ap.add_argument("--into", help="merge: the result JSON (the suite's) to put it in")
    ap.add_argument("--force", action="store_true", help="merge even when the GPU or date differ")
    ap.add_argument("--shape", help="pinned shape name")
    ap.add_argument("--model", help="testing: a local folder with config.json instead of the shape's catalog config")
    ap.add_argument("--out-dir", help="standalone: where the result JSONs and the log go (e.g. $OUT)")
    ap.add_argument("--deadline-s", type=float, default=480, help="standalone: everything ends inside this")
    ap.add_argument("--workloads", default="throughput,latency")
    ap.add_argument("--num-requests", type=int, default=ThroughputSpec.num_requests)
    ap.add_argument("--latency-repeats", type=int, default=LatencySpec.repeats)
    ap.add_argument("--latency-batches", default=",".join(map(str, LatencySpec.batch_sizes)))
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    ap.add_argument("--engine-arg", action="append", default=[], help="extra LLM(...) keyword, key=value")
    ap.add_argument("--site", help="folder vLLM was installed into (default $VLLM_SITE or /tmp/vllm_site)")
    ap.add_argument("--bw-TBps", type=float, help="testing: skip measuring the ceilings")
    ap.add_argument("--peak-TFLOPs", type=float)
    ap.add_argument("--gpu-name", help="testing: with --bw-TBps, the GPU name to record")
    ap.add_argument("--worker-extra", action="append", default=[], help="testing: extra worker argument")
    return ap


def merge(src: Path, into: Path, force: bool = False) -> dict:
    """Copy engines.vllm of `src` into `into`, after checking both describe the same shape, workload and GPU."""
    a, b = load_result(src), load_result(into)
    if "vllm" not in a.get("engines", {}):
        raise SystemExit(f"{src} has no engines.vllm")
    for k in ("shape", "workload"):
        if a.get(k) != b.get(k):
            raise SystemExit(f"{k} differs: {src} has {a.get(k)!r}, {into} has {b.get(k)!r}")
    if not force:
        for k in ("gpu", "date"):
            if a.get(k) != b.get(k):
                raise SystemExit(f"{k} differs ({a.get(k)!r} vs {b.get(k)!r}): figures from different machines or "
                                 "days do not compare; --force to merge anyway")
    m = dict(a["engines"]["vllm"])
    m["measured_in"] = {"file": src.name, "roofline_bw_TBps": a.get("roofline", {}).get("bw_TBps"),
                        "roofline_peak_TFLOPs": a.get("roofline", {}).get("peak_TFLOPs"),
                        "command_line": a.get("command_line"),
                        "note": "a separate device call of the same session (vLLM needs the GPU to itself)"}
    return merge_engine(into, "vllm", m)


def standalone(a) -> int:
    import bench_suite as bs
    import roofline as rl  # noqa: F401 - fail early if the suite's roofline module is missing

    if not (a.shape or a.model):
        raise SystemExit("--shape or --model is required")
    t0 = time.time()
    end = t0 + a.deadline_s
    out = Path(a.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if a.model:
        from shapes import Shape

        shape = Shape(a.shape or Path(a.model).name, a.model, "any")
        cfg = json.loads((Path(a.model) / "config.json").read_text())
    else:
        from shapes import get_shape, load_config

        shape = get_shape(a.shape)
        cfg = load_config(shape)
    name = a.shape or shape.name
    workloads = [w for w in a.workloads.split(",") if w]
    tp = ThroughputSpec(num_requests=a.num_requests)
    lat = LatencySpec(batch_sizes=tuple(int(x) for x in a.latency_batches.split(",") if x), repeats=a.latency_repeats)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    log = bs.Log(out / f"vllm-{name}.log.partial")
    meta = {"commit": bs.git_commit(), "versions": bs.versions(), "command_line": [sys.executable] + sys.argv}
    log(f"vllm peer {name} {workloads}, deadline {a.deadline_s:.0f} s, date {date}")
    log(json.dumps(meta))
    tmp = Path(tempfile.mkdtemp(prefix="vllm_peer_"))

    t = time.time()
    if a.bw_TBps and a.peak_TFLOPs:
        ceil = {"bw_TBps": a.bw_TBps, "peak_TFLOPs": a.peak_TFLOPs, "given": True, "gpu": a.gpu_name or "unknown"}
    else:
        rc = bs.run_child(log, "roofline", [sys.executable, str(BENCH / "roofline.py"), "--json", str(tmp / "ceil.json")],
                          time.time() + 120)
        ceil = json.loads((tmp / "ceil.json").read_text()) if (tmp / "ceil.json").exists() else {
            "error": f"roofline.py exited {rc}"}
    log.phase("roofline", time.time() - t)
    gpu = ceil.get("gpu") or a.gpu_name or "unknown-gpu"

    hard = end - 5
    soft = hard - 20
    worker = [sys.executable, str(HERE / "run_vllm.py"), *(["--model", a.model] if a.model else ["--shape", a.shape]),
              "--workloads", ",".join(workloads), "--num-requests", str(tp.num_requests),
              "--input-len", str(tp.input_len), "--output-len", str(tp.output_len),
              "--latency-batches", ",".join(map(str, lat.batch_sizes)), "--latency-input-len", str(lat.input_len),
              "--latency-output-len", str(lat.output_len), "--latency-repeats", str(lat.repeats),
              "--max-num-seqs", str(a.max_num_seqs), "--gpu-memory-utilization", str(a.gpu_memory_utilization),
              "--deadline", f"{soft:.1f}", "--out", str(tmp / "vllm.json")]
    if a.site:
        worker += ["--site", a.site]
    for kv in a.engine_arg:
        worker += ["--engine-arg", kv]
    for x in a.worker_extra:
        worker += x.split()
    t = time.time()
    rc = bs.run_child(log, "vllm", worker, hard)
    f = tmp / "vllm.json"
    partial = json.loads(f.read_text()) if f.exists() else None
    log.phase("vllm", time.time() - t)

    written = []
    for w in workloads:
        m = bs.engine_result(w, partial, rc)
        for k in ("version", "effective_config", "install"):
            if partial and k in partial:
                m.setdefault(k, partial[k])
        path = out / f"{result_stem(date, gpu, name, w)}.json"
        if path.exists():
            merge_engine(path, "vllm", m)
            log(f"merged engines.vllm into {path}")
        else:
            res = {
                "schema": 1, "date": date, "gpu": gpu, **meta["commit"], "shape": name, "model": shape.hub_id,
                "workload": w, "dtype": "bfloat16", "load_format": "dummy",
                "spec": (vars(tp) if w == "throughput" else {**vars(lat), "batch_sizes": list(lat.batch_sizes)}),
                "versions": meta["versions"], "command_line": meta["command_line"],
                "engine_command_lines": {"vllm": worker}, "engines": {"vllm": m},
            }
            res["roofline"] = bs.roofline_section(w, cfg, ceil, tp, lat, None, a.gpu_memory_utilization, a.max_num_seqs)
            res["suite_elapsed_s"] = round(time.time() - t0, 1)
            validate(res)
            atomic_write_json(path, res)
            log(f"wrote {path}")
        written.append(path)
        _print_figures(log, w, m)
    log.phase("total", time.time() - t0)
    log.f.close()
    for path in written:
        shutil.copyfile(log.path, path.with_name(path.stem + "-vllm.log"))
    log.path.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    return 0 if partial and not partial.get("error") and rc == 0 else 1


def _print_figures(log, workload: str, m: dict) -> None:
    if m.get("error"):
        log(f"vllm {workload}: ERROR {m['error']}")
    if workload == "throughput" and "output_tok_s" in m:
        log(f"vllm throughput: {m['output_tok_s']:.0f} output tok/s, {m['total_tok_s']:.0f} total tok/s, "
            f"{m['wall_s']:.1f} s for {m['num_requests']} requests")
    if workload == "latency" and m.get("tpot_ms"):
        log("vllm latency: " + ", ".join(f"b{b}: TTFT {m['ttft_ms'][b]:.1f} ms TPOT {m['tpot_ms'][b]:.2f} ms"
                                         for b in m["tpot_ms"]))


def main(argv=None) -> int:
    a = parser().parse_args(argv)
    if a.merge_from:
        if not a.into:
            raise SystemExit("--merge-from needs --into")
        res = merge(Path(a.merge_from), Path(a.into), a.force)
        print(f"merged engines.vllm into {a.into}: engines now {', '.join(res['engines'])}")
        return 0
    if not a.out_dir:
        raise SystemExit("give --out-dir (standalone) or --merge-from/--into (merge)")
    return standalone(a)


if __name__ == "__main__":
    raise SystemExit(main())
