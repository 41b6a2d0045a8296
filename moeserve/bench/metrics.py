"""The report of one benchmark step, with `vllm bench serve`'s definitions.

- TTFT: send to first text chunk. E2E (e2el): send to end of stream.
- TPOT, per request with more than one output token: (E2E - TTFT) / (output_tokens - 1), so the first token is
  excluded; the statistics run over requests.
- ITL: every gap between successive text chunks of every request, pooled.
- request throughput: completed requests / duration; output throughput: output tokens / duration; total token
  throughput: (prompt + output tokens) / duration; duration: first send to last completion.
- goodput: completed requests meeting every SLO (ttft, tpot, e2el in ms; a request with one output token has
  no TPOT and meets a TPOT SLO) / duration. SLO attainment: those requests / all requests sent, so a failed
  request counts against it. With no SLO, attainment is the fraction that completed.
Times are reported in milliseconds: mean, median, p90, p99 (numpy's linear percentiles, as vLLM).
"""

from __future__ import annotations

import numpy as np

from moeserve.bench.client import RequestResult

SLO_KEYS = ("ttft", "tpot", "e2el")
PERCENTILES = (90, 99)


def parse_goodput(items: list[str] | None) -> dict[str, float]:
    """['ttft:2000', 'tpot:50'] -> {'ttft': 2000.0, 'tpot': 50.0} (milliseconds)."""
    slo = {}
    for item in items or []:
        key, sep, value = item.partition(":")
        if not sep or key not in SLO_KEYS:
            raise ValueError(f"--goodput takes KEY:MS with KEY one of {', '.join(SLO_KEYS)}; got {item!r}")
        ms = float(value)
        if not ms > 0:
            raise ValueError(f"--goodput {item}: the SLO must be a positive number of milliseconds")
        slo[key] = ms
    return slo


def tpot_of(r: RequestResult) -> float | None:
    return (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else None


def meets_slo(r: RequestResult, slo: dict[str, float]) -> bool:
    if not r.success:
        return False
    if "ttft" in slo and r.ttft * 1e3 > slo["ttft"]:
        return False
    if "e2el" in slo and r.latency * 1e3 > slo["e2el"]:
        return False
    tpot = tpot_of(r)
    return not ("tpot" in slo and tpot is not None and tpot * 1e3 > slo["tpot"])


def _stats(name: str, seconds: list[float]) -> dict[str, float]:
    ms = np.asarray(seconds, dtype=float) * 1e3 if seconds else np.zeros(1)
    out = {f"mean_{name}_ms": float(ms.mean()), f"median_{name}_ms": float(np.median(ms)),
           f"std_{name}_ms": float(ms.std())}
    for p in PERCENTILES:
        out[f"p{p}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def summarize(results: list[RequestResult], duration_s: float, slo: dict[str, float]) -> dict:
    ok = [r for r in results if r.success]
    good = [r for r in ok if meets_slo(r, slo)]
    duration_s = max(duration_s, 1e-9)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    report = {
        "num_requests": len(results), "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.success})[:5],
        "duration_s": duration_s, "total_input_tokens": prompt_tokens, "total_output_tokens": output_tokens,
        "usage_from_server": bool(ok) and all(r.usage_given for r in ok),
        "request_throughput": len(ok) / duration_s, "output_throughput": output_tokens / duration_s,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration_s,
        "slo_ms": dict(slo), "good_requests": len(good), "request_goodput": len(good) / duration_s,
        "slo_attainment": len(good) / len(results) if results else 0.0,
    }
    report.update(_stats("ttft", [r.ttft for r in ok]))
    report.update(_stats("tpot", [t for r in ok if (t := tpot_of(r)) is not None]))
    report.update(_stats("itl", [g for r in ok for g in r.itl]))
    report.update(_stats("e2el", [r.latency for r in ok]))
    return report


def format_report(rep: dict, title: str) -> str:
    lines = [f"{'=' * 18} {title} {'=' * 18}"]
    def row(label, value):
        lines.append(f"{label:<40}{value:>14}")
    row("Successful requests:", rep["completed"])
    row("Failed requests:", rep["failed"])
    row("Benchmark duration (s):", f"{rep['duration_s']:.2f}")
    row("Total input tokens:", rep["total_input_tokens"])
    row("Total generated tokens:", rep["total_output_tokens"])
    row("Request throughput (req/s):", f"{rep['request_throughput']:.2f}")
    row("Output token throughput (tok/s):", f"{rep['output_throughput']:.2f}")
    row("Total token throughput (tok/s):", f"{rep['total_token_throughput']:.2f}")
    if rep["slo_ms"]:
        row("Request goodput (req/s):", f"{rep['request_goodput']:.2f}")
    row("SLO attainment:", f"{rep['slo_attainment']:.1%}")
    for name, label in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append(f"{'-' * 15}{label}{'-' * 15}")
        for stat in ("mean", "median", "p90", "p99"):
            row(f"{stat.capitalize() if stat[0] != 'p' else stat.upper()} {name.upper()} (ms):",
                f"{rep[f'{stat}_{name}_ms']:.2f}")
    for e in rep["errors"]:
        lines.append(f"error: {e}")
    return "\n".join(lines)
