"""One turn at a time per session across replicas: redis-py's `Lock` (SET NX PX with a random token,
released and extended by its Lua scripts) under `{REDIS_PREFIX}:records:lock:{session id}`.

A turn first takes its own process's lock (sessions/locks.py), so one waiter per process polls
Redis, then the Redis lock, both within the same wait. The lock lives LOCK_TTL seconds and a held
lock is renewed every third of that, so a long turn keeps it and a replica that dies mid-turn
holds the session for LOCK_TTL at most. Before the reply is stored the lock is renewed once more
(that renewal fails if another turn took the lock meanwhile), and stored within the fresh TTL.

Fails closed like the store: a Redis error while locking, or a lock that lapsed while Redis was
away, is a 503 `sessions_unavailable` and the reply is not kept. Releasing never fails a turn: a
lock Redis could not release expires on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

from redis.asyncio import Redis
from redis.asyncio.lock import Lock
from redis.exceptions import LockNotOwnedError

from core.errors import ServiceError
from scale.redis_store import RedisStore, StoreUnavailable
from sessions.locks import LocalHold, LocalLocks, SessionBusy, busy

log = logging.getLogger("llmservice.sessions")

LOCK_TTL = 30.0  # seconds a lock outlives its last renewal
FIRST_POLL = 0.02  # seconds between tries while another replica holds the lock, doubling up to MAX_POLL
MAX_POLL = 0.25


class RedisHold:
    def __init__(self, store: RedisStore, lock: Lock, local: LocalHold, ttl: float) -> None:
        self._store = store
        self._lock = lock
        self._local = local
        self._lost: ServiceError | None = None
        self._released = False
        self._renewer = asyncio.get_running_loop().create_task(self._renew_forever(ttl / 3))

    async def _reacquire(self) -> bool:
        """Reset the lock's TTL; False when this turn no longer owns it."""

        async def reacquire(_: Redis) -> bool:
            try:
                await self._lock.reacquire()
            except LockNotOwnedError:
                return False
            return True

        return await self._store.call(reacquire)

    def _lapsed(self) -> StoreUnavailable:
        return StoreUnavailable(
            "This turn's lock on the session lapsed while the sessions store (Redis) was unreachable: "
            "its reply was not kept; retry the turn",
            retry_after=1,
        )

    async def _renew_forever(self, every: float) -> None:
        while True:
            await asyncio.sleep(every)  # a period, not synchronisation
            try:
                if not await self._reacquire():
                    log.warning("a session's turn lock lapsed (renewal came too late): its reply will not be kept")
                    self._lost = self._lapsed()
                    return
            except StoreUnavailable:
                continue  # the lock may still be ours: confirm() decides before the reply is stored

    async def confirm(self) -> None:
        if self._lost is not None:
            raise self._lost
        if not await self._reacquire():  # the TTL starts again: the store's write comes well within it
            raise self._lapsed()

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._renewer.cancel()
        try:
            await asyncio.shield(self._release_in_redis())  # a cancelled caller must not leave it half done
        finally:
            await self._local.release()

    async def _release_in_redis(self) -> None:
        async def release(_: Redis) -> None:
            with contextlib.suppress(LockNotOwnedError):  # lapsed: someone else's now, or nobody's
                await self._lock.release()

        try:
            await self._store.call(release)
        except StoreUnavailable:
            log.info("a session's turn lock could not be released: it expires within %g s", self._lock.timeout)


class RedisLocks:
    def __init__(self, store: RedisStore, ttl: float = LOCK_TTL) -> None:
        self.store = store
        self.ttl = ttl
        self.local = LocalLocks()

    def _name(self, session_id: str) -> str:
        return f"{self.store.prefix}lock:{session_id}"

    async def acquire(self, session_id: str, wait: float) -> RedisHold:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        local = await self.local.acquire(session_id, wait)
        lock = self.store.client.lock(self._name(session_id), timeout=self.ttl, thread_local=False)
        token = secrets.token_hex(16)
        try:

            async def take(_: Redis) -> bool:
                return await lock.acquire(blocking=False, token=token)

            pause = FIRST_POLL
            while not await self.store.call(take):
                left = deadline - loop.time()
                if left <= 0:
                    raise busy(wait)
                await asyncio.sleep(min(pause, left))  # polling is how a Redis lock is waited for
                pause = min(pause * 2, MAX_POLL)
            return RedisHold(self.store, lock, local, self.ttl)
        except SessionBusy:
            await local.release()
            raise
        except BaseException:
            # Cancelled or timed out mid-call: the SET may have landed, so drop it if it did.
            try:
                await asyncio.shield(self._drop(lock, token))
            finally:
                await local.release()
            raise

    async def _drop(self, lock: Lock, token: str) -> None:
        async def drop(_: Redis) -> None:
            with contextlib.suppress(LockNotOwnedError):
                await lock.do_release(token.encode())

        with contextlib.suppress(StoreUnavailable):
            await self.store.call(drop)

    def users(self, session_id: str) -> int:
        return self.local.users(session_id)
