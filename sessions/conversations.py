"""Conversations kept by the server: sessions, and the history behind stored responses.

`Conversations` owns the record store (sessions/store.py), the bounds (SESSIONS_* keys) and one lock
per session. A session turn: take the session's lock -> stored history + the new messages -> the
route starts the turn (oldest turns dropped while the tier finds it too long) -> once the reply
ended well, history + new messages + reply are stored -> the lock goes when the turn closes. Two
turns on one session therefore run one after the other, and each sees the other's reply.

The lock is sessions/locks.py's: per process with the memory store, in Redis as well with the Redis
store (scale/redis_locks.py), so replicas never interleave one session's turns either. A turn that
waits past SESSIONS_TURN_WAIT_SECONDS is a 409 `session_busy` with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from config import Settings
from core.errors import InvalidRequest, NotFound
from core.turns import JsonObject, JsonValue, Message, Turn
from sessions import history
from sessions.locks import LocalLocks, TurnLocks
from sessions.store import Record, RecordKind, RecordStore

log = logging.getLogger("llmservice.sessions")

MAX_ID_LENGTH = 128


def new_id(prefix: str) -> str:
    """An unguessable id: 128 random bits."""
    return f"{prefix}_{secrets.token_hex(16)}"


@dataclass(frozen=True)
class Limits:
    ttl: float  # seconds; 0 = never expire
    max_messages: int
    max_bytes: int
    purge_every: float  # seconds; 0 = only when the store is full
    turn_wait: float = 60.0  # seconds a turn waits for the session's previous one; then 409 session_busy

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            settings.sessions_ttl_seconds,
            settings.sessions_max_messages,
            settings.sessions_max_bytes,
            settings.sessions_purge_seconds,
            settings.sessions_turn_wait_seconds,
        )


@dataclass(frozen=True)
class Started:
    turn: Turn
    dropped: int  # history messages left out because the tier's context could not hold them


class Conversations:
    def __init__(
        self,
        store: RecordStore,
        limits: Limits,
        clock: Callable[[], float] = time.time,
        locks: TurnLocks | None = None,
    ) -> None:
        self.store = store
        self.limits = limits
        self.clock = clock
        self._locks: TurnLocks = locks if locks is not None else LocalLocks()
        self._purger: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ records

    def _expiry(self, ttl: float) -> float | None:
        return self.clock() + ttl if ttl > 0 else None

    async def find(self, owner: str, kind: RecordKind, record_id: str, param: str | None = None) -> Record:
        """The live record of that kind and owner; another owner's record is a 404 as well."""
        record = await self.store.get(record_id) if len(record_id) <= MAX_ID_LENGTH else None
        if record is None or record.kind != kind or record.owner != owner:
            raise NotFound(f"No {kind} with id {record_id[:MAX_ID_LENGTH]!r}", param=param or f"{kind}_id")
        return record

    async def delete(self, owner: str, kind: RecordKind, record_id: str) -> None:
        await self.find(owner, kind, record_id)
        await self.store.delete(record_id)

    async def page(self, owner: str, kind: RecordKind, after: str | None, limit: int) -> tuple[list[Record], bool]:
        if after is not None:
            try:
                await self.find(owner, kind, after)
            except NotFound:
                raise InvalidRequest(
                    f"No {kind} with id {after[:MAX_ID_LENGTH]!r} to list after", param="after"
                ) from None
        return await self.store.page(kind, owner, after, limit)

    # ------------------------------------------------------------ sessions

    async def create_session(
        self, owner: str, system: str | None, model: str | None, metadata: Mapping[str, str], ttl: float | None
    ) -> Record:
        lifetime = self.limits.ttl if ttl is None else ttl
        messages: list[Message] = [{"role": "system", "content": system}] if system else []
        now = self.clock()
        body: JsonObject = {
            "model": model,
            "metadata": dict(metadata),
            "ttl": lifetime,
            "messages": history.to_json(messages),
            "turns": 0,
            "trimmed": 0,
            "updated_at": now,
        }
        record = Record(new_id("sess"), "session", owner, now, self._expiry(lifetime), body)
        await self.store.put(record, new=True)
        return record

    async def run_turn(self, owner: str, session_id: str, new: Sequence[Message], begin: history.Starter) -> Started:
        """Start a turn on the session's history plus `new`, holding the session's lock (waiting up to
        SESSIONS_TURN_WAIT_SECONDS for a turn before it, on any replica) until the turn closes; the
        reply is stored once it ended well, if the turn still holds the lock."""
        self.check_new(new)
        await self.find(owner, "session", session_id)  # an unknown id is a 404 before any lock exists for it
        hold = await self._locks.acquire(session_id, self.limits.turn_wait)
        try:
            record = await self.find(owner, "session", session_id)  # as the previous turn left it
            stored = history.from_json(record.body.get("messages"))
            turn, kept, dropped = await history.start_fitting((), stored, new, begin, trim=True)
        except BaseException:
            await hold.release()
            raise

        async def commit(reply: Message) -> None:
            await hold.confirm()
            await self._append(record, kept, [*new, reply], dropped)

        turn.choices[0] = history.Committing(turn.choices[0], commit)
        turn.closers.append(hold.release)
        return Started(turn, dropped)

    def busy(self, session_id: str) -> int:
        """Turns on the session running or waiting to run."""
        return self._locks.users(session_id)

    def check_new(self, new: Sequence[Message]) -> None:
        if len(new) >= self.limits.max_messages:
            raise InvalidRequest(
                f"A session keeps at most {self.limits.max_messages} messages: send fewer", param="messages"
            )
        if history.size(new) > self.limits.max_bytes:
            raise InvalidRequest(
                f"A session keeps at most {self.limits.max_bytes} bytes of messages: send less", param="messages"
            )

    async def _append(self, record: Record, kept: Sequence[Message], tail: Sequence[Message], dropped: int) -> None:
        messages, trimmed = history.fit(kept, tail, self.limits.max_messages, self.limits.max_bytes)
        body = dict(record.body)
        ttl = body.get("ttl")
        body["messages"] = history.to_json([*messages, *tail])
        body["turns"] = _int(body.get("turns")) + 1
        body["trimmed"] = _int(body.get("trimmed")) + dropped + trimmed
        body["updated_at"] = self.clock()
        lifetime = float(ttl) if isinstance(ttl, int | float) else self.limits.ttl
        updated = replace(record, expires_at=self._expiry(lifetime), body=body)
        if not await self.store.put(updated, new=False):
            log.info("session %s was deleted during a turn: its reply is not kept", record.id)

    # ------------------------------------------------------------ stored responses

    async def response_history(self, owner: str, response_id: str) -> list[Message]:
        record = await self.find(owner, "response", response_id, "previous_response_id")
        return history.from_json(record.body.get("messages"))

    async def save_response(
        self, owner: str, response_id: str, response: JsonObject, input_items: list[JsonValue], messages: list[Message]
    ) -> None:
        """Keep a response with its input items and the whole conversation up to it (so a chain
        survives the deletion of an earlier link), trimmed to the session bounds."""
        kept, _ = history.fit(messages[:-1], messages[-1:], self.limits.max_messages, self.limits.max_bytes)
        body: JsonObject = {
            "response": response,
            "input_items": input_items,
            "messages": history.to_json([*kept, *messages[-1:]]),
        }
        now = self.clock()
        await self.store.put(Record(response_id, "response", owner, now, self._expiry(self.limits.ttl), body), new=True)

    # ------------------------------------------------------------ purging

    def start_purging(self) -> None:
        if self.limits.purge_every > 0 and self._purger is None:
            self._purger = asyncio.get_running_loop().create_task(self._purge_forever())

    async def _purge_forever(self) -> None:
        while True:
            await asyncio.sleep(self.limits.purge_every)  # a period, not synchronisation
            gone = await self.store.purge()
            if gone:
                log.debug("purged %d expired sessions and responses", gone)

    async def close(self) -> None:
        if self._purger is not None:
            self._purger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._purger
            self._purger = None


def _int(value: JsonValue) -> int:
    return value if isinstance(value, int) else 0
