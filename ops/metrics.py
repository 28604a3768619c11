"""Prometheus metrics: one registry per app (no globals), served at `GET /metrics`.

Request counters and histograms are recorded by `request_context.RequestContext` when a response
ends. Tier state (loaded, memory, in flight, queue) is read from the model manager at scrape time,
so it is never stale. The response cache reports through `Metrics.cache_hit` / `cache_miss`, or
through `request_context.note_cache` / the `X-Cache` header, which the middleware counts. A request
with an API key is also counted under the key's name (`llmservice_key_*`): never the secret. Each Redis
use (cache, rate limits, sessions) reports its state and counters at scrape time (`llmservice_redis_*`).
`observe_request` also feeds the admin API's JSON analytics (ops/analytics.py): one call, one count.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from middleware.request_info import RequestInfo
from ops.analytics import Analytics, Sample, counts_as_api

if TYPE_CHECKING:
    from model_manager import ModelManager

PREFIX = "llmservice"
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RATE_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0)


# Each Redis use's status (scale/redis_link.py `FailOpen.status`, plus a tier's own counters), by use.
RedisStatus = Callable[[], Mapping[str, Mapping[str, object]]]


class Metrics:
    def __init__(self, manager: ModelManager | None = None, redis: RedisStatus | None = None) -> None:
        self.analytics = Analytics()  # the admin API's JSON windows, fed by observe_request below
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        labels = ["tier", "endpoint", "status"]
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests by tier, endpoint and status", labels, registry=r)
        self.latency = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Time from request arrival to the last byte of the response",
            ["tier", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time from request arrival to the first generated text",
            ["tier", "endpoint"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens processed", ["tier"], registry=r)
        self.generated_tokens = Counter(
            f"{PREFIX}_generated_tokens", "Completion tokens generated", ["tier"], registry=r
        )
        self.tokens_per_second = Histogram(
            f"{PREFIX}_tokens_per_second",
            "Generation speed of each request (completion tokens / generation time)",
            ["tier"],
            buckets=RATE_BUCKETS,
            registry=r,
        )
        self.cache_hits = Counter(f"{PREFIX}_cache_hits", "Response cache hits", ["tier", "endpoint"], registry=r)
        self.cache_misses = Counter(f"{PREFIX}_cache_misses", "Response cache misses", ["tier", "endpoint"], registry=r)
        # Per API key name (never the secret); only requests that carried a valid key.
        self.key_requests = Counter(
            f"{PREFIX}_key_requests", "Requests by API key name and status", ["key", "status"], registry=r
        )
        self.key_tokens = Counter(
            f"{PREFIX}_key_tokens", "Tokens by API key name, prompt or completion", ["key", "kind"], registry=r
        )
        self.key_latency = Histogram(
            f"{PREFIX}_key_request_duration_seconds",
            "Time from request arrival to the last byte, by API key name",
            ["key"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        ProcessCollector(registry=r)  # process_resident_memory_bytes, CPU seconds, open fds (Linux)
        if manager is not None:
            from ops.upstream_metrics import UpstreamCollector  # remote pools, per upstream

            r.register(TierCollector(manager))
            r.register(UpstreamCollector(manager))
        if redis is not None:
            r.register(RedisCollector(redis))

    # ------------------------------------------------------------ recording

    def observe_request(self, tier: str, endpoint: str, status: int, duration: float, info: RequestInfo) -> None:
        self.requests.labels(tier, endpoint, str(status)).inc()
        self.latency.labels(tier, endpoint).observe(duration)
        if info.ttft is not None:
            self.ttft.labels(tier, endpoint).observe(info.ttft)
        if info.prompt_tokens:
            self.prompt_tokens.labels(tier).inc(info.prompt_tokens)
        if info.completion_tokens:
            self.generated_tokens.labels(tier).inc(info.completion_tokens)
        if info.tokens_per_second is not None:
            self.tokens_per_second.labels(tier).observe(info.tokens_per_second)
        if info.cache_hits:
            self.cache_hit(tier, endpoint, info.cache_hits)
        if info.cache_misses:
            self.cache_miss(tier, endpoint, info.cache_misses)
        if info.key_name:
            self._observe_key(info.key_name, status, duration, info)
        if counts_as_api(endpoint):
            sample = Sample(status, duration, info.prompt_tokens, info.completion_tokens, info.compute_seconds)
            self.analytics.record(tier, info.key_name, sample)

    def _observe_key(self, key: str, status: int, duration: float, info: RequestInfo) -> None:
        self.key_requests.labels(key, str(status)).inc()
        self.key_latency.labels(key).observe(duration)
        if info.prompt_tokens:
            self.key_tokens.labels(key, "prompt").inc(info.prompt_tokens)
        if info.completion_tokens:
            self.key_tokens.labels(key, "completion").inc(info.completion_tokens)

    def cache_hit(self, tier: str, endpoint: str, count: int = 1) -> None:
        """Hook for the response cache (also fed by `request_context.note_cache` and `X-Cache`)."""
        self.cache_hits.labels(tier, endpoint).inc(count)

    def cache_miss(self, tier: str, endpoint: str, count: int = 1) -> None:
        self.cache_misses.labels(tier, endpoint).inc(count)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _memory(status: dict[str, Any], model_path: str) -> tuple[float, str] | None:
    """A loaded tier's memory in bytes and where the number comes from.

    The lifecycle manager reports `memory: {"estimated_bytes", "rss_delta_bytes"}`; a flat
    `memory_bytes` is read too; else the model file's size stands in.
    """
    nested = status.get("memory")
    if isinstance(nested, dict):
        for key, source in (("estimated_bytes", "estimate"), ("rss_delta_bytes", "rss_delta")):
            if isinstance(nested.get(key), int | float) and nested[key] > 0:
                return float(nested[key]), source
    if isinstance(status.get("memory_bytes"), int | float):
        return float(status["memory_bytes"]), "estimate"
    if model_path and os.path.isfile(model_path):
        return float(os.path.getsize(model_path)), "file_size"
    return None


class TierCollector(Collector):
    """Reads tier state from the model manager at each scrape."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def describe(self) -> list[Any]:
        return []  # unchecked collector: its families are produced at collect time

    def collect(self) -> Iterator[GaugeMetricFamily]:
        loaded = GaugeMetricFamily(
            f"{PREFIX}_model_loaded", "1 when the tier's model is loaded", labels=["tier", "backend", "model"]
        )
        state = GaugeMetricFamily(f"{PREFIX}_tier_state", "1 for the tier's current state", labels=["tier", "state"])
        memory = GaugeMetricFamily(
            f"{PREFIX}_model_memory_bytes", "Memory of each loaded model", labels=["tier", "source"]
        )
        in_flight = GaugeMetricFamily(f"{PREFIX}_in_flight_requests", "Requests holding the tier", labels=["tier"])
        queue = GaugeMetricFamily(f"{PREFIX}_queue_depth", "Requests waiting for a slot", labels=["tier"])
        active = GaugeMetricFamily(f"{PREFIX}_active_sequences", "Requests being computed", labels=["tier"])
        # The lifecycle manager's detailed status adds memory; the core manager has status only.
        status_of = getattr(self.manager, "detailed_status", self.manager.status)
        for name, rt in self.manager.tiers.items():
            status = status_of(name)
            ready = status.get("state") == "ready"
            loaded.add_metric([name, rt.config.backend, rt.config.model_id], 1.0 if ready else 0.0)
            state.add_metric([name, str(status.get("state", "unknown"))], 1.0)
            in_flight.add_metric([name], float(status.get("in_flight", 0)))
            queue.add_metric([name], float(status.get("queued", 0) or 0))
            active.add_metric([name], float(status.get("active", 0) or 0))
            found = _memory(status, rt.config.model_path) if ready else None
            if found is not None:
                memory.add_metric([name, found[1]], found[0])
        yield from (loaded, state, memory, in_flight, queue, active)


