"""One device call: roofline, then each engine in its own process, then one result JSON + raw log per workload.

    python benchmarks/bench_suite.py --shape qwen3-30b-a3b --workloads throughput,latency --out-dir $OUT
    python benchmarks/bench_suite.py --shape deepseek-v2-lite --workloads varlen,longctx,prefix \
        --engines moeserve,vllm --out-dir $OUT        # the traffic workloads of issue 16 (benchmarks/traffic.py)

Engines run one after another (a 30B model in bf16 leaves no room for a second copy on one H100). Each gets a
deadline; a worker stopped there hands back what it measured, and the JSON says what was skipped and why.
throughput.py and latency.py are this script with one workload.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import roofline as rl  # noqa: E402
import traffic  # noqa: E402
from results_io import KEYED, METRICS, atomic_write_json, result_stem, validate  # noqa: E402
from shapes import get_shape, load_config  # noqa: E402
from workloads import LatencySpec, ThroughputSpec, spec_dict  # noqa: E402

ENGINES = {"moeserve": "moeserve_worker.py", "transformers": "hf_reference.py", "vllm": "peers/vllm/run_vllm.py"}
# transformers' reference runs only the fixed-length workloads; it is left out of the traffic workloads' results
SUPPORTS = {"transformers": ("throughput", "latency")}


def checkpoint_precision(cfg: dict) -> str:
    """What the dummy weights are: bf16, or the checkpoint's quantization (both engines build it)."""
    from moeserve.plan.arch import text_config

    method = (text_config(cfg).get("quantization_config") or {}).get("quant_method")
    return {"fp8": "fp8", "compressed-tensors": "int4 experts", "awq": "int4", "gptq": "int4"}.get(method, "bfloat16")


def engine_workloads(engine: str, workloads: list[str]) -> list[str]:
    return [w for w in workloads if w in SUPPORTS.get(engine, traffic.ALL_WORKLOADS)]


class Log:
    """Everything printed goes to stdout and to a log file."""

    def __init__(self, path: Path):
        self.path = path
        self.f = open(path, "w", buffering=1)
        self.lock = threading.Lock()
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        with self.lock:
            sys.stdout.write(msg + "\n")
            sys.stdout.flush()
            self.f.write(msg + "\n")

    def phase(self, name: str, seconds: float) -> None:
        self(f"=== phase {name}: {seconds:.1f} s (suite elapsed {time.time() - self.t0:.1f} s)")


def git_commit() -> dict:
    env = os.environ.get("MOESERVE_COMMIT")
    if env:
        return {"commit": env, "commit_from": "MOESERVE_COMMIT"}
    try:
        c = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10)
        d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                           text=True, timeout=10)
        if c.returncode == 0:
            return {"commit": c.stdout.strip(), "dirty": bool(d.stdout.strip()), "commit_from": "git"}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": "unknown", "commit_from": "no git here and MOESERVE_COMMIT unset"}


def versions() -> dict:
    v = {"python": platform.python_version()}
    for mod in ("torch", "triton", "transformers"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception as e:  # noqa: BLE001 - record, never stop for a version string
            v[mod] = f"unavailable ({type(e).__name__})"
    try:
        import torch

        v["cuda"] = torch.version.cuda
    except Exception:  # noqa: BLE001
        pass
    try:
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        if q.returncode == 0:
            v["nvidia_smi"] = q.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return v


def run_child(log: Log, name: str, argv: list[str], hard_deadline: float) -> int | None:
    """Run argv in its own process group, streaming its output into the log; stop it at hard_deadline."""
    log(f"$ {' '.join(argv)}")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, process_group=0)

    def pump():
        for line in proc.stdout:
            log(f"  {name}| {line.rstrip()}")

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        rc = proc.wait(timeout=max(1.0, hard_deadline - time.time()))
    except subprocess.TimeoutExpired:
        log(f"!!! {name}: past its deadline, stopping it (pid {proc.pid})")
        _stop(proc)
        rc = None
    except BaseException:
        _stop(proc)
        raise
    t.join(timeout=5)
    return rc


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)  # the group this script created for the child, nothing else
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def engine_result(workload: str, partial: dict | None, rc: int | None) -> dict:
    """The engine's entry in one workload's JSON, with an error where the figures are missing."""
    if partial is None:
        return {"error": f"worker wrote nothing (exit {rc})"}
    m = dict(partial.get(workload) or {})
    for k in ("phases_s", "notes", "engine_args", "memory_report", "model", "transformers", "device"):
        if k in partial:
            m.setdefault(k, partial[k])
    m["worker_status"] = partial.get("status")
    m["worker_exit"] = rc
    if partial.get("error"):
        m["error"] = partial["error"]
    missing = [k for k in METRICS[workload] if k not in m or (workload in KEYED and not m[k])]
    if missing:
        m.setdefault("error", f"no {', '.join(missing)}: worker "
                     + ("was stopped at its deadline" if rc is None else f"exited with {rc}"))
        for k in missing:
            m.pop(k, None)
    return m


