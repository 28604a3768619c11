"""Rate limits per key: requests per minute, tokens per minute, requests at once.

`RateLimit` sits just inside `BearerAuth` and reads the request's `ApiKey` from the scope. Before the
route it asks the `Limiter` to admit the request; over a limit the answer is 429
`rate_limit_exceeded` with `Retry-After`. Every response of a limited key carries OpenAI's
`x-ratelimit-limit|remaining|reset-requests` (and `-tokens`) headers, so the OpenAI SDK's own retry
logic works unchanged. After the last byte it charges the tokens the request used (prompt +
completion, from `RequestInfo`, filled in by the routes; a stream's count is known at its end).

Both minute limits are token buckets: full at first, refilled continuously at limit/60 per second.
A request takes one request token; tokens are charged after the fact, so the token bucket may go
below zero, and the key waits until it is positive again. `max_parallel` counts requests until their
last byte. `LocalLimiter` keeps this in memory, per process; the `Limiter` protocol is the seam for
a limiter shared by replicas: scale/redis_limits.py runs the same two calls as scripts in Redis
(RATE_LIMIT_REDIS_URL), and each admitted request carries a `slot` id back to `finish`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import RateLimited
from middleware import request_context
from middleware.envelope import send_error
from middleware.keys import SCOPE_KEY, ApiKey

WINDOW = 60.0  # seconds: rpm and tpm are per minute
PARALLEL_RETRY = 1.0  # seconds a client over max_parallel is told to wait (nothing says when a slot frees)
# One whole token, less float rounding: a bucket refilled for exactly the wait it announced may hold 0.999...
WHOLE = 1.0 - 1e-9


@dataclass(frozen=True)
class Decision:
    """A limiter's answer: admitted or not, the x-ratelimit-* headers, and when to retry if not."""

    allowed: bool
    headers: dict[str, str] = field(default_factory=dict)
    retry_after: float = 0.0
    limit: str = ""  # "requests", "tokens" or "parallel" when refused
    message: str = ""
    slot: str = ""  # what the limiter needs back in `finish` to free this request's parallel slot


class Limiter(Protocol):
    async def admit(self, key: ApiKey) -> Decision:
        """Count one request of `key` (a request token and a parallel slot), or refuse it."""
        ...

    async def finish(self, key: ApiKey, tokens: int, slot: str = "") -> None:
        """The admitted request ended: free its parallel slot (`slot` from its Decision) and charge `tokens`."""
        ...


def duration(seconds: float) -> str:
    """OpenAI's reset format: "20ms", "1s", "6m0s", "1m30.5s"."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    minutes, rest = divmod(round(seconds, 3), 60)
    rest_text = f"{rest:.3f}".rstrip("0").rstrip(".")
    return f"{int(minutes)}m{rest_text}s" if minutes else f"{rest_text}s"


@dataclass
class Bucket:
    level: float
    stamp: float

    def refill(self, limit: int, now: float) -> None:
        rate = limit / WINDOW
        self.level = min(float(limit), self.level + max(0.0, now - self.stamp) * rate)
        self.stamp = now

    def wait(self, limit: int) -> float:
        """Seconds until the bucket holds one whole token."""
        return max(0.0, (1.0 - self.level) * WINDOW / limit)

    def headers(self, kind: str, limit: int) -> dict[str, str]:
        return {
            f"x-ratelimit-limit-{kind}": str(limit),
            f"x-ratelimit-remaining-{kind}": str(max(0, math.floor(self.level))),
            f"x-ratelimit-reset-{kind}": duration((limit - self.level) * WINDOW / limit),
        }


def refusals(key: ApiKey, requests: Bucket | None, tokens: Bucket | None, running: int) -> list[tuple[float, str, str]]:
    """Why `key` may not start a request now: (wait, limit, what) for each limit it is over."""
    found: list[tuple[float, str, str]] = []
    if requests is not None and requests.level < WHOLE:
        found.append((requests.wait(key.rpm), "requests", f"requests per minute (RPM): limit {key.rpm}"))
    if tokens is not None and tokens.level < WHOLE:
        found.append((tokens.wait(key.tpm), "tokens", f"tokens per minute (TPM): limit {key.tpm}"))
    if key.max_parallel and running >= key.max_parallel:
        found.append((PARALLEL_RETRY, "parallel", f"requests at once: limit {key.max_parallel}"))
    return found


def decide(
    key: ApiKey, requests: Bucket | None, tokens: Bucket | None, refused: list[tuple[float, str, str]], slot: str = ""
) -> Decision:
    """The decision and its x-ratelimit-* headers, from the buckets as they are after admission."""
    headers: dict[str, str] = {}
    if requests is not None:
        headers.update(requests.headers("requests", key.rpm))
    if tokens is not None:
        headers.update(tokens.headers("tokens", key.tpm))
    if refused:
        wait, limit, what = max(refused)
        message = f"Rate limit reached for key {key.name!r} on {what}. Please try again in {duration(wait)}."
        return Decision(False, headers, wait, limit, message)
    return Decision(True, headers, slot=slot)


class LocalLimiter:
    """The limits of this process, by key name (so a reloaded key file keeps the counts)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._requests: dict[str, Bucket] = {}
        self._tokens: dict[str, Bucket] = {}
        self.in_flight: dict[str, int] = {}

    def _bucket(self, buckets: dict[str, Bucket], name: str, limit: int, now: float) -> Bucket:
        bucket = buckets.setdefault(name, Bucket(float(limit), now))
        bucket.refill(limit, now)
        return bucket

    async def admit(self, key: ApiKey) -> Decision:
        now = self.clock()
        requests = self._bucket(self._requests, key.name, key.rpm, now) if key.rpm else None
        tokens = self._bucket(self._tokens, key.name, key.tpm, now) if key.tpm else None
        running = self.in_flight.get(key.name, 0)
        refused = refusals(key, requests, tokens, running)
        if not refused:
            if requests is not None:
                requests.level -= 1
            self.in_flight[key.name] = running + 1
        return decide(key, requests, tokens, refused)

    async def finish(self, key: ApiKey, tokens: int, slot: str = "") -> None:
        running = self.in_flight.get(key.name, 0) - 1
        if running > 0:
            self.in_flight[key.name] = running
        else:
            self.in_flight.pop(key.name, None)
        if key.tpm and tokens > 0:
            bucket = self._bucket(self._tokens, key.name, key.tpm, self.clock())
            bucket.level -= tokens


class RateLimit:
    """ASGI middleware over a `Limiter`, for requests whose key has limits."""

    def __init__(self, app: ASGIApp, limiter: Limiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key: ApiKey | None = scope.get(SCOPE_KEY) if scope["type"] == "http" else None
        if key is None or not key.limited:
            await self.app(scope, receive, send)
            return
        decision = await self.limiter.admit(key)
        if not decision.allowed:
            limit = "tokens" if decision.limit == "tokens" else "requests"
            error = RateLimited(decision.message, retry_after=decision.retry_after, limit=limit)
            await send_error(error, scope, receive, send, extra_headers=decision.headers)
            return
        extra = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in decision.headers.items()]

        async def send_with_limits(message: Message) -> None:
            if message["type"] == "http.response.start" and extra:
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_limits)
        finally:
            info = request_context.current()
            used = info.prompt_tokens + info.completion_tokens if info is not None else 0
            await self.limiter.finish(key, used, decision.slot)
