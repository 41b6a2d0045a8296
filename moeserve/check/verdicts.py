"""One pure function per checklist item: measured numbers in, a PASS / FAIL / SKIP verdict out.

Nothing here talks to a server; `moeserve.check.runner` measures and these judge, so every verdict is tested
with synthetic numbers, failing cases included.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"

# what an operator's dashboard and alerts read (moeserve/server/metrics.py); counters carry `_total`
REQUIRED_METRICS = (
    "moeserve:num_requests_running", "moeserve:num_requests_waiting", "moeserve:kv_cache_usage_perc",
    "moeserve:num_preemptions_total", "moeserve:prompt_tokens_total", "moeserve:generation_tokens_total",
    "moeserve:time_to_first_token_seconds_bucket", "moeserve:inter_token_latency_seconds_bucket",
    "moeserve:e2e_request_latency_seconds_bucket", "moeserve:request_queue_time_seconds_bucket",
)


@dataclass
class CheckResult:
    name: str
    status: str
    measured: str = ""
    threshold: str = ""
    detail: str = ""

    def line(self) -> str:
        s = f"{self.status:<5} {self.name:<22}"
        if self.measured:
            s += f" {self.measured}"
        if self.threshold:
            s += f" (threshold {self.threshold})"
        if self.detail:
            s += f" - {self.detail}"
        return s

    def to_dict(self) -> dict:
        return asdict(self)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile (a length that 99% of the requests do not exceed)."""
    if not values:
        return 0.0
    s = sorted(values)
    return float(s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))])


def ready_verdict(status_code: int | None) -> CheckResult:
    if status_code == 200:
        return CheckResult("ready", PASS, "GET /ready 200")
    return CheckResult("ready", FAIL, f"GET /ready {status_code if status_code is not None else 'no answer'}",
                       "200")


def metrics_present_verdict(names: set[str], required=REQUIRED_METRICS) -> CheckResult:
    missing = [m for m in required if m not in names]
    measured = f"{len(required) - len(missing)}/{len(required)} metrics"
    if missing:
        return CheckResult("metrics-present", FAIL, measured, "all", "missing: " + ", ".join(missing))
    return CheckResult("metrics-present", PASS, measured, "all")


def max_model_len_verdict(server_max_model_len: int | None, seq_lens: list[int], pct: float = 99.0) -> CheckResult:
    """The server's max_model_len against the p99 of the workload's prompt + output lengths."""
    if server_max_model_len is None:
        return CheckResult("max-model-len", SKIP, detail="the server does not report max_model_len in /v1/models")
    if not seq_lens:
        return CheckResult("max-model-len", SKIP, detail="no workload given")
    need = percentile(seq_lens, pct)
    status = PASS if server_max_model_len >= need else FAIL
    return CheckResult("max-model-len", status, f"max_model_len {server_max_model_len}",
                       f">= p{pct:g} prompt+output {need:.0f} tokens")


def plan_fit_verdict(plan: dict | None, concurrency: int, seq_len: float, reason: str = "") -> CheckResult:
    """The planner's weights + KV at `concurrency` sequences of `seq_len` tokens (p99 of the workload) fit:
    `plan` is Plan.to_dict()'s placement numbers ({"fits", "kv_capacity_tokens"})."""
    if plan is None:
        return CheckResult("plan-fit", SKIP, detail=reason or "no plan (give --gpus, and --plan-model with --url)")
    need = int(math.ceil(concurrency * seq_len))
    cap = int(plan.get("kv_capacity_tokens", 0))
    if not plan.get("fits", False):
        return CheckResult("plan-fit", FAIL, f"KV capacity {cap} tokens", f">= {need} tokens",
                           "the planner says weights + overhead + one sequence do not fit")
    status = PASS if cap >= need else FAIL
    return CheckResult("plan-fit", status, f"planned KV capacity {cap} tokens",
                       f">= {concurrency} seqs x {seq_len:.0f} tokens = {need}")


def kv_usage_verdict(max_usage: float | None, limit: float = 0.95) -> CheckResult:
    """The KV usage that /metrics reported at the ramp's peak (what the planner's capacity is checked against)."""
    if max_usage is None:
        return CheckResult("kv-usage-under-load", SKIP, detail="no moeserve:kv_cache_usage_perc sample")
    status = PASS if max_usage <= limit else FAIL
    return CheckResult("kv-usage-under-load", status, f"peak {max_usage:.1%}", f"<= {limit:.0%}")


def plan_vs_server_verdict(predicted_usage: float | None, observed_usage: float | None,
                           tolerance: float = 0.25) -> CheckResult:
    """The planner's KV usage prediction for the tokens in flight at the peak against what /metrics saw: the
    plan is trusted only when the server's pool is at least as large as planned (observed <= predicted + tol)."""
    if predicted_usage is None or observed_usage is None:
        return CheckResult("plan-vs-metrics", SKIP, detail="needs a plan and KV usage samples")
    status = PASS if observed_usage <= predicted_usage + tolerance else FAIL
    return CheckResult("plan-vs-metrics", status, f"observed {observed_usage:.1%} vs planned {predicted_usage:.1%}",
                       f"observed <= planned + {tolerance:.0%}",
                       "" if status == PASS else "the server's KV pool is smaller than the plan assumes")


