"""Read a server's /metrics, /health, /ready and /v1/models; start `moeserve serve` for a check and stop it."""

from __future__ import annotations

import re

_SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)')
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Prometheus text exposition to (name, labels, value) samples (comments skipped)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        try:
            value = float(m.group(3))
        except ValueError:
            continue
        out.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), value))
    return out


def metric_sum(samples, name: str) -> float | None:
    vals = [v for n, _, v in samples if n == name]
    return sum(vals) if vals else None


def metric_by_label(samples, name: str, label: str) -> dict[str, float]:
    return {lab.get(label, ""): v for n, lab, v in samples if n == name}


def metric_info(samples, name: str) -> dict[str, str] | None:
    """The labels of an info gauge (value 1, facts in the labels), e.g. moeserve:cache_config_info."""
    return next(({k: v for k, v in lab.items() if k != "model_name"} for n, lab, _ in samples if n == name), None)


def served_for_check(serve_args: list[str]):
    """`moeserve serve MODEL FLAGS` on a free localhost port, waited for until GET /ready is 200, stopped with
    SIGTERM (the drain) on the way out."""
    from moeserve.server.process import ServerProcess  # standard library only: no engine, no torch

    return ServerProcess(serve_args, startup_timeout_s=600.0, wait_path="/ready", stop_timeout_s=60.0)
