"""Read a server's /metrics, /health, /ready and /v1/models; start `moeserve serve` for a check and stop it."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import httpx

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedForCheck:
    """`moeserve serve MODEL FLAGS` on a free localhost port, waited for until GET /ready is 200, stopped with
    SIGTERM (the drain) on the way out."""

    def __init__(self, serve_args: list[str], startup_timeout_s: float = 600.0):
        self.serve_args = list(serve_args)
        self.startup_timeout_s = startup_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix="moeserve-check-", suffix=".log", delete=False)

    def __enter__(self) -> "ServedForCheck":
        cmd = [sys.executable, "-m", "moeserve.cli", "serve", *self.serve_args, "--host", "127.0.0.1",
               "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=dict(os.environ))
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moeserve serve exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        raise TimeoutError(f"moeserve serve was not ready after {self.startup_timeout_s:.0f}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 4000) -> str:
        self.log.flush()
        with open(self.log.name, encoding="utf-8", errors="replace") as f:
            return f.read()[-chars:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self.log.close()
        try:
            os.unlink(self.log.name)
        except OSError:
            pass
