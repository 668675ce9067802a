"""Prometheus metrics with vLLM's meanings under the `lmport:` prefix.

Engine state (running/waiting requests, KV-cache usage, prefix-cache queries/hits, token counters, preemptions) is
read from the engine's stats at scrape time, so it is always current and counts every request the engine saw.
Per-request results (success by finish reason, TTFT, inter-token latency, end-to-end latency, queue time) are
observed as requests finish. Each server has its own registry (tests run several servers in one process).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's bucket boundaries, so dashboards built for vLLM read these the same way
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)

# engine stats key -> (metric name, kind, help)
_ENGINE_METRICS = (
    ("num_running", "lmport:num_requests_running", "gauge", "Requests in the running batch."),
    ("num_waiting", "lmport:num_requests_waiting", "gauge", "Requests waiting to be scheduled."),
    ("kv_cache_usage", "lmport:kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (1 = full)."),
    ("prefix_cache_queries", "lmport:prefix_cache_queries", "counter",
     "Prompt tokens looked up in the prefix cache."),
    ("prefix_cache_hits", "lmport:prefix_cache_hits", "counter", "Prompt tokens found in the prefix cache."),
    ("prompt_tokens_total", "lmport:prompt_tokens", "counter", "Prompt tokens of admitted requests."),
    ("generation_tokens_total", "lmport:generation_tokens", "counter", "Generated tokens."),
    ("num_preemptions", "lmport:num_preemptions", "counter", "Sequences preempted (recomputed later)."),
)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], dict[str, Any] | None], model_name: str) -> None:
        self._stats = stats
        self._model = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if not stats:
            return  # still loading: nothing to report yet
        for key, name, kind, doc in _ENGINE_METRICS:
            if key not in stats:
                continue
            family_cls = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            family = family_cls(name, doc, labels=["model_name"])
            family.add_metric([self._model], float(stats[key]))
            yield family


class ServerMetrics:
    def __init__(self, model_name: str, stats: Callable[[], dict[str, Any] | None]) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry(auto_describe=True)
        labels = ["model_name"]
        self.request_success = Counter("lmport:request_success", "Finished completions by finish reason "
                                       "(stop, length, abort).", labels + ["finished_reason"], registry=self.registry)
        self.ttft = Histogram("lmport:time_to_first_token_seconds", "Arrival to first generated token.", labels,
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("lmport:inter_token_latency_seconds", "Time between successive tokens of a completion.",
                             labels, buckets=ITL_BUCKETS, registry=self.registry)
        self.e2e = Histogram("lmport:e2e_request_latency_seconds", "Arrival to finish.", labels,
                             buckets=REQUEST_BUCKETS, registry=self.registry)
        self.queue = Histogram("lmport:request_queue_time_seconds", "Arrival to first scheduled.", labels,
                               buckets=REQUEST_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(stats, model_name))

    def observe_itl(self, gap_s: float, tokens: int = 1) -> None:
        for _ in range(tokens):
            self.itl.labels(self.model_name).observe(gap_s / max(tokens, 1))

    def observe_finished(self, metrics: dict[str, Any] | None, finish_reasons: list[str]) -> None:
        """One finished engine request: its completions' finish reasons and its RequestMetrics (as a dict)."""
        for reason in finish_reasons:
            self.request_success.labels(self.model_name, reason).inc()
        if not metrics:
            return
        arrival = metrics.get("arrival_time")
        if arrival is None:
            return
        for hist, key in ((self.ttft, "first_token_time"), (self.e2e, "finished_time"),
                          (self.queue, "first_scheduled_time")):
            value = metrics.get(key)
            if value is not None:
                hist.labels(self.model_name).observe(max(0.0, value - arrival))

    def render(self) -> bytes:
        return generate_latest(self.registry)
