"""Message lists of kept conversations: their size, trimming oldest turn first, and the turn's reply.

A turn, for trimming, is a user message and everything that answered it (assistant replies, tool
calls and tool results) up to the next user message. System (and developer) messages at the head of
a conversation are never trimmed, and neither is the turn being asked now.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import cast

from core.errors import ContextLengthExceeded, ServiceError
from core.events import DoneEvent, ErrorEvent, Event, TextEvent, ToolCallEvent
from core.turns import Choice, JsonObject, JsonValue, Message, Turn

HEAD_ROLES = frozenset({"system", "developer"})
_MESSAGE_KEYS = ("role", "content", "name", "tool_calls", "tool_call_id")

Starter = Callable[[tuple[Message, ...]], Awaitable[Turn]]


def size(messages: Sequence[Message]) -> int:
    """Bytes of the messages as stored: each one's compact JSON, UTF-8."""
    return sum(len(json.dumps(m, ensure_ascii=False, separators=(",", ":")).encode()) for m in messages)


def head_length(messages: Sequence[Message]) -> int:
    return next((i for i, m in enumerate(messages) if m.get("role") not in HEAD_ROLES), len(messages))


def _oldest_turn(messages: Sequence[Message]) -> tuple[int, int]:
    """The slice of the oldest turn after the head (empty when there is none)."""
    start = head_length(messages)
    if start >= len(messages):
        return start, start
    end = next((i for i in range(start + 1, len(messages)) if messages[i].get("role") == "user"), len(messages))
    return start, end


def drop_oldest_turn(messages: list[Message]) -> int:
    """Remove the oldest turn after the head, in place; how many messages went (0: nothing to drop)."""
    start, end = _oldest_turn(messages)
    del messages[start:end]
    return end - start


def fit(
    history: Sequence[Message], tail: Sequence[Message], max_messages: int, max_bytes: int
) -> tuple[list[Message], int]:
    """`history` trimmed (oldest turn first) until history + tail keeps within the bounds, or nothing
    more can go; and how many messages went."""
    kept = list(history)
    sizes = [size([m]) for m in kept]  # measured once: a long history loses many turns in one go
    total = sum(sizes) + size(tail)
    dropped = 0
    while len(kept) + len(tail) > max_messages or total > max_bytes:
        start, end = _oldest_turn(kept)
        if start == end:
            break
        total -= sum(sizes[start:end])
        del kept[start:end], sizes[start:end]
        dropped += end - start
    return kept, dropped


async def start_fitting(
    head: Sequence[Message], history: Sequence[Message], new: Sequence[Message], begin: Starter, trim: bool
) -> tuple[Turn, list[Message], int]:
    """Start the turn on head + history + new. With `trim`, while the tier refuses it as longer than
    its context, drop history's oldest turn and try again. Returns the turn, the history it was
    started on and how many messages were dropped."""
    kept = list(history)
    dropped = 0
    while True:
        try:
            return await begin((*head, *kept, *new)), kept, dropped
        except ContextLengthExceeded:
            gone = drop_oldest_turn(kept) if trim else 0
            if not gone:
                raise
            dropped += gone


# ---------------------------------------------------------------- the reply


def reply_message(text: str, calls: Sequence[ToolCallEvent]) -> Message:
    """The assistant message a choice's events amount to, as a client would resend it."""
    if not calls:
        return {"role": "assistant", "content": text}
    tool_calls: list[JsonObject] = [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}} for c in calls
    ]
    return {"role": "assistant", "content": text or None, "tool_calls": tool_calls}


@dataclass
class Committing:
    """A choice whose reply is handed to `commit` once it ended well, before its DoneEvent passes on.

    An error event, a cancellation or a client that stops reading before the end commits nothing.
    A commit that fails (the store refused it) ends the choice with that error instead of the
    DoneEvent, so the client knows the reply was not kept.
    """

    inner: Choice
    commit: Callable[[Message], Awaitable[None]]

    async def events(self) -> AsyncIterator[Event]:
        pieces: list[str] = []
        calls: list[ToolCallEvent] = []
        async for event in self.inner.events():
            if isinstance(event, TextEvent):
                pieces.append(event.text)
            elif isinstance(event, ToolCallEvent):
                calls.append(event)
            elif isinstance(event, DoneEvent) and event.finish_reason != "cancelled":
                try:
                    await self.commit(reply_message("".join(pieces), calls))
                except ServiceError as exc:
                    yield ErrorEvent(exc)
                    return
            yield event

    def cancel(self) -> None:
        self.inner.cancel()


# ---------------------------------------------------------------- JSON


def to_json(messages: Sequence[Message]) -> list[JsonValue]:
    return [cast(JsonObject, {k: m[k] for k in _MESSAGE_KEYS if k in m}) for m in messages]  # type: ignore[literal-required]


def from_json(value: JsonValue) -> list[Message]:
    """Stored messages back as `Message`s (anything that is not one is skipped: records are JSON from a store)."""
    if not isinstance(value, list):
        return []
    out: list[Message] = []
    for item in value:
        if isinstance(item, dict) and isinstance(item.get("role"), str):
            out.append(cast(Message, {k: item[k] for k in _MESSAGE_KEYS if k in item}))
    return out
