"""Where benchmark results live and how engines are added to them.

One JSON per (date, gpu, shape, workload): benchmarks/results/<YYYY-MM-DD>-<gpu>-<shape>-<workload>.json, the raw
log beside it with the same stem and `.log`. Standalone on purpose (no sibling imports), so that the peer
harnesses can load it by path:  merge_engine(path, "vllm", {"output_tok_s": ..., ...}).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REQUIRED_TOP = ("date", "gpu", "commit", "shape", "workload", "roofline", "engines")
METRICS = {"throughput": ("output_tok_s", "total_tok_s"), "latency": ("tpot_ms", "ttft_ms"),
           "varlen": ("output_tok_s", "total_tok_s"), "longctx": ("tpot_ms", "ttft_ms"),
           "prefix": ("output_tok_s", "total_tok_s")}
KEYED = ("latency", "longctx")  # metrics keyed by batch ("1") or by "<prompt length>x<batch>" ("8192x16")


def gpu_slug(gpu_name: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3': the device name, lower case, vendor dropped."""
    s = re.sub(r"^nvidia\s+", "", gpu_name.strip(), flags=re.I).lower()
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    if not s:
        raise ValueError(f"no usable GPU name in {gpu_name!r}")
    return s


def result_stem(date: str, gpu_name: str, shape: str, workload: str) -> str:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", date):
        raise ValueError(f"date must be YYYY-MM-DD, got {date!r}")
    return f"{date}-{gpu_slug(gpu_name)}-{shape}-{workload}"


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def validate(result: dict) -> None:
    """Raise ValueError if `result` lacks a field the issue requires."""
    missing = [k for k in REQUIRED_TOP if k not in result]
    if missing:
        raise ValueError(f"result lacks {missing}")
    wl = result["workload"]
    if wl not in METRICS:
        raise ValueError(f"unknown workload {wl!r}")
    roof = result["roofline"]
    for k in ("bw_TBps", "peak_TFLOPs"):
        if k not in roof:
            raise ValueError(f"roofline.{k} missing")
        ok = isinstance(roof[k], (int, float)) and roof[k] == roof[k]
        if not ok and not (roof[k] is None and roof.get("error")):  # null only beside the reason
            raise ValueError(f"roofline.{k} must be a number (or null with roofline.error)")
    if wl == "latency" and not isinstance(roof.get("decode_step_ms"), dict):
        raise ValueError("latency roofline needs decode_step_ms keyed by batch size")
    if not isinstance(result["engines"], dict):
        raise ValueError("engines must be an object")
    for name, m in result["engines"].items():
        _validate_engine(wl, name, m)


def _validate_engine(workload: str, name: str, m: dict) -> None:
    if not isinstance(m, dict):
        raise ValueError(f"engines.{name} must be an object")
    if m.get("error") and not any(k in m for k in METRICS[workload]):
        return  # an engine that failed says so and carries no figures
    for k in METRICS[workload]:
        if k not in m:
            raise ValueError(f"engines.{name} lacks {k}")
        if workload in KEYED:
            if not isinstance(m[k], dict) or not all(isinstance(b, str) for b in m[k]):
                raise ValueError(f"engines.{name}.{k} must be keyed by batch size as a string")
        elif not isinstance(m[k], (int, float)):
            raise ValueError(f"engines.{name}.{k} must be a number")


def load_result(path: str | os.PathLike) -> dict:
    with open(path) as f:
        return json.load(f)


def write_result(result: dict, out_dir: str | os.PathLike = RESULTS_DIR) -> Path:
    validate(result)
    path = Path(out_dir) / (result_stem(result["date"], result["gpu"], result["shape"], result["workload"]) + ".json")
    atomic_write_json(path, result)
    return path


def merge_engine(json_path: str | os.PathLike, engine_name: str, metrics: dict) -> dict:
    """Put `metrics` under engines[engine_name] of an existing result file (replacing an earlier entry)."""
    result = load_result(json_path)
    if not isinstance(metrics, dict):
        raise TypeError("metrics must be a dict")
    result.setdefault("engines", {})[engine_name] = metrics
    validate(result)
    atomic_write_json(json_path, result)
    return result
