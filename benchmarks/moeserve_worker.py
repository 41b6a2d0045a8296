"""moeserve on the pinned workloads, in its own process (the parent, bench_suite.py, collects the JSON).

Order, so that a run stopped at the deadline still has something of each workload: one latency round over
every batch size, then the throughput workload, then the remaining latency repeats while time allows, then the
traffic workloads (varlen, longctx, prefix: benchmarks/traffic.py, the same code as vLLM's worker).
"""

from __future__ import annotations

import json
import time

import traffic
from worker_common import (Partial, base_parser, fit_throughput, latency_table, require_device,
                           summarize_latency_runs, worker_plan)
from workloads import latency_prompts, median, throughput_prompts


def build_llm(a, p: Partial):
    from moeserve import LLM

    kwargs = dict(model=a.model or _hub_id(a.shape), load_format=a.load_format, dtype=a.dtype,
                  max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
                  gpu_memory_utilization=a.gpu_memory_utilization, seed=0)
    kwargs.update(traffic.engine_kwargs(a.engine_arg))
    p.data["engine_args"] = {k: v for k, v in kwargs.items()}
    t = time.perf_counter()
    llm = LLM(**kwargs)
    p.phase("startup", time.perf_counter() - t)
    eng = getattr(llm, "llm_engine", None)
    report = getattr(eng, "memory_report", None)
    if callable(report):
        try:
            p.data["memory_report"] = _jsonable(report())
        except Exception as e:  # a report is nice to have, never a reason to stop
            p.note(f"memory_report() failed: {e!r}")
    return llm


def _hub_id(shape: str) -> str:
    from shapes import get_shape

    return get_shape(shape).hub_id


def _jsonable(obj):
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        obj = asdict(obj)
    return json.loads(json.dumps(obj, default=str))


def _params(max_tokens: int | list[int]):
    from moeserve import SamplingParams

    if isinstance(max_tokens, list):  # one per prompt; equal lengths share one object
        cache: dict[int, SamplingParams] = {}
        return [cache.setdefault(n, _params(n)) for n in max_tokens]
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)


def times_of(out) -> tuple[float, float] | None:
    """(TTFT s, e2e s) of one request from moeserve's RequestOutput.metrics, from its arrival."""
    m = out.metrics
    if m is None or m.first_token_time is None or m.finished_time is None:
        return None
    return m.first_token_time - m.arrival_time, m.finished_time - m.arrival_time


def _generate(llm, prompts, max_tokens: int, device):
    from worker_common import sync

    reqs = [{"prompt_token_ids": ids} for ids in prompts]
    sync(device)
    t = time.perf_counter()
    outs = llm.generate(reqs, _params(max_tokens))
    sync(device)
    wall = time.perf_counter() - t
    traffic.check_lengths(outs, prompts, max_tokens)
    return outs, wall


def latency_run(llm, spec, batch: int, repeat: int, vocab: int, device) -> dict:
    prompts = latency_prompts(spec, batch, repeat, vocab)
    outs, e2e = _generate(llm, prompts, spec.output_len, device)
    run = {"repeat": repeat, "e2e_ms": 1e3 * e2e}
    ms = [o.metrics for o in outs]
    if all(m is not None and m.first_token_time is not None and m.finished_time is not None for m in ms):
        run["ttft_ms"] = median([1e3 * (m.first_token_time - m.arrival_time) for m in ms])
        run["tpot_ms"] = median([1e3 * (m.finished_time - m.first_token_time) / (spec.output_len - 1) for m in ms])
        run["timing"] = "request metrics"
    else:  # no per-request times: TTFT from a one-token run of the same prompts, TPOT from the rest
        _, ttft = _generate(llm, latency_prompts(spec, batch, repeat + 10_000, vocab), 1, device)
        run["ttft_ms"] = 1e3 * ttft
        run["tpot_ms"] = 1e3 * (e2e - ttft) / (spec.output_len - 1)
        run["timing"] = "wall clock: e2e of the batch and a max_tokens=1 run"
    run["decode_step_ms"] = run["tpot_ms"]  # all requests of the batch decode together: a step per token
    return run


