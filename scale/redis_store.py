"""Sessions and stored responses in Redis (SESSIONS_REDIS_URL): the `RecordStore` of sessions/store.py,
shared by replicas and kept across restarts.

Layout under `{REDIS_PREFIX}:records:`: one string per record (`rec:{id}`: its JSON, expiring with
the record), a sorted set per owner and kind for listing (`index:{kind}:{owner}`, by creation time),
and one sorted set of every record scored by its expiry (`all`) that counts records against
SESSIONS_MAX and tells `purge` what to drop from the listings. Inserting is one script (purge a few
expired, check the limit, SET NX, index), so concurrent replicas never overshoot the limit.

Fails closed: a Redis error or a call past SESSIONS_REDIS_TIMEOUT_MS is a 503 `sessions_unavailable`
with Retry-After, never a silently lost turn. The scripts name keys they compute, so the store needs
one Redis server (or Sentinel), not a Redis Cluster.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import Redis

from core.errors import Overloaded
from scale.redis_link import connect, redacted
from sessions.store import Record, RecordKind, StoreFull

log = logging.getLogger("llmservice.sessions")
T = TypeVar("T")

PURGE_PER_INSERT = 32  # expired records dropped by each insert (the periodic purge takes the rest)
PAGE_BATCH = 64  # ids read per step while listing

# KEYS: record, all, owner index. ARGV: json, expires_ms ('' = never), now_ms, max, member, id,
# created_ms, prefix, how many expired to purge first. Returns 1 inserted, 0 exists, or
# {-1, soonest expiry in ms} when full.
INSERT = """
local now = tonumber(ARGV[3])
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[9]))
for _, member in ipairs(expired) do
  local kind, owner, id = string.match(member, '^([^|]*)|([^|]*)|(.*)$')
  redis.call('ZREM', ARGV[8] .. 'index:' .. kind .. ':' .. owner, id)
  redis.call('DEL', ARGV[8] .. 'rec:' .. id)
  redis.call('ZREM', KEYS[2], member)
end
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
if redis.call('ZCARD', KEYS[2]) >= tonumber(ARGV[4]) then
  local soonest = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
  return {-1, soonest[2] or ''}
end
if ARGV[2] == '' then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('ZADD', KEYS[2], '+inf', ARGV[5])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[5])
end
redis.call('ZADD', KEYS[3], ARGV[7], ARGV[6])
return 1
"""

# KEYS: record, all. ARGV: json, expires_ms ('' = never), member. Returns 1 replaced, 0 gone.
REPLACE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[2] == '' then
  redis.call('SET', KEYS[1], ARGV[1])
  redis.call('ZADD', KEYS[2], 'XX', '+inf', ARGV[3])
else
  redis.call('SET', KEYS[1], ARGV[1], 'PXAT', ARGV[2])
  redis.call('ZADD', KEYS[2], 'XX', ARGV[2], ARGV[3])
end
return 1
"""

# KEYS: record, all, owner index. ARGV: member, id. Returns 1 deleted, 0 gone.
DELETE = """
if redis.call('DEL', KEYS[1]) == 0 then return 0 end
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[2])
return 1
"""

# KEYS: all. ARGV: now_ms, prefix. Returns how many expired records were dropped.
PURGE = """
local expired = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]), 'LIMIT', 0, 1000)
for _, member in ipairs(expired) do
  local kind, owner, id = string.match(member, '^([^|]*)|([^|]*)|(.*)$')
  redis.call('ZREM', ARGV[2] .. 'index:' .. kind .. ':' .. owner, id)
  redis.call('DEL', ARGV[2] .. 'rec:' .. id)
  redis.call('ZREM', KEYS[1], member)
end
return #expired
"""


class StoreUnavailable(Overloaded):
    """The sessions Redis did not answer: the request is refused rather than run without its history."""

    code = "sessions_unavailable"


def _ms(seconds: float | None) -> str:
    return "" if seconds is None else str(int(seconds * 1000))


def _member(record: Record) -> str:
    # Owners are digests and ids are ours (sess_/resp_ + hex): neither holds '|'.
    return f"{record.kind}|{record.owner}|{record.id}"


