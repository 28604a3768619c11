"""The chat-turn seam: one place owns a chat or completion turn.

`open_turn` is what a route calls. It looks the turn up in the response cache (a hit replays the
recorded events and loads nothing), else leases the tier and starts the turn on its `ChatBackend`,
records the events for the cache, and shapes tool calls. The local backend (chat/local.py) renders,
tokenizes and submits to a token engine; a backend that speaks OpenAI to an upstream server
(remote/chat.py) implements the same `start_turn` and skips all of that, tool calls included: its
turn says `native_tools`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cache import ResponseCache
from chat import mlx_vision, recording, tools
from config import TierConfig
from core.errors import InvalidRequest, RequestTimeout
from core.events import ErrorEvent, Event
from core.turns import ChatBackend, Choice, Turn, TurnRequest

if TYPE_CHECKING:  # the manager imports the local backend; the turn only leases through it
    from model_manager import ModelManager


async def open_turn(
    manager: ModelManager,
    cache: ResponseCache | None,
    tier: TierConfig,
    endpoint: str,
    request: TurnRequest,
    policy: recording.CachePolicy,
) -> Turn:
    """Start `request` on `tier` (or replay it from the cache). The caller must `aclose()` the turn."""
    if request.images:
        require_image_support(tier)
    entry = await recording.lookup(cache, endpoint, tier, request, policy)
    if entry.hit is not None:
        replayed = recording.replay(entry.hit)
        replayed.choices = _shaped(replayed.choices, request)
        return replayed
    deadline = time.monotonic() + tier.request_timeout if tier.request_timeout > 0 else None
    stack = contextlib.AsyncExitStack()
    try:
        backend: ChatBackend = await stack.enter_async_context(manager.lease(tier.name, tier))
        started = await backend.start_turn(request)
    except BaseException:
        await stack.aclose()
        raise
    if started.native_tools and request.tools is not None:
        entry.store = False  # the cache keeps text, not the upstream's tool calls: nothing to replay them from
    choices = recording.record(started.choices, entry, started.prompt_tokens)
    if deadline is not None:
        choices = [_Deadline(choice, deadline, tier.request_timeout) for choice in choices]
    # The backend's own turn goes on (a remote one fills in prompt_tokens when its upstream reports usage).
    started.choices = choices if started.native_tools else _shaped(choices, request)
    started.cache_status = entry.status
    started.closers.append(stack.aclose)
    return started


def reads_images(tier: TierConfig) -> bool:
    """Whether the tier's local model takes images, known from its configuration (nothing loaded)."""
    if tier.backend == "llamacpp":
        return bool(tier.mmproj)
    return tier.backend == "mlx" and mlx_vision.is_vision_folder(tier.model_path)


def require_image_support(tier: TierConfig) -> None:
    """A 400 naming the tier when its model reads no images (known from its configuration, nothing loaded)."""
    if tier.backend == "remote" or reads_images(tier):
        return  # a remote tier's upstream decides
    hint = (
        f"set {tier.name.upper()}_MMPROJ to its projector GGUF" if tier.backend == "llamacpp" else "use a vision model"
    )
    raise InvalidRequest(
        f"The {tier.name} tier does not accept images: its model is text only ({hint})", param="messages"
    )


def _shaped(choices: Sequence[Choice], request: TurnRequest) -> list[Choice]:
    plan = request.tools
    if plan is None:
        return list(choices)
    return [_Mapped(choice, lambda events: tools.shape_calls(events, plan, not request.stream)) for choice in choices]


@dataclass
class _Deadline:
    """A choice that ends with a 504 error event once the request's time is up (its work is stopped)."""

    inner: Choice
    deadline: float  # time.monotonic()
    limit: float

    async def events(self) -> AsyncIterator[Event]:
        events = aiter(self.inner.events())
        while True:
            try:
                async with asyncio.timeout(max(0.0, self.deadline - time.monotonic())):
                    event = await anext(events)
            except StopAsyncIteration:
                return
            except TimeoutError:
                self.inner.cancel()
                yield ErrorEvent(RequestTimeout(f"The request ran over its time limit of {self.limit:g} s"))
                return
            yield event

    def cancel(self) -> None:
        self.inner.cancel()


@dataclass
class _Mapped:
    """A choice whose events pass through a transformation (tool-call shaping)."""

    inner: Choice
    transform: Callable[[AsyncIterator[Event]], AsyncIterator[Event]]

    def events(self) -> AsyncIterator[Event]:
        return self.transform(self.inner.events())

    def cancel(self) -> None:
        self.inner.cancel()
