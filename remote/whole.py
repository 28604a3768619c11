"""A non-streamed request's answer read whole before our client gets a byte, so an upstream that
fails mid-answer is still a fault to fail over from.

"Failover only before our first byte": for a stream our first byte follows the upstream's first
event, but a whole (non-streamed) answer is sent only once it is complete. So when the upstream dies,
stalls past `STREAM_IDLE_TIMEOUT` or sends an error event mid-answer, the answer so far is dropped and
the request goes to another upstream, within the request's `1 + RETRIES` attempts (`Tries`, shared
with the attempts before the first event). When no other upstream may take it, the client gets the
failure as it was (a 502 `upstream_error`). The choices wait for the whole answer, so the route
watching for its client to leave still cancels it (the turn's `aclose` drops the connection).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from core.errors import ServiceError
from core.events import DoneEvent, ErrorEvent, Event
from core.turns import Choice, Turn
from remote.pool import Upstream, UpstreamUnavailable
from remote.stream import Exchange, RemoteChoice

log = logging.getLogger("llmservice.remote")


@dataclass
class Tries:
    """A request's attempts: how many are left, the upstreams tried and what each ran into."""

    left: int
    tried: list[Upstream] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


class WholeAnswer:
    """Every choice's events of one upstream answer, read to the end; another upstream's on a fault."""

    def __init__(self, exchange: Exchange, reopen: Callable[[], Awaitable[Exchange]]) -> None:
        self.exchange = exchange
        self.reopen = reopen  # the next attempt (raises UpstreamUnavailable when none is left)
        self.turn: Turn | None = None
        self._answer: list[list[Event]] | None = None
        self._lock = asyncio.Lock()  # the first choice to ask reads for all

    def choices(self) -> list[Choice]:
        return [_WholeChoice(self, index) for index in range(len(self.exchange.states))]

    async def events_of(self, index: int) -> list[Event]:
        async with self._lock:
            if self._answer is None:
                self._answer = await self._read()
        return self._answer[index]

    async def _read(self) -> list[list[Event]]:
        while True:
            exchange = self.exchange
            answer = [[event async for event in RemoteChoice(exchange, state).events()] for state in exchange.states]
            complete = all(isinstance(events[-1], DoneEvent) for events in answer if events)
            if complete or exchange.attempt.outcome != "fault":
                return answer  # done, or stopped by us (client gone, tier unloading): nothing to retry
            failed = exchange.attempt.upstream
            await exchange.aclose()  # an upstream that sent an error event may keep its connection open
            try:
                self.exchange = await self.reopen()
            except UpstreamUnavailable:
                return answer  # no other upstream may take it: the failure as it was
            except ServiceError as refused:  # the next upstream refused the request itself (a 4xx)
                return [[ErrorEvent(refused)] for _ in answer]
            log.warning(
                "tier %s: upstream %s failed mid-answer; asking %s for the whole answer instead",
                exchange.config.name,
                failed.label,
                self.exchange.attempt.upstream.label,
            )
            self.exchange.turn = self.turn
            if self.turn is not None:
                self.turn.upstream = self.exchange.attempt.upstream.label

    async def aclose(self) -> None:
        await self.exchange.aclose()


@dataclass
class _WholeChoice:
    whole: WholeAnswer
    index: int

    async def events(self) -> AsyncIterator[Event]:
        for event in await self.whole.events_of(self.index):
            yield event

    def cancel(self) -> None:
        """The turn's closer (`WholeAnswer.aclose`) drops the connection, which stops the upstream."""
