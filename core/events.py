"""The events of one generated choice: what crosses from a model to the HTTP formatters.

The engine (chat/scheduler.py) emits text, done and error events from its owner thread; a chat turn
(chat/turn.py) adds tool-call events and ends every choice with exactly one `DoneEvent` or
`ErrorEvent`. Formatters (api/) and the response cache only read them, so a live choice, a replay
from the cache and an upstream server's stream look the same.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from core.errors import ServiceError

if TYPE_CHECKING:  # core.turns imports this module
    from core.turns import JsonObject


@dataclass(frozen=True)
class TextEvent:
    """A piece of generated text (a stream's chunk boundary)."""

    text: str
    # An upstream's `logprobs` for this piece, in its wire shape (chat: {"content": [...]}; completions:
    # {"tokens": [...], ...}), passed through untouched; local engines never set it.
    logprobs: JsonObject | None = None


@dataclass(frozen=True)
class ToolCallEvent:
    """One complete function call the model made (OpenAI `tool_calls[index]`)."""

    index: int
    id: str
    name: str
    arguments: str  # JSON text


@dataclass(frozen=True)
class DoneEvent:
    """The end of a choice, with its usage and timings."""

    finish_reason: str  # engine: "stop" | "length" | "cancelled"; turn: "stop" | "length" | "tool_calls"
    prompt_tokens: int
    completion_tokens: int
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0


@dataclass(frozen=True)
class ErrorEvent:
    """The choice failed; nothing follows."""

    error: ServiceError


EngineEvent = TextEvent | DoneEvent | ErrorEvent
Event = TextEvent | ToolCallEvent | DoneEvent | ErrorEvent
Sink = Callable[[EngineEvent], None]
