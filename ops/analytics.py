"""Request analytics for the admin API: requests, errors, tokens, tokens/s and latency (p50/p95) over the
last minute, hour and day, in total, per tier and per API key name (never the secret).

`Metrics.observe_request` (ops/metrics.py) feeds it in the same call that records the Prometheus series,
so a request is counted once. Everything is in memory and bounded: two rings of time buckets (1 s x 60
for the last minute, 60 s x 1,440 for the day), each bucket holding one `Tally` per series (the total,
each tier, each key name; at most MAX_KEY_SERIES names, later ones counted as OTHER_KEY). Latency is
counted in fixed log-spaced bins, so windows merge exactly and a percentile is within half a bin
(about 12 %) of the true value.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

# Window name -> seconds covered.
WINDOWS: dict[str, int] = {"minute": 60, "hour": 3600, "day": 86400}
# Steps of the time series each window's routes return (a few dozen to ~150 points).
SERIES_STEP: dict[str, int] = {"minute": 5, "hour": 60, "day": 600}
MAX_KEY_SERIES = 64  # key names tracked one by one; the key file names a handful of services
OTHER_KEY = "(other)"
# Requests to these are the operator watching, not API traffic: not counted (Prometheus counts them).
_NOT_API_PREFIXES = ("/admin", "/api/admin", "/metrics", "/docs", "/openapi.json", "/redoc")
_NOT_API = frozenset({"/", "/health", "/api/v1/health"})
_BIN_BASE = 0.001  # seconds: bin 0 holds latencies up to 1 ms
_BIN_GROWTH = 1.25  # each bin's upper edge is 25 % above the previous one
_MAX_BIN = 62  # 1 ms x 1.25^62 ~ 16 minutes; anything longer lands in the last bin

Series = tuple[str, str]  # ("total", ""), ("tier", name) or ("key", name)
TOTAL: Series = ("total", "")


def counts_as_api(endpoint: str) -> bool:
    """Whether a request to `endpoint` (a route template, or "unmatched") is API traffic to count."""
    return endpoint not in _NOT_API and not endpoint.startswith(_NOT_API_PREFIXES)


def latency_bin(seconds: float) -> int:
    if seconds <= _BIN_BASE:
        return 0
    return min(_MAX_BIN, math.ceil(math.log(seconds / _BIN_BASE, _BIN_GROWTH)))


def bin_value(index: int) -> float:
    """A bin's representative latency: the geometric middle of its edges (bin 0: its upper edge)."""
    return _BIN_BASE if index == 0 else _BIN_BASE * _BIN_GROWTH ** (index - 0.5)


@dataclass(frozen=True)
class Sample:
    """One finished request, as the analytics see it."""

    status: int
    seconds: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    compute_seconds: float = 0.0  # generation time, for tokens/s


@dataclass
class Tally:
    """What a series did in one bucket (or, merged, in a window)."""

    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    compute_seconds: float = 0.0
    latency_seconds: float = 0.0
    latency_bins: dict[int, int] = field(default_factory=dict)

    def add(self, sample: Sample) -> None:
        self.requests += 1
        self.errors += int(sample.status >= 400)
        self.prompt_tokens += sample.prompt_tokens
        self.completion_tokens += sample.completion_tokens
        self.compute_seconds += sample.compute_seconds
        self.latency_seconds += sample.seconds
        index = latency_bin(sample.seconds)
        self.latency_bins[index] = self.latency_bins.get(index, 0) + 1

    def merge(self, other: Tally) -> None:
        self.requests += other.requests
        self.errors += other.errors
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.compute_seconds += other.compute_seconds
        self.latency_seconds += other.latency_seconds
        for index, count in other.latency_bins.items():
            self.latency_bins[index] = self.latency_bins.get(index, 0) + count

    def percentile(self, q: float) -> float | None:
        if not self.requests:
            return None
        rank, seen = q * self.requests, 0
        for index in sorted(self.latency_bins):
            seen += self.latency_bins[index]
            if seen >= rank:
                return bin_value(index)
        return bin_value(max(self.latency_bins))

    def as_json(self, seconds: float) -> dict[str, object]:
        """Everything the routes show about this tally over a window of `seconds`."""
        p50, p95 = self.percentile(0.5), self.percentile(0.95)
        return {
            "requests": self.requests,
            "errors": self.errors,
            "requests_per_second": round(self.requests / seconds, 6),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            # generation speed: completion tokens over the time spent generating them
            "tokens_per_second": round(self.completion_tokens / self.compute_seconds, 2)
            if self.compute_seconds > 0
            else None,
            "latency_ms": {
                "p50": round(p50 * 1000, 1) if p50 is not None else None,
                "p95": round(p95 * 1000, 1) if p95 is not None else None,
                "mean": round(self.latency_seconds / self.requests * 1000, 1) if self.requests else None,
            },
        }


