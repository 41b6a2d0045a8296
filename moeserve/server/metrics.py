"""GET /metrics: Prometheus text with vLLM's metric names and meanings under the prefix `moeserve:`, so a vLLM
dashboard ports by renaming `vllm:` to `moeserve:`.

Gauges and counters are read from the engine's own totals at scrape time; the latency histograms are observed by
the engine thread as outputs come out of each step (times are the engine's time.time() stamps).
"""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from moeserve.outputs import RequestOutput

PREFIX = "moeserve:"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0)
_REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)


class _EngineStatsCollector:
    """Scheduler gauges and token/preemption counters, straight from AsyncLLMEngine.stats."""

    def __init__(self, stats_source, model_name: str):
        self.stats_source = stats_source
        self.model_name = model_name

    def collect(self):
        s = self.stats_source()
        labels = [self.model_name]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name"])
            g.add_metric(labels, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name"])
            c.add_metric(labels, value)
            return c

        yield gauge("num_requests_running", "Number of requests in model execution batches.", s.num_running)
        yield gauge("num_requests_waiting", "Number of requests waiting to be processed.", s.num_waiting)
        yield gauge("kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", s.kv_cache_usage)
        yield counter("prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens_total)
        yield counter("generation_tokens", "Number of generation tokens processed.", s.generation_tokens_total)
        yield counter("num_preemptions", "Cumulative number of preemptions from the engine.",
                      s.num_preemptions_total)
        yield counter("prefix_cache_queries", "Prefix-cache queries, in blocks.", s.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prefix-cache hits, in blocks.", s.prefix_cache_hits)


class _ExpertLoadCollector:
    """Per MoE layer, over the telemetry window: imbalance (max / mean tokens per expert) and the hottest expert's
    share. Labelled by layer only (bounded: one series per MoE layer). Nothing when telemetry is off or dense."""

    def __init__(self, snapshot_source, model_name: str):
        self.snapshot_source = snapshot_source
        self.model_name = model_name

    def collect(self):
        snap = self.snapshot_source()
        if snap is None:
            return
        imbalance = GaugeMetricFamily(PREFIX + "expert_load_imbalance",
                                      "Tokens of the most loaded expert over the mean, per MoE layer (1 = even).",
                                      labels=["model_name", "layer"])
        hottest = GaugeMetricFamily(PREFIX + "expert_load_hottest_share",
                                    "Share of a MoE layer's routed tokens that went to its most loaded expert.",
                                    labels=["model_name", "layer"])
        for layer, ratio, share in snap.layer_stats():
            imbalance.add_metric([self.model_name, str(layer)], ratio)
            hottest.add_metric([self.model_name, str(layer)], share)
        yield imbalance
        yield hottest
        shares = snap.rank_shares()
        if shares:  # with EP: one series per rank (bounded by the layout)
            ranks = GaugeMetricFamily(PREFIX + "expert_load_rank_share",
                                      "Share of all routed tokens that went to the experts an EP rank holds.",
                                      labels=["model_name", "ep_rank"])
            for r, share in enumerate(shares):
                ranks.add_metric([self.model_name, str(r)], share)
            yield ranks

    def describe(self):
        return []  # series appear only with telemetry on; nothing to pre-declare


class _InfoCollector:
    """Constant facts as gauges of value 1 whose labels carry them (vLLM's `cache_config_info` form)."""

    def __init__(self, infos: dict[str, dict[str, str]], model_name: str):
        self.infos = infos
        self.model_name = model_name

    def collect(self):
        for name, facts in self.infos.items():
            g = GaugeMetricFamily(PREFIX + name, f"{name.replace('_', ' ')} of this server (labels).",
                                  labels=["model_name", *facts])
            g.add_metric([self.model_name, *facts.values()], 1.0)
            yield g


class ServerMetrics:
    """The registry behind /metrics; also the engine thread's StepObserver."""

    def __init__(self, stats_source, model_name: str, expert_load_source=None, config_info=None):
        disable_created_metrics()  # no `*_created` series: vLLM's exposition has none either
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineStatsCollector(stats_source, model_name))
        if config_info:
            self.registry.register(_InfoCollector(config_info, model_name))
        if expert_load_source is not None:
            self.registry.register(_ExpertLoadCollector(expert_load_source, model_name))
        labels = ["model_name"]

        def hist(name, doc, buckets):
            return Histogram(PREFIX + name, doc, labels, buckets=buckets, registry=self.registry).labels(model_name)

        self.ttft = hist("time_to_first_token_seconds", "Histogram of time to first token in seconds.",
                         _TTFT_BUCKETS)
        self.itl = hist("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.", _ITL_BUCKETS)
        self.e2e = hist("e2e_request_latency_seconds", "Histogram of end to end request latency in seconds.",
                        _REQUEST_BUCKETS)
        self.queue = hist("request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.",
                          _REQUEST_BUCKETS)
        self._success = Counter(PREFIX + "request_success", "Count of successfully processed requests.",
                                labels + ["finished_reason"], registry=self.registry)
        self.model_name = model_name
        self._last: dict[str, tuple[int, float]] = {}  # request id -> (tokens seen, time of the last new token)
        self._lock = threading.Lock()

    # -- StepObserver (engine thread) --
    def on_outputs(self, outputs: list[RequestOutput], now: float) -> None:
        with self._lock:
            for out in outputs:
                self._observe(out, now)

    def on_abort(self, request_id: str) -> None:
        with self._lock:
            self._last.pop(request_id, None)
        self._success.labels(self.model_name, "abort").inc()

    def _observe(self, out: RequestOutput, now: float) -> None:
        m = out.metrics
        tokens = sum(len(c.token_ids) for c in out.outputs)
        seen, last_time = self._last.get(out.request_id, (0, 0.0))
        if tokens > seen:
            if seen == 0 and m is not None:
                first = m.first_token_time or now
                self.ttft.observe(max(0.0, first - m.arrival_time))
                if m.first_scheduled_time is not None:
                    self.queue.observe(max(0.0, m.first_scheduled_time - m.arrival_time))
            elif seen > 0:
                self.itl.observe(max(0.0, now - last_time))
            self._last[out.request_id] = (tokens, now)
        if out.finished:
            self._last.pop(out.request_id, None)
            if m is not None:
                self.e2e.observe(max(0.0, (m.finished_time or now) - m.arrival_time))
            reason = out.outputs[0].finish_reason if out.outputs else None
            self._success.labels(self.model_name, reason or "stop").inc()

    # -- HTTP --
    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
