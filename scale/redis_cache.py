"""The response cache's shared tier: entries in Redis, seen by every replica (CACHE_REDIS_URL).

Values are the cache's own JSON bytes (the key embedded, checked by the cache on read), never
pickle; each entry expires with CACHE_TTL_SECONDS. Keys are `{REDIS_PREFIX}:cache:{digest}`, so
clearing scans and unlinks that prefix only, never the whole database. Every call fails open
(scale/redis_link.py): an unreachable Redis reads as a miss and a write that failed is dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from config import Settings
from scale.redis_link import FailOpen

if TYPE_CHECKING:  # redis-py is imported by the link, only when a Redis URL is configured
    from redis.asyncio import Redis

SCAN_BATCH = 500  # keys per SCAN step and per UNLINK when clearing


def redis_tier(settings: Settings) -> RedisTier | None:
    """The tier CACHE_REDIS_URL names, or None; nothing connects until the first lookup."""
    if not settings.cache_redis_url:
        return None
    link = FailOpen(
        "cache", settings.cache_redis_url, settings.redis_timeout_ms / 1000, settings.redis_cooldown_seconds
    )
    return RedisTier(link, settings.redis_prefix, settings.cache_ttl_seconds)


class RedisTier:
    def __init__(self, link: FailOpen, prefix: str, ttl: float) -> None:
        self.link = link
        self.prefix = f"{prefix}:cache:"
        self.ttl_ms = int(ttl * 1000) if ttl > 0 else None
        self.hits = 0
        self.misses = 0
        self.dropped = 0  # entries that did not match their key (foreign or tampered): deleted

    def _name(self, key: str) -> str:
        return self.prefix + key

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The stored bytes per key, None where missing or when Redis is unavailable (one MGET)."""
        names = [self._name(key) for key in keys]

        async def mget(client: Redis) -> list[bytes | None]:
            values: list[bytes | None] = await client.mget(names)
            return values

        found = await self.link.call(mget, [None] * len(keys))
        hits = sum(1 for value in found if value is not None)
        self.hits += hits
        self.misses += len(keys) - hits
        return found

    async def put_many(self, encoded: Mapping[str, bytes]) -> None:
        """Store entries (one pipelined round trip); a failure leaves them uncached."""
        if not encoded:
            return

        async def store(client: Redis) -> None:
            async with client.pipeline(transaction=False) as pipe:
                for key, data in encoded.items():
                    pipe.set(self._name(key), data, px=self.ttl_ms)
                await pipe.execute()

        await self.link.call(store, None)

    async def drop(self, key: str) -> None:
        """Delete an entry that failed its check, so no replica reads it again."""
        self.dropped += 1

        async def unlink(client: Redis) -> None:
            await client.unlink(self._name(key))

        await self.link.call(unlink, None)

    async def clear(self) -> int:
        """Unlink every key under our prefix (SCAN + UNLINK, never FLUSHDB); how many went.
        Raises when Redis cannot be reached: the operator asked for this and should know."""

        async def clear(client: Redis) -> int:
            removed = 0
            batch: list[bytes] = []
            async for name in client.scan_iter(match=f"{self.prefix}*", count=SCAN_BATCH):
                batch.append(name)
                if len(batch) >= SCAN_BATCH:
                    removed += int(await client.unlink(*batch))
                    batch = []
            if batch:
                removed += int(await client.unlink(*batch))
            return removed

        removed = await self.link.admin(clear)
        self.hits = self.misses = self.dropped = 0
        return removed

    def stats(self) -> dict[str, object]:
        return {**self.link.status(), "hits": self.hits, "misses": self.misses, "dropped": self.dropped}
