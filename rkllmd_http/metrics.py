"""GET /metrics: what the gateway served and how fast, in Prometheus' text format."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from rkllmctl.client import GenerationResult

CONTENT_TYPE = CONTENT_TYPE_LATEST
# From a fast cache hit on the CPU backend to a long prompt on a loaded board.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Seconds per output token: 200 tokens/s down to 1 token/s.
DECODE_BUCKETS = (0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)


class Metrics:
    """One registry per gateway (not the process-global one: tests run several)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("rkllmd_http_requests", "HTTP requests answered, by route and status", ("route", "status"), registry=r)
        self.generations = Counter("rkllmd_http_generations", "generations ended, by API and finish reason", ("api", "finish_reason"), registry=r)
        self.tokens = Counter("rkllmd_http_tokens", "tokens of the generations served: prompt (cached ones included), cached, completion", ("kind",), registry=r)
        self.cache = Counter("rkllmd_http_prompt_cache", "generations by what their prompt's prefix came from: text_cache, conversation (a kept state) or miss (prefilled it all)", ("result",), registry=r)
        self.ttft = Histogram("rkllmd_http_ttft_seconds", "time from the HTTP request to its first token, as the gateway saw it", buckets=TTFT_BUCKETS, registry=r)
        self.decode = Histogram("rkllmd_http_time_per_output_token_seconds", "decode time per completion token after the first (daemon's stats)", buckets=DECODE_BUCKETS, registry=r)
        self.embeddings = Counter("rkllmd_http_embeddings", "inputs embedded, by API", ("api",), registry=r)
        self.embedding_tokens = Counter("rkllmd_http_embedding_tokens", "tokens of the inputs embedded", registry=r)
        self.in_flight = Gauge("rkllmd_http_generations_in_flight", "generations this gateway is following now", registry=r)
        self.queue_depth = Gauge("rkllmd_queue_depth", "generations waiting in the daemon's queue (all clients), at scrape time", registry=r)
        self.daemon_up = Gauge("rkllmd_up", "1 when the daemon answered the scrape's status request", registry=r)

    def generation_ended(self, api: str, result: GenerationResult, ttft_s: float | None) -> None:
        self.generations.labels(api, result.finish_reason).inc()
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        stats = result.stats
        if not stats:
            return
        self.tokens.labels("prompt").inc(stats["prompt_tokens"])
        self.tokens.labels("cached").inc(stats["cached_tokens"])
        self.tokens.labels("completion").inc(stats["completion_tokens"])
        source = stats.get("cache_source") if stats["cached_tokens"] else None
        self.cache.labels(source["kind"] if source else "miss").inc()
        if stats["completion_tokens"] > 1:
            self.decode.observe(stats["decode_ms"] / 1000 / (stats["completion_tokens"] - 1))

    def embedded(self, api: str, result: dict) -> None:
        self.embeddings.labels(api).inc(len(result["embeddings"]))
        self.embedding_tokens.inc(result["total_tokens"])

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
