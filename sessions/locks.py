"""One turn at a time per session: the lock a turn holds from before it reads the history until it closes.

`TurnLocks.acquire(session_id, wait)` waits up to `wait` seconds for the session's previous turn to
close, then gives up with 409 `session_busy` (Retry-After: 1): a client may retry, or send its turns
one after the other. It returns a `Hold`: `confirm()` just before the reply is stored (it raises
when the turn no longer holds the lock, so a reply is never stored past a turn that may have started
meanwhile), and `release()`, which never raises and is safe to call twice.

`LocalLocks` serialises the turns of one process (an asyncio lock per session, first come first
served). Replicas sharing a Redis store use scale/redis_locks.py, which takes this process's lock
first and then one in Redis.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from core.errors import Conflict

BUSY_RETRY_AFTER = 1  # seconds: the turn ahead may end at any moment


class SessionBusy(Conflict):
    """Another turn on the session ran for longer than this one could wait."""

    code = "session_busy"

    def __init__(self, message: str) -> None:
        super().__init__(message, param="session_id", headers={"Retry-After": str(BUSY_RETRY_AFTER)})


def busy(wait: float) -> SessionBusy:
    waited = f"after waiting {wait:g} s " if wait > 0 else ""
    return SessionBusy(
        f"Another turn on this session is still running {waited}(a session takes one turn at a time): "
        "retry once it has ended"
    )


class Hold(Protocol):
    async def confirm(self) -> None:
        """Raise a ServiceError if the lock is no longer held (the reply must then not be stored)."""
        ...

    async def release(self) -> None:
        """Let the session's next turn go; never raises; a second call does nothing."""
        ...


class TurnLocks(Protocol):
    async def acquire(self, session_id: str, wait: float) -> Hold: ...

    def users(self, session_id: str) -> int:
        """Turns of this process on the session, running or waiting."""
        ...


class LocalHold:
    def __init__(self, locks: LocalLocks, key: str, lock: asyncio.Lock) -> None:
        self._locks = locks
        self._key = key
        self._lock = lock
        self._released = False

    async def confirm(self) -> None:
        return None  # nothing else can take a lock of this process

    async def release(self) -> None:
        if not self._released:
            self._released = True
            self._lock.release()
            self._locks.leave(self._key)


class LocalLocks:
    """One asyncio lock per session id, forgotten when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    async def acquire(self, session_id: str, wait: float) -> LocalHold:
        lock, users = self._locks.get(session_id, (asyncio.Lock(), 0))
        self._locks[session_id] = (lock, users + 1)
        try:
            if lock.locked() and wait <= 0:
                raise busy(wait)
            async with asyncio.timeout(wait if wait > 0 else None):
                await lock.acquire()
        except TimeoutError:
            self.leave(session_id)
            raise busy(wait) from None
        except BaseException:
            self.leave(session_id)
            raise
        return LocalHold(self, session_id, lock)

    def users(self, session_id: str) -> int:
        return self._locks.get(session_id, (None, 0))[1]

    def leave(self, session_id: str) -> None:
        lock, users = self._locks[session_id]
        if users <= 1:
            del self._locks[session_id]
        else:
            self._locks[session_id] = (lock, users - 1)