class RedisCollector(Collector):
    """Reads each Redis use's state and counters at each scrape."""

    COUNTERS = (
        ("errors", "Failed Redis calls (each one bypasses Redis for a cooldown)"),
        ("bypassed", "Calls that skipped Redis during a cooldown"),
        ("hits", "Response cache entries found in Redis"),
        ("misses", "Response cache entries looked up in Redis and not found"),
    )

    def __init__(self, status: RedisStatus) -> None:
        self.status = status

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        up = GaugeMetricFamily(f"{PREFIX}_redis_up", "1 while Redis answers (0: bypassed or failing)", labels=["use"])
        counters = {
            name: CounterMetricFamily(f"{PREFIX}_redis_{name}", meaning, labels=["use"])
            for name, meaning in self.COUNTERS
        }
        for use, status in self.status().items():
            up.add_metric([use], 1.0 if status.get("state") == "ok" else 0.0)
            for name, family in counters.items():
                value = status.get(name)
                if isinstance(value, int | float):
                    family.add_metric([use], float(value))
        yield up
        yield from counters.values()


router = APIRouter()


@router.get("/metrics", include_in_schema=False)
async def metrics_endpoint(request: Request) -> Response:
    # Not `api.state.app_state`: api imports ops, so ops reads the typed state without importing api.
    metrics: Metrics = request.app.state.llm.metrics
    return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)
