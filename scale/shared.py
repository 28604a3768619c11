"""What replicas share, built from the settings: the Redis uses (cache tier, rate limits, sessions
store) and their state for /health, /admin/status and /metrics. Without any Redis URL everything
stays per process, as before: a `MemoryStore` and the middleware's `LocalLimiter`."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cache import ResponseCache
from config import Settings
from middleware.limits import Limiter
from scale.redis_limits import RedisLimiter
from scale.redis_link import FailOpen
from scale.redis_store import RedisStore
from sessions.locks import LocalLocks, TurnLocks
from sessions.store import MemoryStore, RecordStore

Status = Callable[[], Mapping[str, object]]


@dataclass
class Shared:
    store: RecordStore
    limiter: Limiter | None  # None: the middleware's per-process LocalLimiter
    uses: dict[str, Status] = field(default_factory=dict)  # "cache", "rate_limits", "sessions" -> status
    _redis_limiter: RedisLimiter | None = None
    _redis_store: RedisStore | None = None

    @property
    def turn_locks(self) -> TurnLocks:
        """One turn at a time per session: across replicas when the sessions live in Redis."""
        if self._redis_store is None:
            return LocalLocks()
        from scale.redis_locks import RedisLocks  # redis-py only when sessions live in Redis

        return RedisLocks(self._redis_store)

    @classmethod
    def build(cls, settings: Settings, cache: ResponseCache) -> Shared:
        uses: dict[str, Status] = {}
        if cache.redis is not None:
            uses["cache"] = cache.redis.stats
        limiter: RedisLimiter | None = None
        if settings.rate_limit_redis_url:
            link = FailOpen(
                "rate_limits",
                settings.rate_limit_redis_url,
                settings.redis_timeout_ms / 1000,
                settings.redis_cooldown_seconds,
            )
            limiter = RedisLimiter(link, settings.redis_prefix)
            uses["rate_limits"] = link.status
        store: RecordStore = MemoryStore(settings.sessions_max)
        redis_store: RedisStore | None = None
        if settings.sessions_redis_url:
            redis_store = RedisStore(
                settings.sessions_redis_url,
                settings.redis_prefix,
                settings.sessions_max,
                settings.sessions_redis_timeout_ms / 1000,
            )
            store = redis_store
            uses["sessions"] = redis_store.status
        return cls(store, limiter, uses, limiter, redis_store)

    def status(self) -> dict[str, Mapping[str, object]]:
        return {use: status() for use, status in self.uses.items()}

    async def aclose(self) -> None:
        """Close the rate-limit and sessions clients (the cache closes its own)."""
        if self._redis_limiter is not None:
            await self._redis_limiter.link.aclose()
        if self._redis_store is not None:
            await self._redis_store.aclose()