def no_5xx_verdict(steps: list[dict]) -> CheckResult:
    if not steps:
        return CheckResult("ramp-no-5xx", SKIP, detail="no ramp ran")
    n5 = sum(s.get("num_5xx", 0) for s in steps)
    sent = sum(s.get("num_requests", 0) for s in steps)
    return CheckResult("ramp-no-5xx", PASS if n5 == 0 else FAIL, f"{n5} 5xx of {sent} requests", "0")


def preemption_verdict(preemptions: float | None, requests: int, max_per_request: float = 0.1) -> CheckResult:
    """A preemption storm: more preemptions over the ramp than `max_per_request` per request sent."""
    if preemptions is None:
        return CheckResult("no-preemption-storm", SKIP, detail="no moeserve:num_preemptions_total in /metrics")
    rate = preemptions / max(requests, 1)
    status = PASS if rate <= max_per_request else FAIL
    return CheckResult("no-preemption-storm", status, f"{preemptions:.0f} preemptions / {requests} requests "
                       f"= {rate:.2f}", f"<= {max_per_request:g} per request")


def slo_verdict(steps: list[dict], min_attainment: float = 0.9) -> CheckResult:
    """No latency collapse: every ramp step keeps SLO attainment (completion, without --goodput) above the bar."""
    if not steps:
        return CheckResult("no-latency-collapse", SKIP, detail="no ramp ran")
    worst = min(steps, key=lambda s: s["slo_attainment"])
    status = PASS if worst["slo_attainment"] >= min_attainment else FAIL
    per_step = ", ".join(f"{s['load']}: {s['slo_attainment']:.0%}" for s in steps)
    what = "SLO attainment" if steps[0].get("slo_ms") else "completion (no --goodput)"
    errors = sorted({e for s in steps for e in s.get("errors", [])})
    if errors:
        per_step += "; errors: " + " | ".join(e[:160] for e in errors[:3])
    return CheckResult("no-latency-collapse", status, f"worst {what} {worst['slo_attainment']:.1%}",
                       f">= {min_attainment:.0%}", per_step)


def health_verdict(codes: list[int | None]) -> CheckResult:
    if not codes:
        return CheckResult("health-under-load", SKIP, detail="no probe ran")
    bad = [c for c in codes if c != 200]
    status = PASS if not bad else FAIL
    detail = "" if not bad else "non-200: " + ", ".join(sorted({str(c) for c in bad}))
    return CheckResult("health-under-load", status, f"{len(codes) - len(bad)}/{len(codes)} probes 200", "all",
                       detail)


def kv_capacity_verdict(planned_tokens: int | None, served_tokens: int | None, tolerance: float = 0.05,
                        reason: str = "") -> CheckResult:
    """The KV pool the server really allocated (moeserve:cache_config_info) against the planner's capacity for
    the same deployment: the plan may not promise more than is there (served >= planned x (1 - tolerance))."""
    if planned_tokens is None or not served_tokens:
        why = reason or ("the server does not publish moeserve:cache_config_info" if not served_tokens
                         else "no plan")
        return CheckResult("kv-capacity-vs-plan", SKIP, detail=why)
    ratio = served_tokens / planned_tokens
    status = PASS if ratio >= 1 - tolerance else FAIL
    return CheckResult("kv-capacity-vs-plan", status,
                       f"{served_tokens:,} tokens served vs {planned_tokens:,} planned ({ratio:.1%})",
                       f">= {1 - tolerance:.0%} of the plan",
                       "" if status == PASS else "the planner promises more KV than the server holds: "
                                                 "concurrency sized from the plan will preempt")


def layout_verdict(expected: dict[str, int], reported: dict[str, int] | None) -> CheckResult:
    """TP / EP / PP / DP as asked, read back from the server (`expected` holds only the sizes asked for)."""
    if not expected:
        return CheckResult("layout", SKIP, detail="no --expect-tp/--expect-pp/--expect-dp/--expect-ep given")
    if reported is None:
        return CheckResult("layout", SKIP, detail="the server does not report its parallel layout")
    wrong = {k: (v, reported.get(k)) for k, v in expected.items() if reported.get(k) != v}
    measured = " ".join(f"{k.upper()}={reported.get(k)}" for k in expected)
    asked = " ".join(f"{k.upper()}={v}" for k, v in expected.items())
    return CheckResult("layout", FAIL if wrong else PASS, measured, asked)


def expert_imbalance_verdict(per_layer: dict[str, float] | None, limit: float = 4.0) -> CheckResult:
    """Max over MoE layers of moeserve:expert_load_imbalance (max/mean tokens per expert)."""
    if not per_layer:
        return CheckResult("expert-imbalance", SKIP,
                           detail="no moeserve:expert_load_imbalance (dense model or --expert-load-telemetry off)")
    layer, worst = max(per_layer.items(), key=lambda kv: kv[1])
    status = PASS if worst <= limit else FAIL
    return CheckResult("expert-imbalance", status, f"max {worst:.2f} (layer {layer})", f"<= {limit:g}")


def exit_code(results: list[CheckResult]) -> int:
    return 1 if any(r.status == FAIL for r in results) else 0
