"""Redis as the replicas' shared memory: one client per use, bounded in time, never retried.

Two ways to lean on it. The response cache and the rate limits *fail open* (`FailOpen`): every call
is bounded by REDIS_TIMEOUT_MS (connect, send and read together), is never retried, and after an
error Redis is bypassed for REDIS_COOLDOWN_SECONDS, after which one call probes it while the others
keep bypassing. A dead, frozen or unreachable Redis therefore costs a request at most one timeout,
and only the requests in flight when it went away. Sessions *fail closed* (`connect` with a longer
timeout, errors raised to the caller): losing a conversation silently is worse than a 503.

redis-py's defaults are what these settings replace: a 5 s connect timeout, three retries with
backoff, and a CLIENT SETINFO round trip on every new connection (~4 s against a dead port).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:  # redis-py is imported by `connect`, only when a Redis URL is configured
    from redis.asyncio import Redis

log = logging.getLogger("llmservice.redis")
T = TypeVar("T")

ADMIN_TIMEOUT = 2.0  # seconds: admin calls (clearing our keys) are off the hot path and may take longer
MAX_CONNECTIONS = 64  # past this a call fails (open) instead of queueing behind a stuck pool


def redacted(url: str) -> str:
    """The URL without its password, for logs, errors and /health."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def connect(url: str, timeout: float) -> Redis:
    """A client whose every socket operation gives up after `timeout` seconds, with no retries."""
    from redis.asyncio import Redis
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    client: Redis = Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
        driver_info=None,  # no CLIENT SETINFO: one round trip less per new connection
        health_check_interval=0,
        max_connections=MAX_CONNECTIONS,
    )
    return client


class FailOpen:
    """A Redis for a fail-open use (`name`: "cache", "rate_limits"), with its state for /health.

    `call(op, fallback)` runs `op` on the client within the timeout and returns its result, or
    `fallback` when Redis failed or is being bypassed: it never raises for Redis.
    """

    def __init__(
        self, name: str, url: str, timeout: float, cooldown: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.name = name
        self.url = url
        self.timeout = timeout
        self.cooldown = cooldown
        self.clock = clock
        self.client = connect(url, timeout)
        self._admin: Redis | None = None
        self.errors = 0
        self.bypassed = 0
        self.last_error = ""
        self._down_until: float | None = None  # set while Redis is bypassed
        self._probing = False

    @property
    def up(self) -> bool:
        return self._down_until is None

    def _admit(self) -> tuple[bool, bool]:
        """(go ahead, as the probe)."""
        if self._down_until is None:
            return True, False
        if self._probing or self.clock() < self._down_until:
            return False, False
        self._probing = True  # this call probes; the others keep bypassing until it answers
        return True, True

    async def call(self, op: Callable[[Redis], Awaitable[T]], fallback: T) -> T:
        go, probe = self._admit()
        if not go:
            self.bypassed += 1
            return fallback
        try:
            async with asyncio.timeout(self.timeout):
                result = await op(self.client)
        except Exception as exc:  # noqa: BLE001 - any Redis failure means going on without it
            self._failed(exc)
            return fallback
        finally:
            if probe:
                self._probing = False
        self._succeeded()
        return result

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"[:200] if str(exc) else type(exc).__name__
        if self._down_until is None:
            log.warning(
                "redis (%s) at %s failed (%s); bypassed for %g s at a time until it answers",
                self.name,
                redacted(self.url),
                self.last_error,
                self.cooldown,
            )
        else:
            log.debug("redis (%s) failed again: %s", self.name, self.last_error)
        self._down_until = self.clock() + self.cooldown

    def _succeeded(self) -> None:
        if self._down_until is not None:
            log.info("redis (%s) at %s answers again", self.name, redacted(self.url))
            self._down_until = None

    async def admin(self, op: Callable[[Redis], Awaitable[T]]) -> T:
        """An operator's call (not on a request's path): a longer timeout, and errors are raised."""
        if self._admin is None:
            self._admin = connect(self.url, ADMIN_TIMEOUT)
        async with asyncio.timeout(ADMIN_TIMEOUT * 4):
            return await op(self._admin)

    def status(self) -> dict[str, object]:
        """For /health, /admin and /metrics: "ok", or "bypassed" for the rest of a cooldown."""
        retry_in = 0.0 if self._down_until is None else max(0.0, self._down_until - self.clock())
        return {
            "url": redacted(self.url),
            "state": "ok" if self.up else "bypassed",
            "errors": self.errors,
            "bypassed": self.bypassed,
            "last_error": self.last_error or None,
            "retry_in_seconds": round(retry_in, 2),
        }

    async def aclose(self) -> None:
        for client in (self.client, self._admin):
            if client is not None:
                try:
                    await client.aclose()
                except Exception as exc:  # noqa: BLE001 - closing a dead connection may fail; nothing to keep
                    log.debug("closing the redis (%s) client: %s", self.name, exc)
