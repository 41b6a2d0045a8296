"""Measure what the checklist judges: /ready, /metrics, /v1/models, the workload's lengths, a load ramp up to
2x the stated peak (moeserve.bench's run_step, one step per load) with /health and /metrics probed while it
runs, and, with --gpus, the planner's numbers. The verdicts are moeserve.check.verdicts'."""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

import httpx

from moeserve.bench.datasets import BenchRequest, jsonl_requests, random_requests
from moeserve.bench.runner import Target, run_step
from moeserve.check import verdicts as v
from moeserve.check.probe import metric_by_label, metric_info, metric_sum, parse_metrics


@dataclass
class CheckConfig:
    url: str                                  # http://host:port (no /v1)
    api_key: str | None = None
    model: str | None = None                  # name sent; default the first of /v1/models
    endpoint: str = "completions"
    peak_concurrency: int | None = None
    peak_qps: float | None = None
    ramp_factors: tuple[float, ...] = (0.5, 1.0, 2.0)
    num_prompts: int | None = None            # per step; default 4x the step's concurrency (or 10 s of arrivals)
    workload: str | None = None               # JSONL of prompts / conversations
    input_len: int = 128
    output_len: int = 64
    slo: dict = field(default_factory=dict)   # --goodput
    min_slo_attainment: float = 0.9
    max_preemptions_per_request: float = 0.1
    max_kv_usage: float = 0.95
    max_expert_imbalance: float = 4.0
    plan_model: str | None = None
    gpus: str | None = None
    nodes: int = 1
    expect_layout: dict = field(default_factory=dict)   # {"tp": 2, "ep": 8, ...}
    probe_interval_s: float = 0.25
    seed: int = 0


def _headers(cfg: CheckConfig) -> dict:
    return {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}


def _get(cfg: CheckConfig, path: str, timeout: float = 10.0) -> httpx.Response | None:
    try:
        return httpx.get(cfg.url.rstrip("/") + path, headers=_headers(cfg), timeout=timeout)
    except httpx.HTTPError:
        return None


def ramp_loads(cfg: CheckConfig) -> list[dict]:
    """One step per ramp factor: {"concurrency": c} (closed loop of c users) or {"rate": r} (Poisson)."""
    if cfg.peak_concurrency:
        cs = sorted({max(1, round(f * cfg.peak_concurrency)) for f in cfg.ramp_factors})
        return [{"concurrency": c, "rate": math.inf,
                 "num_prompts": cfg.num_prompts or max(8, 4 * c), "load": f"concurrency {c}"} for c in cs]
    if cfg.peak_qps:
        rs = sorted({f * cfg.peak_qps for f in cfg.ramp_factors})
        return [{"concurrency": None, "rate": r, "num_prompts": cfg.num_prompts or max(8, math.ceil(10 * r)),
                 "load": f"{r:g} req/s"} for r in rs]
    return []


def workload_requests(cfg: CheckConfig, n: int, seed: int) -> list[BenchRequest]:
    if cfg.workload:
        return jsonl_requests(cfg.workload, n, cfg.output_len, seed=seed, shuffle=seed > 0)
    return random_requests(n, cfg.input_len, cfg.output_len, seed=seed)


def workload_seq_lens(cfg: CheckConfig, tokens_per_word: float = 1.0) -> list[int]:
    """prompt + output lengths of the workload in tokens: prompt words times the server tokenizer's measured
    tokens per word (the check has no tokenizer of its own), plus max_tokens."""
    reqs = jsonl_requests(cfg.workload, None, cfg.output_len) if cfg.workload else \
        workload_requests(cfg, 200, cfg.seed)
    return [math.ceil(r.prompt_len * tokens_per_word) + r.output_len for r in reqs]


