"""Send the requests of one step (open-loop arrivals, optionally capped in concurrency) and ramp over rates.

Arrivals follow `vllm bench serve`: at `request_rate` R with burstiness B the gaps between sends are drawn from
a gamma distribution of shape B and mean 1/R (B = 1 is a Poisson process; B < 1 burstier, B > 1 more even);
R = inf sends everything at once. `max_concurrency` N caps the requests in flight (a closed loop of N users
when R is inf).

A ramp runs one step per rate and stops after the first step whose SLO attainment is below `collapse_below`
(default 0.5: fewer than half of the requests met every SLO, or, with no SLO, completed).
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from dataclasses import dataclass

import httpx
import numpy as np

from moeserve.bench.client import RequestResult, build_body, send_request
from moeserve.bench.datasets import BenchRequest
from moeserve.bench.metrics import summarize


@dataclass
class Target:
    base_url: str                 # http://host:port/v1
    model: str
    endpoint: str = "chat"        # chat | completions
    api_key: str | None = None
    temperature: float = 0.0
    ignore_eos: bool = False
    timeout_s: float = 6 * 3600.0

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + ("/chat/completions" if self.endpoint == "chat" else "/completions")

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def arrival_gaps(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Seconds to wait before each of n sends (the first one included)."""
    if burstiness <= 0:
        raise ValueError(f"--burstiness must be positive, got {burstiness}")
    if math.isinf(rate):
        return [0.0] * n
    if not rate > 0:
        raise ValueError(f"--request-rate must be positive, got {rate}")
    rng = np.random.default_rng(seed)
    return rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n).tolist()


class Progress:
    """One line on stderr, rewritten as requests finish (at most 10 times a second)."""

    def __init__(self, label: str, total: int, enabled: bool = True):
        self.label, self.total, self.enabled = label, total, enabled and sys.stderr.isatty()
        self.done = self.failed = self.in_flight = 0
        self.t0 = time.perf_counter()
        self._last = 0.0

    def update(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.enabled or (not force and now - self._last < 0.1):
            return
        self._last = now
        width = 30
        filled = int(width * self.done / max(self.total, 1))
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"in flight {self.in_flight} failed {self.failed} {now - self.t0:6.1f}s ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(force=True)
            sys.stderr.write("\n")


async def run_step(target: Target, requests: list[BenchRequest], *, request_rate: float = math.inf,
                   burstiness: float = 1.0, max_concurrency: int | None = None, slo: dict | None = None,
                   seed: int = 0, label: str = "bench", progress: bool = True) -> dict:
    gaps = arrival_gaps(len(requests), request_rate, burstiness, seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    prog = Progress(label, len(requests), progress)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=max_concurrency or 100)
    results: list[RequestResult] = []

    async def one(client: httpx.AsyncClient, req: BenchRequest) -> None:
        body = build_body(req, endpoint=target.endpoint, model=target.model, temperature=target.temperature,
                          ignore_eos=target.ignore_eos)
        if sem is not None:
            await sem.acquire()
        prog.in_flight += 1
        try:
            r = await send_request(client, target.url, body, target.headers, req.prompt_len)
        finally:
            prog.in_flight -= 1
            if sem is not None:
                sem.release()
        results.append(r)
        prog.done += 1
        prog.failed += not r.success
        prog.update(force=prog.done == prog.total)

    async with httpx.AsyncClient(timeout=httpx.Timeout(target.timeout_s), limits=limits) as client:
        t0 = time.perf_counter()
        tasks = []
        for gap, req in zip(gaps, requests):
            if gap > 0:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(one(client, req)))
        await asyncio.gather(*tasks)
        duration = time.perf_counter() - t0
    prog.close()
    report = summarize(results, duration, slo or {})
    report.update(request_rate=request_rate, burstiness=burstiness, max_concurrency=max_concurrency)
    return report


async def run_ramp(target: Target, make_requests, rates: list[float], *, collapse_below: float = 0.5,
                   on_step=None, **step_kw) -> dict:
    """`make_requests(step_index)` gives each step its requests; returns {"steps": [...], "stopped_at": rate|None}."""
    steps, stopped_at = [], None
    for i, rate in enumerate(rates):
        rep = await run_step(target, make_requests(i), request_rate=rate, label=f"rate {rate:g}", **step_kw)
        steps.append(rep)
        if on_step is not None:
            on_step(rep)
        if rep["slo_attainment"] < collapse_below:
            stopped_at = rate
            break
    return {"steps": steps, "stopped_at": stopped_at, "collapse_below": collapse_below}
