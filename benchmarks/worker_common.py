"""What the engine workers (one subprocess per engine) share: arguments, the deadline, the partial-result file.

A worker writes its JSON after every measurement, so that a run the parent stops at the deadline still hands
back everything measured up to then, with what was skipped and why.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:  # the device has no `pip install -e .`: import moeserve from the checkout
    sys.path.insert(0, str(REPO))

import traffic  # noqa: E402
from results_io import atomic_write_json  # noqa: E402
from workloads import LatencySpec, ThroughputSpec, median  # noqa: E402


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--shape", help="pinned shape name (benchmarks/shapes.py)")
    p.add_argument("--model", help="instead of --shape: a local checkpoint folder with config.json (tests)")
    p.add_argument("--load-format", default="dummy",
                   help="dummy (random +-1e-3 weights, config.json only) or auto (--model's own weights)")
    p.add_argument("--workloads", default="throughput,latency")
    p.add_argument("--num-requests", type=int, default=ThroughputSpec.num_requests)
    p.add_argument("--input-len", type=int, default=ThroughputSpec.input_len, help="throughput input length")
    p.add_argument("--output-len", type=int, default=ThroughputSpec.output_len, help="throughput output length")
    p.add_argument("--latency-batches", default=",".join(map(str, LatencySpec.batch_sizes)))
    p.add_argument("--latency-input-len", type=int, default=LatencySpec.input_len)
    p.add_argument("--latency-output-len", type=int, default=LatencySpec.output_len)
    p.add_argument("--latency-repeats", type=int, default=LatencySpec.repeats)
    p.add_argument("--deadline", type=float, default=0.0, help="unix time by which to stop starting new runs")
    p.add_argument("--out", required=True, help="JSON file this worker (re)writes after every measurement")
    p.add_argument("--allow-cpu", action="store_true", help="tests only: run on the CPU with a tiny model")
    return p


def worker_plan(ap, a) -> tuple[list[str], ThroughputSpec, LatencySpec]:
    """Both engines' workers: check the arguments, size max_model_len for the longest workload (unless given),
    fit the warm-up prompts inside it. Returns (workloads, throughput spec, latency spec)."""
    if not (a.shape or a.model):
        ap.error("--shape or --model is required")
    if a.load_format != "dummy" and not a.model:
        ap.error(f"--load-format {a.load_format} reads a checkpoint's weights: give its folder as --model")
    wl = traffic.workloads_of(a)
    tp, lat = specs(a)
    if not a.max_model_len:
        a.max_model_len = max(tp.input_len + tp.output_len if "throughput" in wl else 0,
                              lat.input_len + lat.output_len if "latency" in wl else 0,
                              traffic.max_len_needed(wl, a))
    if "latency" in wl and max(lat.batch_sizes) > a.max_num_seqs:
        ap.error(f"latency batch {max(lat.batch_sizes)} exceeds --max-num-seqs {a.max_num_seqs}")
    if "latency" not in wl:  # warm-up prompts are latency-shaped: keep them inside max_model_len
        lat = traffic.fit_warmup(lat, a.max_model_len)
    if "throughput" not in wl:
        tp = traffic.fit_warmup(tp, a.max_model_len)
    return wl, tp, lat


def specs(a) -> tuple[ThroughputSpec, LatencySpec]:
    tp = ThroughputSpec(num_requests=a.num_requests, input_len=a.input_len, output_len=a.output_len)
    lat = LatencySpec(batch_sizes=tuple(int(x) for x in a.latency_batches.split(",") if x),
                      input_len=a.latency_input_len, output_len=a.latency_output_len, repeats=a.latency_repeats)
    return tp, lat


def workloads_of(a) -> list[str]:
    wl = [w.strip() for w in a.workloads.split(",") if w.strip()]
    bad = [w for w in wl if w not in ("throughput", "latency")]
    if bad or not wl:
        raise SystemExit(f"--workloads must name throughput and/or latency, got {a.workloads!r}")
    return wl


def require_device(allow_cpu: bool):
    """The torch device to run on; without CUDA this fails loudly unless a test asked for the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if allow_cpu:
        return torch.device("cpu")
    raise SystemExit("this benchmark needs a CUDA GPU and none is visible (torch.cuda.is_available() is False)")


def sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


class Partial:
    """The worker's result, saved to disk after every change."""

    def __init__(self, path: str, engine: str, deadline: float):
        self.path = path
        self.deadline = deadline
        self.t0 = time.time()
        self.data: dict = {"engine": engine, "status": "running", "notes": [], "phases_s": {}}
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.data)

    def note(self, msg: str) -> None:
        print(f"[{self.data['engine']}] {msg}", flush=True)
        self.data["notes"].append(msg)
        self.save()

    def phase(self, name: str, seconds: float) -> None:
        self.data["phases_s"][name] = round(seconds, 3)
        print(f"[{self.data['engine']}] phase {name}: {seconds:.1f} s (worker elapsed {time.time() - self.t0:.1f} s)",
              flush=True)
        self.save()

    def time_left(self) -> float:
        return float("inf") if not self.deadline else self.deadline - time.time()

    def done(self) -> None:
        self.data["status"] = "done"
        self.save()


def summarize_latency_runs(runs: list[dict]) -> dict:
    """Median over repeats of the per-run TTFT / TPOT / decode step (ms)."""
    out = {"repeats_done": len(runs), "runs": runs}
    for key in ("ttft_ms", "tpot_ms", "decode_step_ms", "e2e_ms"):
        vals = [r[key] for r in runs if r.get(key) is not None]
        if vals:
            out[key] = median(vals)
    return out


def latency_table(per_batch: dict) -> dict:
    """{batch: summary} -> the issue's shape: tpot_ms / ttft_ms / decode_step_ms keyed by batch as a string."""
    res = {"tpot_ms": {}, "ttft_ms": {}, "decode_step_ms": {}, "e2e_ms": {}, "repeats_done": {}}
    for b, s in per_batch.items():
        for key in ("tpot_ms", "ttft_ms", "decode_step_ms", "e2e_ms"):
            if key in s:
                res[key][str(b)] = s[key]
        res["repeats_done"][str(b)] = s["repeats_done"]
    return res


def estimate_throughput_s(tp: ThroughputSpec, lat_input_len: int, per_batch: dict, conc: int) -> float | None:
    """Rough time of the throughput workload from the latency runs (prefill rate and the largest batch's step)."""
    if not per_batch:
        return None
    b = max(per_batch)
    s = per_batch[b]
    if "tpot_ms" not in s or "ttft_ms" not in s:
        return None
    prefill_tok_s = b * lat_input_len / (s["ttft_ms"] / 1e3)
    step_s = s["tpot_ms"] / 1e3 * (1 + 0.3 * max(0.0, math.log2(conc / b)))
    return 1.3 * (tp.num_requests * tp.input_len / prefill_tok_s + math.ceil(tp.num_requests / conc) * tp.output_len * step_s)


def fit_throughput(tp: ThroughputSpec, lat: LatencySpec, per_batch: dict, conc: int, p: Partial) -> ThroughputSpec:
    """The throughput workload, cut to whole waves of `conc` requests when the estimate exceeds the time left;
    the decision is noted either way. Every engine's worker applies the same rule."""
    est = estimate_throughput_s(tp, lat.input_len, per_batch, conc)
    n = tp.num_requests
    if est is not None and est > p.time_left() - 10:
        n = min(n, max(conc, int(n * max(0.0, p.time_left() - 10) / est) // conc * conc))  # never more than asked
        p.note(f"throughput: estimated {est:.0f} s for {tp.num_requests} requests but {p.time_left():.0f} s left; "
               f"running {n} requests instead")
        tp = ThroughputSpec(num_requests=n, input_len=tp.input_len, output_len=tp.output_len, seed=tp.seed)
    p.note(f"throughput: {n} requests x ({tp.input_len} in, {tp.output_len} out), concurrency limit {conc}, "
           f"estimated {est if est is None else round(est)} s")
    return tp
