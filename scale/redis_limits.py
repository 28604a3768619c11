"""Rate limits shared by replicas: the `Limiter` of middleware/limits.py as two scripts in Redis.

The buckets are those of `LocalLimiter` (full at first, refilled at limit/60 per second, tokens
charged after the fact), kept per key name in a Redis hash each and updated atomically by a script
that reads Redis's own clock, so replicas with skewed clocks agree. Parallel requests are members
of a sorted set scored by when their lease ends: a replica that dies holding slots frees them when
the lease runs out instead of blocking the key for ever.

Fails open (scale/redis_link.py): while Redis is unavailable each process limits on its own with a
`LocalLimiter`, and a request admitted that way is finished there (its slot says so).
"""

from __future__ import annotations

import dataclasses
import secrets
import time

from redis.asyncio import Redis

from middleware.keys import ApiKey
from middleware.limits import WHOLE, WINDOW, Bucket, Decision, LocalLimiter, decide, refusals
from scale.redis_link import FailOpen

SLOT_LEASE = 900.0  # seconds a parallel slot counts at most: longer than any request we let run by default
LOCAL = "local"  # the slot of a request admitted by the fallback limiter
MAX_UNFINISHED = 10000  # finishes kept for Redis's return; past this, leases free the slots
FLUSH_PER_CALL = 8  # kept finishes sent along with one call (each call must stay within REDIS_TIMEOUT_MS)

# Shared by both scripts: a bucket's level now, and saving it with an expiry after which it would
# be full anyway (so an idle key leaves nothing behind).
_BUCKET = """
local function level(key, limit, now, window)
  local saved = redis.call('HMGET', key, 'level', 'stamp')
  local value = tonumber(saved[1]) or limit
  local stamp = tonumber(saved[2]) or now
  return math.min(limit, value + math.max(0, now - stamp) * limit / window)
end
local function save(key, limit, value, now, window)
  redis.call('HSET', key, 'level', tostring(value), 'stamp', tostring(now))
  redis.call('EXPIRE', key, math.ceil((limit - value) * window / limit) + 1)
end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
"""

# KEYS: requests bucket, tokens bucket, parallel set. ARGV: rpm, tpm, max_parallel, slot, lease, whole, window.
# Returns {admitted, requests level, tokens level, running before this one}; levels as text (Lua
# numbers would come back truncated to integers).
ADMIT = (
    _BUCKET
    + """
local rpm, tpm, parallel = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local lease, whole, window = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local requests = rpm > 0 and level(KEYS[1], rpm, now, window)
local tokens = tpm > 0 and level(KEYS[2], tpm, now, window)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local running = redis.call('ZCARD', KEYS[3])
local refused = (requests and requests < whole) or (tokens and tokens < whole) or (parallel > 0 and running >= parallel)
if not refused then
  if requests then requests = requests - 1 end
  redis.call('ZADD', KEYS[3], now + lease, ARGV[4])
  redis.call('EXPIRE', KEYS[3], math.ceil(lease) + 1)
end
if requests then save(KEYS[1], rpm, requests, now, window) end
if tokens then save(KEYS[2], tpm, tokens, now, window) end
return {refused and 0 or 1, tostring(requests or ''), tostring(tokens or ''), running}
"""
)

# KEYS: tokens bucket, parallel set. ARGV: slot, tpm, tokens used, window.
FINISH = (
    _BUCKET
    + """
redis.call('ZREM', KEYS[2], ARGV[1])
local tpm, used, window = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if tpm > 0 and used > 0 then
  save(KEYS[1], tpm, level(KEYS[1], tpm, now, window) - used, now, window)
end
return 1
"""
)


class RedisLimiter:
    def __init__(self, link: FailOpen, prefix: str, fallback: LocalLimiter | None = None) -> None:
        self.link = link
        self.prefix = prefix
        self.fallback = fallback if fallback is not None else LocalLimiter()
        self._admit = link.client.register_script(ADMIT)
        self._finish = link.client.register_script(FINISH)
        # Finishes Redis missed (keys, args), sent again with the next call that reaches it, so a
        # blip does not hold a key's parallel slots until their lease ends.
        self._unfinished: list[tuple[list[str], list[object]]] = []

    def _keys(self, key: ApiKey) -> tuple[str, str, str]:
        # One hash tag per key name: the three keys of a script share a Redis Cluster slot.
        base = f"{self.prefix}:limits:{{{key.name}}}"
        return f"{base}:requests", f"{base}:tokens", f"{base}:parallel"

    async def admit(self, key: ApiKey) -> Decision:
        slot = secrets.token_hex(8)
        args = [key.rpm, key.tpm, key.max_parallel, slot, SLOT_LEASE, WHOLE, WINDOW]

        async def run(client: Redis) -> list[object]:
            await self._flush(client)
            result: list[object] = await self._admit(keys=list(self._keys(key)), args=args, client=client)
            return result

        result = await self.link.call(run, None)
        if result is None:  # Redis unavailable: this process's own limits
            decision = await self.fallback.admit(key)
            return dataclasses.replace(decision, slot=LOCAL) if decision.allowed else decision
        admitted, requests_level, tokens_level, running = result
        now = time.monotonic()
        requests = Bucket(float(_text(requests_level)), now) if key.rpm else None
        tokens = Bucket(float(_text(tokens_level)), now) if key.tpm else None
        if admitted:
            return decide(key, requests, tokens, [], slot)
        return decide(key, requests, tokens, refusals(key, requests, tokens, int(str(running))))

    async def finish(self, key: ApiKey, tokens: int, slot: str = "") -> None:
        if slot == LOCAL:
            await self.fallback.finish(key, tokens)
            return
        _, tokens_key, parallel_key = self._keys(key)
        call: tuple[list[str], list[object]] = ([tokens_key, parallel_key], [slot, key.tpm, max(0, tokens), WINDOW])

        async def run(client: Redis) -> bool:
            await self._flush(client)
            await self._finish(keys=call[0], args=call[1], client=client)
            return True

        if not await self.link.call(run, False) and len(self._unfinished) < MAX_UNFINISHED:
            self._unfinished.append(call)

    async def _flush(self, client: Redis) -> None:
        for _ in range(min(FLUSH_PER_CALL, len(self._unfinished))):
            keys, args = self._unfinished[0]
            await self._finish(keys=keys, args=args, client=client)
            self._unfinished.pop(0)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
