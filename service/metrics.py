"""Prometheus metrics (one registry per app, so tests can build several apps).

Names follow Prometheus conventions (base units, `_total`, `_seconds`); histogram buckets follow
vLLM's. Cache hit/miss counters live on the `CachedRetriever` and are read at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from retrieval.types import Passage, Retriever

LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0)
TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
# vLLM's inter-token latency buckets
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
RETRIEVAL_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "searchagent_requests", "Finished HTTP requests.", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "searchagent_request_duration_seconds",
            "End-to-end request latency.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "searchagent_time_to_first_token_seconds",
            "Time to the first streamed token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.searches = Histogram(
            "searchagent_searches_per_request",
            "Searches made per agent run.",
            buckets=(0, 1, 2, 3, 4, 6, 8, 12, 16),
            registry=r,
        )
        self.retrieval = Histogram(
            "searchagent_retrieval_duration_seconds",
            "Retrieval latency per search call.",
            ["backend"],
            buckets=RETRIEVAL_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "searchagent_prompt_tokens", "Prompt tokens processed.", registry=r
        )
        self.generated_tokens = Counter(
            "searchagent_generation_tokens", "Tokens sampled by the model.", registry=r
        )
        self.retrieved_tokens = Counter(
            "searchagent_retrieved_tokens", "Document tokens injected by the loop.", registry=r
        )
        self.inter_token = Histogram(
            "searchagent_inter_token_latency_seconds",
            "Time between consecutive streamed deltas of one run.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.running = Gauge("searchagent_requests_running", "Agent runs in progress.", registry=r)
        self.waiting = Gauge(
            "searchagent_requests_waiting",
            "Generation requests queued for a slot (max_running_requests).",
            registry=r,
        )
        self.rejected = Counter(
            "searchagent_requests_rejected",
            "Generation requests refused with 429: every slot taken and the queue full.",
            registry=r,
        )
        self.blank_queries = Counter(
            "searchagent_retrieve_blank_queries",
            "Blank queries in a /retrieve or /queries batch, answered with no passages.",
            registry=r,
        )
        self.stream_errors = Counter(
            "searchagent_stream_errors",
            "Streams ended by an error frame after their 200 (engine_error: the model server).",
            ["type"],
            registry=r,
        )

    def watch_cache(self, cached: object) -> None:
        self.registry.register(_CacheCollector(cached))

    def timed(self, retriever: Retriever, backend: str) -> Retriever:
        return _TimedRetriever(retriever, self.retrieval.labels(backend=backend))


class _TimedRetriever:
    def __init__(self, inner: Retriever, histogram) -> None:
        self._inner = inner
        self._histogram = histogram

    async def search(self, queries: list[str], k: int) -> list[list[Passage]]:
        start = time.perf_counter()
        try:
            return await self._inner.search(queries, k)
        finally:
            self._histogram.observe(time.perf_counter() - start)


class _CacheCollector(Collector):
    def __init__(self, cached: object) -> None:
        self._cached = cached

    def collect(self) -> Iterator[CounterMetricFamily]:
        cached = self._cached
        errors = getattr(cached, "cache_errors", 0) + getattr(
            getattr(cached, "cache", None), "errors", 0
        )
        for name, value, doc in (
            ("searchagent_cache_hits", getattr(cached, "hits", 0), "Retrieval cache hits."),
            ("searchagent_cache_misses", getattr(cached, "misses", 0), "Retrieval cache misses."),
            ("searchagent_cache_errors", errors, "Cache operations that failed and were bypassed."),
        ):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], float(value))
            yield family