def run_latency_round(llm, lat, vocab, device, p: Partial, per_batch: dict, repeat: int) -> bool:
    for b in lat.batch_sizes:
        last = per_batch.get(b, {}).get("runs", [])
        need = 1.3 * (last[-1]["e2e_ms"] / 1e3 if last else 0.0)
        if p.time_left() < need + 5:
            p.note(f"latency batch {b} repeat {repeat} skipped: {p.time_left():.0f} s left before the deadline")
            return False
        t = time.perf_counter()
        run = latency_run(llm, lat, b, repeat, vocab, device)
        per_batch[b] = summarize_latency_runs(last + [run])
        p.data["latency"] = {**latency_table(per_batch), "spec": p.data["latency"]["spec"],
                             "per_batch": {str(k): v for k, v in per_batch.items()}}
        p.phase(f"latency_b{b}_r{repeat}", time.perf_counter() - t)
    return True


def run_throughput(llm, tp, lat, vocab, device, p: Partial, per_batch: dict, max_num_seqs: int) -> None:
    kv_tokens = (p.data.get("memory_report") or {}).get("kv_capacity_tokens")
    conc = max_num_seqs if not kv_tokens else max(1, min(max_num_seqs, int(kv_tokens) // (tp.input_len + tp.output_len)))
    tp = fit_throughput(tp, lat, per_batch, conc, p)
    n = tp.num_requests
    prompts = throughput_prompts(tp, vocab)
    outs, wall = _generate(llm, prompts, tp.output_len, device)
    res = {
        "num_requests": n,
        "input_len": tp.input_len,
        "output_len": tp.output_len,
        "wall_s": wall,
        "output_tok_s": n * tp.output_len / wall,
        "total_tok_s": n * (tp.input_len + tp.output_len) / wall,
        "concurrency_limit": conc,
    }
    ms = [o.metrics for o in outs]
    if all(m is not None and m.first_token_time is not None for m in ms):
        ttft = sorted(1e3 * (m.first_token_time - m.arrival_time) for m in ms)
        res["ttft_ms_p50"] = median(ttft)
    p.data["throughput"] = {**p.data["throughput"], **res}
    p.phase("throughput", wall)


def main(argv=None) -> int:
    ap = base_parser(__doc__)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-model-len", type=int, default=0, help="0: the longest workload's input + output")
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    ap.add_argument("--engine-arg", action="append", default=[], help="extra LLM(...) keyword, key=value (JSON value)")
    ap.add_argument("--vocab-size", type=int, default=0, help="0: from the shape's config")
    traffic.add_args(ap)
    a = ap.parse_args(argv)
    wl, tp, lat = worker_plan(ap, a)
    p = Partial(a.out, "moeserve", a.deadline)
    device = require_device(a.allow_cpu)
    vocab = a.vocab = a.vocab_size or _vocab(a)
    p.data.update(device=str(device), workloads=wl, vocab_size=vocab)
    traffic.start_sections(p, wl, a)
    from workloads import spec_dict

    if "throughput" in wl:
        p.data["throughput"] = {"spec": spec_dict(tp)}
    if "latency" in wl:
        p.data["latency"] = {"spec": spec_dict(lat), "timing": "median over requests per run, median over runs"}
    try:
        llm = build_llm(a, p)
        t = time.perf_counter()  # warm-up: compile / autotune outside the timed runs
        warm_in = tp.input_len if "throughput" in wl else lat.input_len
        warm_out = max(1, min(4, a.max_model_len - warm_in))
        _generate(llm, latency_prompts(lat, 2, -1, vocab), max(1, min(4, a.max_model_len - lat.input_len)), device)
        _generate(llm, latency_prompts(type(lat)(input_len=warm_in), min(16, a.max_num_seqs), -2, vocab),
                  warm_out, device)
        p.phase("warmup", time.perf_counter() - t)
        per_batch: dict = {}
        if "latency" in wl:
            run_latency_round(llm, lat, vocab, device, p, per_batch, 0)
        if "throughput" in wl:
            run_throughput(llm, tp, lat, vocab, device, p, per_batch, a.max_num_seqs)
        if "latency" in wl:
            for r in range(1, lat.repeats):
                if not run_latency_round(llm, lat, vocab, device, p, per_batch, r):
                    break
        traffic.run_traffic(wl, lambda prompts, n: _generate(llm, prompts, n, device), times_of, a, p)
    except Exception as e:
        import traceback

        traceback.print_exc()
        p.data["error"] = f"{type(e).__name__}: {e}"
        p.save()
        return 1
    p.done()
    return 0


def _vocab(a) -> int:
    if a.model:
        from pathlib import Path

        return int(json.loads((Path(a.model) / "config.json").read_text())["vocab_size"])
    from shapes import get_shape, load_config

    return int(load_config(get_shape(a.shape))["vocab_size"])


if __name__ == "__main__":
    raise SystemExit(main())
