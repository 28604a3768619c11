"""A remote tier's pool of upstream servers: pick the least busy, count every attempt once, break circuits.

`pick` counts the chosen upstream in flight before it returns (no await between choosing and
counting, so concurrent requests see each other); among equally busy upstreams the starting point
rotates, so ties spread instead of piling on the first. Every pick is an `Attempt` that is finished
exactly once with what happened: "ok" (the upstream answered, even with a 400), "fault" (connect
error, 5xx, 429, 408, a stall, a stream that died) or "neutral" (our client left; says nothing about
the upstream).

Policies (`{TIER}_LB_POLICY`): "least_outstanding" (the default, above); "round_robin" (the next
upstream in turn, however busy); "session": rendezvous hashing of the request's session key (the
body's `user`), so one conversation keeps reaching the upstream that holds its KV prefix, the same
way on every replica with no shared state; when that upstream is out (or was tried), the next in
rendezvous order; without a key, least outstanding.

Weights (`http://gpu1:8000/v1|2` in `{TIER}_UPSTREAMS`: twice the share of an unweighted one) scale
every policy: least outstanding compares in-flight divided by weight, round robin is smooth weighted
round robin (nginx's), session is weighted rendezvous hashing. `{TIER}_UPSTREAM_MAX_IN_FLIGHT` caps
each upstream's in-flight attempts: a full upstream is not picked, and when every candidate is full
`pick` returns None and `saturated` says so (the chat tier then waits under its queue settings).
Active health probes (remote/health.py) mark an upstream unhealthy: it is skipped until a probe
passes.

Circuit breaker per upstream: `failures` consecutive faults open it and it is skipped; after the
cooldown one request may probe it (half-open): success closes it, a fault opens it again with the
cooldown doubled, up to `MAX_COOLDOWN_FACTOR` times the base. A Retry-After from a 429 or 503 keeps
the upstream out of picks until then. The lock makes the pool safe from the embedding tiers' threads
as well as the event loop; nothing waits while holding it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal

from config import TierConfig
from core.errors import ContextLengthExceeded, ServiceError
from core.turns import JsonObject

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
MAX_COOLDOWN_FACTOR = 16
Outcome = Literal["ok", "fault", "neutral"]


class UpstreamUnavailable(ServiceError):
    """No upstream of the pool could take the request (all down, broken or tried)."""

    status = 503
    type = "server_error"
    code = "upstream_unavailable"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, math.ceil(retry_after)))})


class UpstreamRefused(ServiceError):
    """The upstream answered with a client error (400, 404, 413, ...): its status and error, passed through."""

    def __init__(self, status: int, message: str, code: str, kind: str, param: str | None) -> None:
        super().__init__(message, param=param)
        self.status, self.code, self.type = status, code, kind


class UpstreamContextExceeded(UpstreamRefused, ContextLengthExceeded):
    """The upstream refused a prompt longer than its context, and said so by its error's code or type:
    a session turn (sessions/history.py) then drops its oldest turns and tries again, as on a local tier."""


class UpstreamBroke(ServiceError):
    """An upstream failed after our response had started (a dropped connection, silence)."""

    status = 502
    type = "server_error"
    code = "upstream_error"


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


def parse_entry(entry: str) -> tuple[str, float]:
    """`http://host/v1|2` -> (`http://host/v1`, 2.0); no `|` -> weight 1. Raises ValueError on a bad weight."""
    url, bar, weight = entry.rpartition("|")
    if not bar:
        return entry.rstrip("/"), 1.0
    value = float(weight)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"weight {weight!r} is not a positive number")
    return url.rstrip("/"), value


@dataclass
class Upstream:
    url: str
    weight: float = 1.0
    in_flight: int = 0
    requests: int = 0
    failures: int = 0  # faults, all time
    streak: int = 0  # consecutive faults
    state: str = CLOSED
    cooldown: float = 0.0
    reopen_at: float = 0.0  # an open breaker lets one probe through from then on
    probing: bool = False  # a half-open probe is in flight
    not_before: float = 0.0  # the upstream's own Retry-After
    last_error: str = ""
    retries: int = 0  # attempts here that were another upstream's retry
    healthy: bool = True  # the last active probe passed (always, without probes)
    health_error: str = ""
    current: float = 0.0  # smooth weighted round robin's running score
    latency_counts: list[int] = field(default_factory=lambda: [0] * len(LATENCY_BUCKETS))
    latency_sum: float = 0.0
    label: str = ""  # the URL without credentials, for headers, status pages, metrics and logs

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        self.label = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))

    def observe(self, seconds: float) -> None:
        self.latency_sum += seconds
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                self.latency_counts[i] += 1
                break


class Attempt:
    """One request on one upstream; `finish` settles it once (later calls are ignored)."""

    def __init__(self, pool: Pool, upstream: Upstream, probe: bool, started: float) -> None:
        self.pool, self.upstream, self.probe = pool, upstream, probe
        self.started = started
        self.finished = False
        self.outcome: Outcome | None = None  # how it was settled

    def finish(self, outcome: Outcome, error: str = "", retry_after: float | None = None) -> None:
        self.pool._settle(self, outcome, error, retry_after)


class Pool:
    def __init__(
        self,
        urls: Sequence[str],
        failures: int = 3,
        cooldown: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        policy: str = "least_outstanding",
        max_in_flight: int = 0,
    ) -> None:
        if not urls:
            raise ValueError("a pool needs at least one upstream")
        self.upstreams = [Upstream(*parse_entry(entry)) for entry in urls]
        self.failures = failures
        self.cooldown = cooldown
        self.clock = clock
        self.policy = policy
        self.max_in_flight = max_in_flight  # per upstream; 0 = no cap
        self.health_interval = 0.0  # set by the prober: how soon an unhealthy upstream may be back
        self._rotation = 0
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []

    @classmethod
    def for_tier(cls, config: TierConfig, clock: Callable[[], float] = time.monotonic) -> Pool:
        return cls(
            config.upstream_urls,
            config.breaker_failures,
            config.breaker_cooldown,
            clock,
            config.lb_policy,
            config.upstream_max_in_flight,
        )

    @property
    def in_flight(self) -> int:
        return sum(u.in_flight for u in self.upstreams)

    def on_release(self, listener: Callable[[], None]) -> None:
        """Call `listener` after every settled attempt (outside the lock): room may have opened."""
        self._listeners.append(listener)

    def pick(self, exclude: Collection[Upstream] = (), key: str | None = None) -> Attempt | None:
        """The upstream the policy picks among those that may take a request, counted in flight; None
        when none may. `key` is the request's session key (used by the "session" policy)."""
        with self._lock:
            now = self.clock()
            count = len(self.upstreams)
            start, self._rotation = self._rotation, (self._rotation + 1) % count
            if self.policy == "session" and key:
                order = sorted(self.upstreams, key=lambda u: _rendezvous(key, u), reverse=True)
            else:
                order = [self.upstreams[(start + step) % count] for step in range(count)]
            candidates = [u for u in order if u not in exclude and self._admits(u, now) and self._has_room(u)]
            if not candidates:
                return None
            if self.policy == "round_robin":
                best = self._weighted_turn(candidates)
            elif self.policy == "session" and key:
                best = candidates[0]
            else:  # least outstanding; `min` keeps the first of equals, and the order rotates
                best = min(candidates, key=lambda u: u.in_flight / u.weight)
            probe = best.state != CLOSED
            if probe:
                best.state, best.probing = HALF_OPEN, True
            best.in_flight += 1
            best.requests += 1
            best.retries += 1 if exclude else 0
            return Attempt(self, best, probe, now)

    def saturated(self, exclude: Collection[Upstream] = ()) -> bool:
        """Whether some upstream not yet tried could take the request but for its in-flight cap."""
        with self._lock:
            now = self.clock()
            return any(u not in exclude and self._admits(u, now) and not self._has_room(u) for u in self.upstreams)

    def _has_room(self, upstream: Upstream) -> bool:
        return self.max_in_flight <= 0 or upstream.in_flight < self.max_in_flight

    @staticmethod
    def _weighted_turn(candidates: Sequence[Upstream]) -> Upstream:
        """Smooth weighted round robin: each candidate gains its weight, the leader pays the total."""
        for upstream in candidates:
            upstream.current += upstream.weight
        best = max(candidates, key=lambda u: u.current)
        best.current -= sum(u.weight for u in candidates)
        return best

    def _admits(self, upstream: Upstream, now: float) -> bool:
        if now < upstream.not_before or not upstream.healthy:
            return False
        if upstream.state == CLOSED:
            return True
        return now >= upstream.reopen_at and not upstream.probing

    def set_health(self, upstream: Upstream, healthy: bool, error: str = "") -> None:
        """An active probe's verdict (remote/health.py)."""
        with self._lock:
            upstream.healthy, upstream.health_error = healthy, error
        if healthy:
            self._notify()

    def degraded(self) -> bool:
        """No upstream may take a request now: every breaker open (or every upstream failing its probe)."""
        with self._lock:
            return all(u.state != CLOSED or not u.healthy for u in self.upstreams)

    def _settle(self, attempt: Attempt, outcome: Outcome, error: str, retry_after: float | None) -> None:
        with self._lock:
            if attempt.finished:
                return
            attempt.finished, attempt.outcome = True, outcome
            upstream, now = attempt.upstream, self.clock()
            upstream.in_flight -= 1
            upstream.observe(max(0.0, now - attempt.started))
            if attempt.probe:
                upstream.probing = False
            if retry_after is not None and retry_after > 0:
                upstream.not_before = max(upstream.not_before, now + retry_after)
            if outcome == "ok":
                upstream.streak, upstream.state, upstream.cooldown = 0, CLOSED, 0.0
            elif outcome == "fault":
                upstream.failures += 1
                upstream.streak += 1
                upstream.last_error = error
                if upstream.state == HALF_OPEN and attempt.probe:
                    self._open(upstream, now, min(upstream.cooldown * 2, self.cooldown * MAX_COOLDOWN_FACTOR))
                elif upstream.state == CLOSED and upstream.streak >= self.failures:
                    self._open(upstream, now, self.cooldown)
        self._notify()

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    def _open(self, upstream: Upstream, now: float, cooldown: float) -> None:
        upstream.state, upstream.cooldown, upstream.reopen_at = OPEN, cooldown, now + cooldown

    def snapshot(self) -> list[Upstream]:
        """Copies of the upstreams, taken together (for metrics)."""
        with self._lock:
            return [dataclasses.replace(u, latency_counts=list(u.latency_counts)) for u in self.upstreams]

    def retry_after(self) -> float:
        """Seconds until some upstream may take a request again (at least 1)."""
        with self._lock:
            now = self.clock()
            waits = [
                max(u.not_before, u.reopen_at if u.state != CLOSED else 0.0) - now
                if u.healthy
                else self.health_interval
                for u in self.upstreams
            ]
        return max(1.0, min(waits))

    def status(self) -> list[JsonObject]:
        """Per upstream: breaker state, in flight, requests, faults, the last error."""
        with self._lock:
            now = self.clock()
            out: list[JsonObject] = []
            for u in self.upstreams:
                entry: JsonObject = {
                    "url": u.label,
                    "weight": u.weight,
                    "healthy": u.healthy,
                    "breaker": u.state,
                    "in_flight": u.in_flight,
                    "requests": u.requests,
                    "failures": u.failures,
                    "retries": u.retries,
                    "consecutive_failures": u.streak,
                    "last_error": u.last_error or None,
                }
                if u.health_error:
                    entry["health_error"] = u.health_error
                wait = max(u.not_before, u.reopen_at if u.state == OPEN else 0.0) - now
                if wait > 0:
                    entry["retry_in_seconds"] = round(wait, 1)
                out.append(entry)
            return out


def _rendezvous(key: str, upstream: Upstream) -> float:
    """A stable score of (session, upstream): the highest wins; weighted rendezvous (-w / ln h), so an
    upstream of weight 2 wins twice as many sessions. Not Python's hash, which is salted per process."""
    digest = hashlib.blake2b(f"{upstream.url}\n{key}".encode(), digest_size=8).digest()
    unit = (int.from_bytes(digest, "big") + 1) / (2**64 + 1)  # in (0, 1)
    return -upstream.weight / math.log(unit)


def describe(attempts: Sequence[str]) -> str:
    """What each failed attempt ran into, for the 503 that says no upstream could answer."""
    return "; ".join(attempts) if attempts else "every upstream is unavailable (breaker open)"
