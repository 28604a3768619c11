"""Prometheus series per upstream of every remote pool, read from the pools at scrape time.

`llmservice_upstream_{requests,failures,retries}_total`, `llmservice_upstream_in_flight`,
`llmservice_upstream_healthy`, `llmservice_upstream_breaker_open` and the histogram
`llmservice_upstream_attempt_seconds` (one attempt, from pick to its end: a stream's whole length),
labelled by tier and upstream (its URL without credentials). A remote tier's pool, and a local tier's
spill-over pool, appear once the tier is loaded (a remote tier loads on its first request).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from remote.pool import CLOSED, LATENCY_BUCKETS, Pool

if TYPE_CHECKING:
    from model_manager import ModelManager

PREFIX = "llmservice_upstream"


class UpstreamCollector(Collector):
    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def describe(self) -> list[Any]:
        return []  # unchecked collector: its families are produced at collect time

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        labels = ["tier", "upstream"]
        counters = {
            name: CounterMetricFamily(f"{PREFIX}_{name}", meaning, labels=labels)
            for name, meaning in (
                ("requests", "Attempts sent to the upstream"),
                ("failures", "Attempts that ended in an upstream fault"),
                ("retries", "Attempts that were a retry after another upstream's fault"),
            )
        }
        in_flight = GaugeMetricFamily(f"{PREFIX}_in_flight", "Attempts in flight on the upstream", labels=labels)
        healthy = GaugeMetricFamily(f"{PREFIX}_healthy", "1 unless its last health probe failed", labels=labels)
        broken = GaugeMetricFamily(f"{PREFIX}_breaker_open", "1 while its breaker is open or half-open", labels=labels)
        latency = HistogramMetricFamily(
            f"{PREFIX}_attempt_seconds", "Time from picking the upstream to the attempt's end", labels=labels
        )
        for name, rt in self.manager.tiers.items():
            pool = getattr(rt.worker, "pool", None)
            if not isinstance(pool, Pool):
                continue
            for u in pool.snapshot():
                key = [name, u.label]
                counters["requests"].add_metric(key, float(u.requests))
                counters["failures"].add_metric(key, float(u.failures))
                counters["retries"].add_metric(key, float(u.retries))
                in_flight.add_metric(key, float(u.in_flight))
                healthy.add_metric(key, 1.0 if u.healthy else 0.0)
                broken.add_metric(key, 0.0 if u.state == CLOSED else 1.0)
                cumulative, buckets = 0, []
                for bound, count in zip(LATENCY_BUCKETS, u.latency_counts, strict=True):
                    cumulative += count
                    buckets.append((repr(bound), float(cumulative)))
                finished = u.requests - u.in_flight
                buckets.append(("+Inf", float(finished)))
                latency.add_metric(key, buckets, u.latency_sum)
        yield from counters.values()
        yield from (in_flight, healthy, broken, latency)