Bucket = dict[Series, Tally]


class Ring:
    """`count` buckets of `width` seconds, keyed by bucket number (time // width); older ones dropped."""

    def __init__(self, width: int, count: int) -> None:
        self.width, self.count = width, count
        self.buckets: dict[int, Bucket] = {}

    def add(self, now: float, series: Iterable[Series], sample: Sample) -> None:
        number = int(now // self.width)
        bucket = self.buckets.get(number)
        if bucket is None:
            bucket = self.buckets[number] = {}
            # Keep only the `count` buckets up to this one (a clock set back drops the "future" ones too).
            for old in [n for n in self.buckets if not number - self.count < n <= number]:
                del self.buckets[old]
        for name in series:
            bucket.setdefault(name, Tally()).add(sample)

    def within(self, now: float, seconds: int) -> list[tuple[int, Bucket]]:
        """(bucket start, bucket) of the buckets in the last `seconds`, this one included, oldest first."""
        newest = int(now // self.width)
        first = newest - seconds // self.width + 1
        return [(n * self.width, self.buckets[n]) for n in sorted(self.buckets) if first <= n <= newest]


def merged(buckets: Iterable[Bucket]) -> dict[Series, Tally]:
    out: dict[Series, Tally] = {}
    for bucket in buckets:
        for name, tally in bucket.items():
            out.setdefault(name, Tally()).merge(tally)
    return out


class Analytics:
    """The rings and the series names; `clock` is wall time (bucket starts are Unix times)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.seconds = Ring(1, WINDOWS["minute"])
        self.minutes = Ring(60, WINDOWS["day"] // 60)
        self._keys: set[str] = set()
        self._lock = threading.Lock()  # recorded on the event loop; a lock keeps it safe anywhere

    def _key_series(self, key: str) -> str:
        if key in self._keys:
            return key
        if len(self._keys) < MAX_KEY_SERIES:
            self._keys.add(key)
            return key
        return OTHER_KEY

    def record(self, tier: str, key: str, sample: Sample) -> None:
        with self._lock:
            series = [TOTAL]
            if tier:
                series.append(("tier", tier))
            if key:
                series.append(("key", self._key_series(key)))
            now = self.clock()
            self.seconds.add(now, series, sample)
            self.minutes.add(now, series, sample)

    def _ring(self, window: str) -> Ring:
        return self.seconds if window == "minute" else self.minutes

    def window(self, window: str) -> dict[Series, Tally]:
        """Every series' tally over the window ("minute", "hour" or "day")."""
        with self._lock:
            return merged(bucket for _, bucket in self._ring(window).within(self.clock(), WINDOWS[window]))

    def series(self, window: str) -> list[tuple[int, dict[Series, Tally]]]:
        """The window as a time series of SERIES_STEP[window] steps: (step start, tallies), oldest first;
        steps with no requests are left out."""
        step = SERIES_STEP[window]
        with self._lock:
            grouped: dict[int, list[Bucket]] = {}
            for start, bucket in self._ring(window).within(self.clock(), WINDOWS[window]):
                grouped.setdefault(start - start % step, []).append(bucket)
        return [(start, merged(buckets)) for start, buckets in sorted(grouped.items())]

    def stored_tallies(self) -> int:
        """How many tallies are held (for the bound's test)."""
        with self._lock:
            return sum(len(b) for ring in (self.seconds, self.minutes) for b in ring.buckets.values())


def split(tallies: Mapping[Series, Tally]) -> tuple[Tally, dict[str, Tally], dict[str, Tally]]:
    """The total's tally, the tiers' and the keys' (by name, sorted)."""
    tiers = {name: t for (kind, name), t in sorted(tallies.items()) if kind == "tier"}
    keys = {name: t for (kind, name), t in sorted(tallies.items()) if kind == "key"}
    return tallies.get(TOTAL, Tally()), tiers, keys
