"""Prometheus metrics of one gateway process, served as text at ``GET /metrics``.

Each app has its own registry, so apps built side by side (tests, several gateways in one process) do not
mix their counts. With ``--workers N`` every worker counts for itself and a scrape reaches one of them; run
one gateway process per port (see the gateway guide) to scrape each.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from draft_rag.serve.compression import CompressionStats

COMPRESS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Seconds: a warm draft cache compresses in tens of milliseconds on a GPU, a cold CPU draft in seconds."""

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
"""Requests per batched engine call in engine mode."""


class Metrics:
    """The gateway's counters.

    Args:
        pending: returns the compressions waiting or running now (a gauge read at each scrape).
        loaded: returns whether the draft is loaded (a gauge read at each scrape).
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, pending: Callable[[], float], loaded: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("draft_rag_requests", "Requests answered, by route and status code.",
                                ["route", "status"], registry=self.registry)
        self.compressed = Counter("draft_rag_compressed_requests", "Requests whose documents SpecPC compressed.",
                                  registry=self.registry)
        self.compress_seconds = Histogram("draft_rag_compress_seconds", "Seconds SpecPC took per request.",
                                          buckets=COMPRESS_BUCKETS, registry=self.registry)
        self.tokens_before = Counter("draft_rag_context_tokens_before", "Tokens of document text received.",
                                     registry=self.registry)
        self.tokens_after = Counter("draft_rag_context_tokens_after", "Tokens of document text sent upstream.",
                                    registry=self.registry)
        self.cache_hits = Counter("draft_rag_cache_hits", "Draft cache lookups answered from memory or disk.",
                                  registry=self.registry)
        self.cache_misses = Counter("draft_rag_cache_misses", "Draft cache lookups that ran the draft.",
                                    registry=self.registry)
        self.upstream_errors = Counter(
            "draft_rag_upstream_errors",
            "Upstream failures: unreachable, timeout, status_4xx, status_5xx, invalid_response, stream_cut.",
            ["kind"], registry=self.registry)
        queue = Gauge("draft_rag_compression_queue", "Compressions waiting or running.", registry=self.registry)
        queue.set_function(pending)
        draft = Gauge("draft_rag_draft_loaded", "1 once the draft model is loaded.", registry=self.registry)
        draft.set_function(lambda: float(loaded()))

    def add_engine(self, waiting: Callable[[], float], running: Callable[[], float]) -> None:
        """Register engine mode's metrics: requests waiting for a batch and in the running one (gauges read at
        each scrape), the size of each batch, and the tokens read and generated."""
        self.batch_size = Histogram("draft_rag_engine_batch_size", "Requests answered together per engine call.",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("draft_rag_engine_prompt_tokens", "Prompt tokens the target read.",
                                     registry=self.registry)
        self.completion_tokens = Counter("draft_rag_engine_completion_tokens", "Tokens the target generated.",
                                         registry=self.registry)
        queue = Gauge("draft_rag_engine_queue", "Requests waiting for a batch.", registry=self.registry)
        queue.set_function(waiting)
        batch = Gauge("draft_rag_engine_running", "Requests in the batch running now.", registry=self.registry)
        batch.set_function(running)

    def batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def generated(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.completion_tokens.inc(completion_tokens)

    def request(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def compression(self, stats: CompressionStats) -> None:
        self.compressed.inc()
        self.compress_seconds.observe(stats.compress_s)
        self.tokens_before.inc(stats.context_tokens_before)
        self.tokens_after.inc(stats.context_tokens_after)
        self.cache_hits.inc(stats.cache_hits)
        self.cache_misses.inc(stats.cache_misses)

    def upstream_error(self, kind: str) -> None:
        self.upstream_errors.labels(kind=kind).inc()

    def render(self) -> bytes:
        """The metrics in Prometheus' text exposition format."""
        return generate_latest(self.registry)