class RedisStore:
    def __init__(
        self, url: str, prefix: str, max_records: int, timeout: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.url = url
        self.prefix = f"{prefix}:records:"
        self.max_records = max_records
        self.timeout = timeout
        self.clock = clock
        self.client = connect(url, timeout)
        self._insert = self.client.register_script(INSERT)
        self._replace = self.client.register_script(REPLACE)
        self._delete = self.client.register_script(DELETE)
        self._purge = self.client.register_script(PURGE)
        self.errors = 0
        self.last_error = ""
        self._failing = False

    def _rec(self, record_id: str) -> str:
        return f"{self.prefix}rec:{record_id}"

    def _index(self, kind: str, owner: str) -> str:
        return f"{self.prefix}index:{kind}:{owner}"

    async def call(self, op: Callable[[Redis], Awaitable[T]]) -> T:
        """`op` on the client within the timeout; any Redis failure is a StoreUnavailable (503)."""
        try:
            async with asyncio.timeout(self.timeout):
                result = await op(self.client)
        except Exception as exc:  # noqa: BLE001 - every Redis failure is one clear 503
            self.errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"[:200] if str(exc) else type(exc).__name__
            if not self._failing:
                self._failing = True
                log.warning("sessions redis at %s failed (%s): session requests get 503", redacted(self.url), exc)
            raise StoreUnavailable("The sessions store (Redis) is unavailable; retry shortly", retry_after=1) from exc
        if self._failing:
            self._failing = False
            log.info("sessions redis at %s answers again", redacted(self.url))
        return result

    async def get(self, record_id: str) -> Record | None:
        async def get(client: Redis) -> bytes | None:
            data: bytes | None = await client.get(self._rec(record_id))
            return data

        data = await self.call(get)
        record = _decode(data) if data is not None else None
        if record is None or record.id != record_id or record.expired(self.clock()):
            return None
        return record

    async def put(self, record: Record, *, new: bool) -> bool:
        text = json.dumps(
            {
                "id": record.id,
                "kind": record.kind,
                "owner": record.owner,
                "created_at": record.created_at,
                "expires_at": record.expires_at,
                "body": record.body,
            },
            ensure_ascii=False,
            separators=(",", ":"),
        )
        expires = _ms(record.expires_at)
        if not new:
            keys = [self._rec(record.id), self.prefix + "all"]

            async def replace(client: Redis) -> object:
                return await self._replace(keys=keys, args=[text, expires, _member(record)], client=client)

            return bool(await self.call(replace))
        now = self.clock()
        keys = [self._rec(record.id), self.prefix + "all", self._index(record.kind, record.owner)]
        args = [
            text,
            expires,
            _ms(now),
            self.max_records,
            _member(record),
            record.id,
            _ms(record.created_at),
            self.prefix,
            PURGE_PER_INSERT,
        ]

        async def insert(client: Redis) -> object:
            return await self._insert(keys=keys, args=args, client=client)

        result = await self.call(insert)
        if isinstance(result, list):
            soonest = result[1].decode() if isinstance(result[1], bytes) else str(result[1])
            wait = int(float(soonest) / 1000 - now) + 1 if soonest not in ("", "inf") else 60
            raise StoreFull(f"The server keeps at most {self.max_records} sessions and responses", retry_after=wait)
        return bool(result)

    async def delete(self, record_id: str) -> bool:
        record = await self.get(record_id)
        if record is None:
            return False
        keys = [self._rec(record_id), self.prefix + "all", self._index(record.kind, record.owner)]

        async def delete(client: Redis) -> object:
            return await self._delete(keys=keys, args=[_member(record), record_id], client=client)

        return bool(await self.call(delete))

    async def page(self, kind: RecordKind, owner: str, after: str | None, limit: int) -> tuple[list[Record], bool]:
        index = self._index(kind, owner)

        async def page(client: Redis) -> tuple[list[Record], bool]:
            start = 0
            if after is not None:
                rank = await client.zrank(index, after)
                if rank is None:
                    return [], False  # the cursor expired meanwhile: never start over from the first page
                start = int(rank) + 1
            found: list[Record] = []
            stale: list[str] = []
            now = self.clock()
            while len(found) <= limit:
                ids = [_text(i) for i in await client.zrange(index, start, start + PAGE_BATCH - 1)]
                if not ids:
                    break
                for record_id, data in zip(ids, await client.mget([self._rec(i) for i in ids]), strict=True):
                    record = _decode(data) if data is not None else None
                    if record is None or record.expired(now):
                        stale.append(record_id)
                    else:
                        found.append(record)
                start += PAGE_BATCH
            if stale:
                await client.zrem(index, *stale)
            return found[:limit], len(found) > limit

        return await self.call(page)

    async def purge(self) -> int:
        async def purge(client: Redis) -> int:
            gone = await self._purge(keys=[self.prefix + "all"], args=[_ms(self.clock()), self.prefix], client=client)
            return int(str(gone))

        return await self.call(purge)

    def status(self) -> dict[str, object]:
        return {
            "url": redacted(self.url),
            "state": "unavailable" if self._failing else "ok",
            "errors": self.errors,
            "last_error": self.last_error or None,
        }

    async def aclose(self) -> None:
        try:
            await self.client.aclose()
        except Exception as exc:  # noqa: BLE001 - nothing to keep from a dead connection
            log.debug("closing the sessions redis client: %s", exc)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _decode(data: bytes) -> Record | None:
    """A record from its JSON; None (treated as missing) for anything we did not write."""
    try:
        raw = json.loads(data)
        kind = raw["kind"]
        if kind not in ("session", "response") or not isinstance(raw["body"], dict):
            return None
        expires = raw["expires_at"]
        return Record(
            str(raw["id"]),
            kind,
            str(raw["owner"]),
            float(raw["created_at"]),
            None if expires is None else float(expires),
            raw["body"],
        )
    except (ValueError, KeyError, TypeError):
        return None