def roofline_section(workload: str, cfg: dict, ceil: dict, tp: ThroughputSpec, lat: LatencySpec,
                     moeserve: dict | None, gpu_mem_util: float, max_num_seqs: int) -> dict:
    sec = {"bw_TBps": ceil.get("bw_TBps"), "peak_TFLOPs": ceil.get("peak_TFLOPs"), "measured": ceil}
    if workload in traffic.TRAFFIC:  # the ceilings and the model's facts; no per-workload floor yet
        try:
            from dataclasses import asdict

            sec["model_facts"] = asdict(rl.facts_from_config(cfg))
        except Exception as e:  # noqa: BLE001
            sec["model_facts_error"] = f"{type(e).__name__}: {e}"
        if not (isinstance(sec["bw_TBps"], (int, float)) and isinstance(sec["peak_TFLOPs"], (int, float))):
            sec.update(bw_TBps=None, peak_TFLOPs=None, error=ceil.get("error", "ceilings not measured"))
        return sec
    if not (isinstance(sec["bw_TBps"], (int, float)) and isinstance(sec["peak_TFLOPs"], (int, float))):
        sec.update(bw_TBps=None, peak_TFLOPs=None, error=ceil.get("error", "ceilings not measured"))
        if workload == "latency":
            sec["decode_step_ms"] = {}
        return sec
    bw, peak = sec["bw_TBps"] * 1e12, sec["peak_TFLOPs"] * 1e12
    try:
        facts = rl.facts_from_config(cfg)
    except Exception as e:  # noqa: BLE001 - the ceilings stand even when the floors cannot be computed
        sec["error"] = f"model facts unavailable: {type(e).__name__}: {e}"
        if workload == "latency":
            sec["decode_step_ms"] = {}
        return sec
    from dataclasses import asdict

    sec["model_facts"] = asdict(facts)
    if workload == "latency":
        sec.update(rl.latency_floor_ms(facts, lat.batch_sizes, lat.input_len, lat.output_len, bw, peak))
    else:
        ms = moeserve or {}
        n = int(ms.get("num_requests") or tp.num_requests)
        conc = ms.get("concurrency_limit")
        how = "moeserve's concurrency limit (KV capacity / max_num_seqs)"
        if not conc:
            free = ceil.get("gpu_total_bytes", 0) * gpu_mem_util - facts.total_weight_bytes
            conc = rl.kv_concurrency(free, facts.kv_bytes_per_token, tp.input_len + tp.output_len, max_num_seqs)
            how = "sequences whose KV fits in gpu_memory_utilization x memory - weights, capped at max_num_seqs"
        sec["throughput"] = {**rl.throughput_floor(facts, n, tp.input_len, tp.output_len, int(conc), bw, peak),
                             "num_requests": n, "concurrency_from": how}
    return sec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", required=True, help="pinned shape name (a free label with --model)")
    p.add_argument("--model", help="testing: a local checkpoint folder instead of the shape's catalog config")
    p.add_argument("--load-format", default="dummy", help="moeserve's and vLLM's: dummy, or auto with --model")
    p.add_argument("--random-weights", metavar="DIR",
                   help="build (or reuse) in DIR benchmarks/random_checkpoint.py's checkpoint of the shape (or of --model's "
                        "config) and have moeserve and vLLM load it: MoE routing both engines share (see that script)")
    p.add_argument("--workloads", default="throughput,latency")
    p.add_argument("--engines", default="moeserve,transformers")
    p.add_argument("--out-dir", default=str(HERE / "results"))
    p.add_argument("--budget-s", type=float, default=530, help="the whole suite ends inside this many seconds")
    p.add_argument("--hf-reserve-s", type=float, default=170, help="seconds kept for transformers after moeserve")
    p.add_argument("--num-requests", type=int, default=ThroughputSpec.num_requests)
    p.add_argument("--input-len", type=int, default=ThroughputSpec.input_len)
    p.add_argument("--output-len", type=int, default=ThroughputSpec.output_len)
    p.add_argument("--latency-batches", default=",".join(map(str, LatencySpec.batch_sizes)))
    p.add_argument("--latency-input-len", type=int, default=LatencySpec.input_len)
    p.add_argument("--latency-output-len", type=int, default=LatencySpec.output_len)
    p.add_argument("--latency-repeats", type=int, default=LatencySpec.repeats)
    p.add_argument("--hf-latency-repeats", type=int, default=1)
    p.add_argument("--hf-batch-sizes", default="64,128")
    p.add_argument("--hf-cb-requests", type=int, default=128)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    p.add_argument("--engine-arg", action="append", default=[], help="passed to moeserve's LLM(...), key=value")
    p.add_argument("--vllm-engine-arg", action="append", default=[], help="passed to vLLM's LLM(...), key=value")
    traffic.add_args(p)
    p.add_argument("--bw-TBps", type=float, help="skip measuring the ceilings (testing only)")
    p.add_argument("--peak-TFLOPs", type=float)
    p.add_argument("--gpu-name", help="with --bw-TBps: the GPU name to record (testing only)")
    p.add_argument("--worker-extra", action="append", default=[], help="testing: extra worker argument, engine:arg")
    a = p.parse_args(argv)

    t_start = time.time()
    end = t_start + a.budget_s
    if a.model:
        from shapes import Shape

        shape = Shape(a.shape, a.model, "any")
        cfg = json.loads((Path(a.model) / "config.json").read_text())
    else:
        shape = get_shape(a.shape)
        cfg = load_config(shape)
    overrides = traffic.engine_kwargs(a.engine_arg).get("hf_overrides")
    if overrides:  # the roofline of the model the engines serve (e.g. a layer-truncated flagship)
        from moeserve.plan.arch import apply_hf_overrides

        cfg = apply_hf_overrides(cfg, overrides)
    if a.random_weights:  # random weights of that config (overrides included), which both engines load
        from random_checkpoint import build_in_subprocess

        rc = build_in_subprocess(cfg, Path(a.random_weights), timeout=max(60.0, end - time.time() - 60))
        if rc:
            p.error(f"random_checkpoint.py exited {rc}")
        a.model, a.load_format = a.random_weights, "auto"
    if a.load_format != "dummy" and not a.model:
        p.error("--load-format auto reads a checkpoint's weights: give --model (or --random-weights)")
    workloads = [w for w in a.workloads.split(",") if w]
    engines = [e for e in a.engines.split(",") if e]
    for w in workloads:
        if w not in METRICS:
            p.error(f"unknown workload {w!r}")
    for e in engines:
        if e not in ENGINES:
            p.error(f"unknown engine {e!r}; known: {', '.join(ENGINES)}")
    tp = ThroughputSpec(num_requests=a.num_requests, input_len=a.input_len, output_len=a.output_len)
    lat = LatencySpec(batch_sizes=tuple(int(x) for x in a.latency_batches.split(",") if x),
                      input_len=a.latency_input_len, output_len=a.latency_output_len, repeats=a.latency_repeats)
    out_dir = Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    date = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")
    log = Log(out_dir / f"suite-{a.shape}.log.partial")
    log(f"bench_suite {a.shape} {workloads} engines={engines} budget {a.budget_s:.0f} s, date {date}")
    meta = {"commit": git_commit(), "versions": versions(), "command_line": [sys.executable] + sys.argv}
    log(json.dumps(meta))

    # 1. the two ceilings, in their own process so that this one never holds GPU memory
    tmp = Path(tempfile.mkdtemp(prefix="bench_suite_"))
    t = time.time()
    if a.bw_TBps and a.peak_TFLOPs:
        ceil = {"bw_TBps": a.bw_TBps, "peak_TFLOPs": a.peak_TFLOPs, "given": True, "gpu": a.gpu_name or "unknown"}
    else:
        rc = run_child(log, "roofline", [sys.executable, str(HERE / "roofline.py"), "--json", str(tmp / "ceil.json")],
                       time.time() + 120)
        ceil = json.loads((tmp / "ceil.json").read_text()) if (tmp / "ceil.json").exists() else {
            "error": f"roofline.py exited {rc}"}
    log.phase("roofline", time.time() - t)
    smi = meta["versions"].get("nvidia_smi", "").splitlines()
    gpu = ceil.get("gpu") or a.gpu_name or (smi[0].split(",")[0].strip() if smi else "") or "unknown-gpu"

    # 2. each engine in its own process, moeserve first
    partials: dict[str, tuple[dict | None, int | None]] = {}
    common = [*(["--model", a.model] if a.model else ["--shape", a.shape]),
              "--num-requests", str(tp.num_requests), "--input-len", str(tp.input_len),
              "--output-len", str(tp.output_len), "--latency-batches", ",".join(map(str, lat.batch_sizes)),
              "--latency-input-len", str(lat.input_len), "--latency-output-len", str(lat.output_len)]
    for i, eng in enumerate(engines):
        rest = engines[i + 1:]
        wl_e = engine_workloads(eng, workloads)
        if not wl_e:
            log(f"--- {eng}: runs none of {workloads}, skipped")
            continue
        hard = end - (a.hf_reserve_s if "transformers" in rest else 0) - 5
        peers_after = sum(1 for e in rest if e != "transformers" and engine_workloads(e, workloads))
        if peers_after:  # moeserve and vLLM share what is left evenly, so that both get to run
            hard = time.time() + (hard - time.time()) / (1 + peers_after)
        soft = hard - 20  # the worker starts no run it expects to end after this
        argv_ = [sys.executable, str(HERE / ENGINES[eng]), *common, "--workloads", ",".join(wl_e),
                 "--deadline", f"{soft:.1f}", "--out", str(tmp / f"{eng}.json")]
        if eng in ("moeserve", "vllm"):  # the same prompts, lengths, seeds and limits for both
            argv_ += ["--load-format", a.load_format, "--latency-repeats", str(a.latency_repeats),
                      "--max-num-seqs", str(a.max_num_seqs),
                      "--gpu-memory-utilization", str(a.gpu_memory_utilization), *traffic.forward_args(a)]
            for kv in (a.engine_arg if eng == "moeserve" else a.vllm_engine_arg):
                argv_ += ["--engine-arg", kv]
        else:
            argv_ += ["--latency-repeats", str(a.hf_latency_repeats), "--hf-batch-sizes", a.hf_batch_sizes,
                      "--hf-cb-requests", str(a.hf_cb_requests)]
        for x in a.worker_extra:
            who, _, arg = x.partition(":")
            if who == eng:
                argv_ += arg.split()
        meta.setdefault("engine_command_lines", {})[eng] = argv_
        t = time.time()
        if hard - t < 30:
            log(f"!!! {eng} not run: {hard - t:.0f} s left")
            partials[eng] = ({"engine": eng, "status": "not run", "error": "no time left in the suite's budget"}, None)
            continue
        rc = run_child(log, eng, argv_, hard)
        f = tmp / f"{eng}.json"
        partials[eng] = (json.loads(f.read_text()) if f.exists() else None, rc)
        log.phase(eng, time.time() - t)

    # 3. one JSON per workload, the log beside each
    written = []
    tr_specs = dict(zip(traffic.TRAFFIC, traffic.traffic_specs(a)))
    for w in workloads:
        stem = result_stem(date, gpu, a.shape, w)
        if w in tr_specs:
            spec = spec_dict(tr_specs[w])
        else:
            spec = vars(tp) if w == "throughput" else {**vars(lat), "batch_sizes": list(lat.batch_sizes)}
        res = {
            "schema": 1,
            "date": date,
            "gpu": gpu,
            **meta["commit"],
            "shape": a.shape,
            "model": shape.hub_id,
            "workload": w,
            "dtype": checkpoint_precision(cfg),
            "load_format": a.load_format,
            "spec": spec,
            "versions": meta["versions"],
            "command_line": meta["command_line"],
            "engine_command_lines": meta.get("engine_command_lines", {}),
            "engines": {e: engine_result(w, *partials[e]) for e in engines if w in engine_workloads(e, workloads)},
        }
        ms = res["engines"].get("moeserve") if w == "throughput" else None
        res["roofline"] = roofline_section(w, cfg, ceil, tp, lat, ms, a.gpu_memory_utilization, a.max_num_seqs)
        res["suite_elapsed_s"] = round(time.time() - t_start, 1)
        validate(res)
        atomic_write_json(out_dir / f"{stem}.json", res)
        written.append(out_dir / f"{stem}.json")
    log.phase("total", time.time() - t_start)
    import report

    for path in written:
        log(f"wrote {path}")
    log(report.summary([json.loads(x.read_text()) for x in written]))
    log.f.close()
    for path in written:
        shutil.copyfile(log.path, path.with_suffix(".log"))
    log.path.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    failed = [e for r in written for e, m in json.loads(r.read_text())["engines"].items() if m.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