def tokens_per_word(cfg: CheckConfig, model: str, max_model_len: int | None) -> float | None:
    """Send the workload's first words (64, or max_model_len / 8 when that is less) with max_tokens 1 and read
    usage.prompt_tokens."""
    n_words = max(4, min(64, (max_model_len or 512) // 8))
    words = " ".join((r.prompt or " ".join(str(m.get("content", "")) for m in r.messages or []))
                     for r in workload_requests(cfg, 4, cfg.seed)).split()[:n_words]
    body = {"model": model, "prompt": " ".join(words), "max_tokens": 1, "temperature": 0}
    try:
        r = httpx.post(cfg.url.rstrip("/") + "/v1/completions", json=body, headers=_headers(cfg), timeout=60)
        n = int(r.json()["usage"]["prompt_tokens"]) if r.status_code == 200 else 0
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        return None
    return n / len(words) if n and words else None


def count_5xx(step: dict) -> int:
    """bench keeps distinct error messages only: all failures when every message is a 5xx, else a lower bound."""
    errs = step.get("errors", [])
    five = [e for e in errs if e.startswith("HTTP 5")]
    if five and len(five) == len(errs):
        return step.get("failed", len(five))
    return len(five)


class Monitor:
    """Polls /health and /metrics while a step runs."""

    def __init__(self, cfg: CheckConfig):
        self.cfg = cfg
        self.health_codes: list[int | None] = []
        self.kv_usage: list[float] = []
        self.running: list[float] = []

    async def run(self, stop: asyncio.Event) -> None:
        base = self.cfg.url.rstrip("/")
        async with httpx.AsyncClient(timeout=5.0, headers=_headers(self.cfg)) as client:
            while not stop.is_set():
                try:
                    self.health_codes.append((await client.get(base + "/health")).status_code)
                except httpx.HTTPError:
                    self.health_codes.append(None)
                try:
                    samples = parse_metrics((await client.get(base + "/metrics")).text)
                    if (u := metric_sum(samples, "moeserve:kv_cache_usage_perc")) is not None:
                        self.kv_usage.append(u)
                    if (r := metric_sum(samples, "moeserve:num_requests_running")) is not None:
                        self.running.append(r)
                except httpx.HTTPError:
                    pass
                try:
                    await asyncio.wait_for(stop.wait(), self.cfg.probe_interval_s)
                except asyncio.TimeoutError:
                    pass


async def run_ramp_monitored(cfg: CheckConfig, target: Target, monitor: Monitor, progress: bool) -> list[dict]:
    steps = []
    for i, load in enumerate(ramp_loads(cfg)):
        stop = asyncio.Event()
        probe = asyncio.create_task(monitor.run(stop))
        try:
            rep = await run_step(target, workload_requests(cfg, load["num_prompts"], cfg.seed + i),
                                 request_rate=load["rate"], max_concurrency=load["concurrency"], slo=cfg.slo,
                                 seed=cfg.seed + i, label=load["load"], progress=progress)
        finally:
            stop.set()
            await probe
        rep["load"] = load["load"]
        rep["num_5xx"] = count_5xx(rep)
        steps.append(rep)
    return steps


def make_plan_numbers(cfg: CheckConfig, max_model_len: int | None, concurrency: int,
                      cache_info: dict[str, str] | None = None) -> tuple[dict | None, str]:
    """The planner's numbers for this deployment, at the server's own precisions when /metrics says them."""
    model = cfg.plan_model
    if not (model and cfg.gpus):
        return None, "no plan: give --gpus (and --plan-model with --url)"
    from moeserve.plan.planner import PlanRequest, make_plan   # no torch
    try:
        served = cache_info or {}
        precision = {"dtype": served["quantization"]} if served.get("quantization", "none") != "none" else {}
        plan = make_plan(PlanRequest(model=model, gpus=cfg.gpus, nodes=cfg.nodes, max_model_len=max_model_len,
                                     concurrency=max(concurrency, 1),
                                     kv_cache_dtype=served.get("kv_cache_dtype", "auto"), **precision))
    except (ValueError, FileNotFoundError, KeyError) as e:
        return None, f"the planner cannot size {model}: {e}"
    p = plan.placement
    return {"fits": p.fits, "kv_capacity_tokens": p.kv_capacity_tokens, "max_concurrency": p.max_concurrency,
            "layout": {"tp": p.layout.tp, "pp": p.layout.pp, "ep": p.layout.ep, "dp": p.layout.dp}}, ""


_LAYOUT_KEYS = {"tp": "tensor_parallel_size", "pp": "pipeline_parallel_size", "dp": "data_parallel_size",
                "ep": "expert_parallel_size"}


def reported_layout(models_json: dict | None, parallel_info: dict[str, str] | None = None) -> dict | None:
    """The parallel sizes the server reports: moeserve's /metrics info gauge (moeserve:parallel_config_info), or
    fields of its /v1/models entry where a server puts them there."""
    if parallel_info:
        return {k: int(parallel_info[name]) for k, name in _LAYOUT_KEYS.items() if name in parallel_info} or None
    if not models_json or not models_json.get("data"):
        return None
    entry = models_json["data"][0]
    found = {k: entry[name] for k, name in _LAYOUT_KEYS.items() if name in entry}
    return found or None


def server_kv_capacity(cache_info: dict[str, str] | None, layout: dict | None) -> int | None:
    """Tokens of KV the whole server holds: one rank's pool (moeserve:cache_config_info) times its DP ranks."""
    if not cache_info or "kv_capacity_tokens" not in cache_info:
        return None
    return int(cache_info["kv_capacity_tokens"]) * int((layout or {}).get("dp", 1))


def run_checks(cfg: CheckConfig, progress: bool = False) -> tuple[list[v.CheckResult], dict]:
    results: list[v.CheckResult] = []
    raw: dict = {"url": cfg.url}

    r = _get(cfg, "/ready")
    results.append(v.ready_verdict(r.status_code if r is not None else None))

    r = _get(cfg, "/metrics")
    before = parse_metrics(r.text) if r is not None and r.status_code == 200 else []
    results.append(v.metrics_present_verdict({n for n, _, _ in before}))

    r = _get(cfg, "/v1/models")
    models = r.json() if r is not None and r.status_code == 200 else None
    entry = models["data"][0] if models and models.get("data") else {}
    server_max_len = entry.get("max_model_len")
    model = cfg.model or entry.get("id")
    raw["model"], raw["max_model_len"] = model, server_max_len

    ratio = tokens_per_word(cfg, model, server_max_len) if model else None
    seq_lens = workload_seq_lens(cfg, ratio or 1.0)
    p99_len = v.percentile(seq_lens, 99)
    raw["tokens_per_word"], raw["workload_p99_seq_len"] = ratio, p99_len
    res = v.max_model_len_verdict(server_max_len, seq_lens)
    res.detail = res.detail or (f"{ratio:.2f} tokens/word measured" if ratio else "1 token/word assumed")
    results.append(res)

    steps: list[dict] = []
    monitor = Monitor(cfg)
    if model and ramp_loads(cfg):
        target = Target(base_url=cfg.url.rstrip("/") + "/v1", model=model, endpoint=cfg.endpoint,
                        api_key=cfg.api_key, ignore_eos=True)
        t0 = time.perf_counter()
        steps = asyncio.run(run_ramp_monitored(cfg, target, monitor, progress))
        raw["ramp_s"] = time.perf_counter() - t0
    raw["steps"] = steps
    r = _get(cfg, "/metrics")
    after = parse_metrics(r.text) if r is not None and r.status_code == 200 else []

    no_ramp = "no ramp: give --peak-concurrency or --peak-qps"
    results.append(v.no_5xx_verdict(steps) if steps else v.CheckResult("ramp-no-5xx", v.SKIP, detail=no_ramp))
    p0 = metric_sum(before, "moeserve:num_preemptions_total")
    p1 = metric_sum(after, "moeserve:num_preemptions_total")
    preempted = p1 - p0 if p0 is not None and p1 is not None else None
    sent = sum(s["num_requests"] for s in steps)
    results.append(v.preemption_verdict(preempted, sent, cfg.max_preemptions_per_request) if steps
                   else v.CheckResult("no-preemption-storm", v.SKIP, detail=no_ramp))
    results.append(v.slo_verdict(steps, cfg.min_slo_attainment) if steps
                   else v.CheckResult("no-latency-collapse", v.SKIP, detail=no_ramp))
    results.append(v.health_verdict(monitor.health_codes) if steps
                   else v.CheckResult("health-under-load", v.SKIP, detail=no_ramp))

    peak_usage = max(monitor.kv_usage) if monitor.kv_usage else None
    results.append(v.kv_usage_verdict(peak_usage, cfg.max_kv_usage) if steps
                   else v.CheckResult("kv-usage-under-load", v.SKIP, detail=no_ramp))
    top_conc = max((s["max_concurrency"] or 0 for s in steps), default=0) or \
        int(max(monitor.running, default=0)) or (2 * (cfg.peak_concurrency or 1))
    cache_info = metric_info(before, "moeserve:cache_config_info")
    plan, why = make_plan_numbers(cfg, server_max_len, top_conc, cache_info)
    raw["plan"] = plan
    results.append(v.plan_fit_verdict(plan, top_conc, p99_len, why))
    predicted = None
    if plan and plan["kv_capacity_tokens"] and monitor.running:
        mean_len = sum(seq_lens) / len(seq_lens)
        predicted = min(1.0, max(monitor.running) * mean_len / plan["kv_capacity_tokens"])
    results.append(v.plan_vs_server_verdict(predicted, peak_usage) if plan else
                   v.CheckResult("plan-vs-metrics", v.SKIP, detail=why))

    reported = reported_layout(models, metric_info(before, "moeserve:parallel_config_info"))
    raw["reported_layout"] = reported
    served_kv = server_kv_capacity(cache_info, reported)
    raw["server_kv_capacity_tokens"] = served_kv
    if cache_info and cache_info.get("device") == "cpu":  # its pool is --kv-cache-memory-bytes, not a GPU's
        results.append(v.CheckResult("kv-capacity-vs-plan", v.SKIP, detail="the server runs on CPU; the plan is "
                                                                           "for GPUs"))
    else:
        results.append(v.kv_capacity_verdict(plan["kv_capacity_tokens"] if plan else None, served_kv,
                                             reason=why if not plan else ""))
    results.append(v.layout_verdict(cfg.expect_layout, reported))
    results.append(v.expert_imbalance_verdict(
        metric_by_label(after, "moeserve:expert_load_imbalance", "layer"), cfg.max_expert_imbalance))
    raw["kv_usage_samples"] = len(monitor.kv_usage)
    raw["peak_kv_usage"] = peak_usage
    raw["preemptions"] = preempted
    return results, raw
