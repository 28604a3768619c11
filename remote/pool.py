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

Circuit breaker per upstream: `failures` consecutive faults open it and it is skipped; after the
cooldown one request may probe it (half-open): success closes it, a fault opens it again with the
cooldown doubled, up to `MAX_COOLDOWN_FACTOR` times the base. A Retry-After from a 429 or 503 keeps
the upstream out of picks until then. The lock makes the pool safe from the embedding tiers' threads
as well as the event loop; nothing waits while holding it.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
import urllib.parse
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Literal

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


@dataclass
class Upstream:
    url: str
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

    @property
    def label(self) -> str:
        """The URL without credentials, for status pages and logs."""
        parts = urllib.parse.urlsplit(self.url)
        host = parts.hostname or ""
        netloc = f"{host}:{parts.port}" if parts.port else host
        return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class Attempt:
    """One request on one upstream; `finish` settles it once (later calls are ignored)."""

    def __init__(self, pool: Pool, upstream: Upstream, probe: bool) -> None:
        self.pool, self.upstream, self.probe = pool, upstream, probe
        self.finished = False

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
    ) -> None:
        if not urls:
            raise ValueError("a pool needs at least one upstream")
        self.upstreams = [Upstream(url) for url in urls]
        self.failures = failures
        self.cooldown = cooldown
        self.clock = clock
        self.policy = policy
        self._rotation = 0
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        return sum(u.in_flight for u in self.upstreams)

    def pick(self, exclude: Collection[Upstream] = (), key: str | None = None) -> Attempt | None:
        """The upstream the policy picks among those that may take a request, counted in flight; None
        when none may. `key` is the request's session key (used by the "session" policy)."""
        with self._lock:
            now = self.clock()
            count = len(self.upstreams)
            start, self._rotation = self._rotation, (self._rotation + 1) % count
            if self.policy == "session" and key:
                order = sorted(self.upstreams, key=lambda u: _rendezvous(key, u.url), reverse=True)
            else:
                order = [self.upstreams[(start + step) % count] for step in range(count)]
            candidates = [u for u in order if u not in exclude and self._admits(u, now)]
            if not candidates:
                return None
            if self.policy == "round_robin" or (self.policy == "session" and key):
                best = candidates[0]
            else:  # least outstanding; `min` keeps the first of equals, and the order rotates
                best = min(candidates, key=lambda u: u.in_flight)
            probe = best.state != CLOSED
            if probe:
                best.state, best.probing = HALF_OPEN, True
            best.in_flight += 1
            best.requests += 1
            return Attempt(self, best, probe)

    def _admits(self, upstream: Upstream, now: float) -> bool:
        if now < upstream.not_before:
            return False
        if upstream.state == CLOSED:
            return True
        return now >= upstream.reopen_at and not upstream.probing

    def _settle(self, attempt: Attempt, outcome: Outcome, error: str, retry_after: float | None) -> None:
        with self._lock:
            if attempt.finished:
                return
            attempt.finished = True
            upstream, now = attempt.upstream, self.clock()
            upstream.in_flight -= 1
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

    def _open(self, upstream: Upstream, now: float, cooldown: float) -> None:
        upstream.state, upstream.cooldown, upstream.reopen_at = OPEN, cooldown, now + cooldown

    def retry_after(self) -> float:
        """Seconds until some upstream may take a request again (at least 1)."""
        with self._lock:
            now = self.clock()
            waits = [max(u.not_before, u.reopen_at if u.state != CLOSED else 0.0) - now for u in self.upstreams]
        return max(1.0, min(waits))

    def status(self) -> list[JsonObject]:
        """Per upstream: breaker state, in flight, requests, faults, the last error."""
        with self._lock:
            now = self.clock()
            out: list[JsonObject] = []
            for u in self.upstreams:
                entry: JsonObject = {
                    "url": u.label,
                    "breaker": u.state,
                    "in_flight": u.in_flight,
                    "requests": u.requests,
                    "failures": u.failures,
                    "consecutive_failures": u.streak,
                    "last_error": u.last_error or None,
                }
                wait = max(u.not_before, u.reopen_at if u.state == OPEN else 0.0) - now
                if wait > 0:
                    entry["retry_in_seconds"] = round(wait, 1)
                out.append(entry)
            return out


def _rendezvous(key: str, url: str) -> int:
    """A stable score of (session, upstream): the highest wins. Not Python's hash, which is salted per process."""
    return int.from_bytes(hashlib.blake2b(f"{url}\n{key}".encode(), digest_size=8).digest(), "big")


def describe(attempts: Sequence[str]) -> str:
    """What each failed attempt ran into, for the 503 that says no upstream could answer."""
    return "; ".join(attempts) if attempts else "every upstream is unavailable (breaker open)"
