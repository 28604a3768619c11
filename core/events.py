"""The events of one generated sequence, as they cross from a model's owner thread to the event loop.

The engine (chat/scheduler.py) emits them; a chat turn (chat/turn.py) adds tool-call deltas and turns
an engine-side cancel into an error; the HTTP formatters and the response cache only read them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from core.errors import ServiceError


@dataclass(frozen=True)
class TextEvent:
    text: str


@dataclass(frozen=True)
class DoneEvent:
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float
    compute_seconds: float


@dataclass(frozen=True)
class ErrorEvent:
    error: ServiceError


Event = TextEvent | DoneEvent | ErrorEvent
Sink = Callable[[Event], None]
