"""Spill-over: a local chat tier whose overflow goes to a pool of upstream servers.

With `{TIER}_SPILLOVER_UPSTREAMS` set, a request the local tier refuses because its queue is full
(`{TIER}_MAX_QUEUE`, the 503 `overloaded`) is sent to the pool instead, with everything a remote tier
does (balancing, failover before the first byte, breakers). With `{TIER}_SPILLOVER_AFTER_MS` too, so is
one that would wait longer than that for a local slot: the turns ahead of it, `parallel` at a time, each
lasting what local turns have lasted lately (no estimate before the first local turn ends). The local
tier serves whenever it can, so the upstreams only see bursts. The pool shares the tier's remote keys
(`UPSTREAM_MODEL`, `API_KEY`, `RETRIES`, timeouts, breaker, `LB_POLICY`); it should serve the same
model, since the response cache does not tell the two apart.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping

from config import TierConfig
from core.errors import Overloaded
from core.turns import ChatBackend, JsonValue, Turn, TurnRequest
from remote.chat import RemoteChat
from remote.pool import Pool

log = logging.getLogger("llmservice.remote")


class SpillOver:
    """A `ChatBackend`: the local backend first, the upstream pool when its queue is full (or, with
    `after_ms`, when the expected wait for a local slot is longer)."""

    def __init__(
        self, local: ChatBackend, remote: RemoteChat, after_ms: float = 0.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.local = local
        self.remote = remote
        self.ready = local.ready
        self.after_s = after_ms / 1000.0
        self.clock = clock
        self.spilled = 0  # requests the pool took (status)
        self.turn_seconds: float | None = None  # a local turn's duration, averaged (EWMA) over recent ones

    def expected_wait(self) -> float:
        """Seconds a new request would wait for a local slot (0 while one is free or nothing is known)."""
        status = self.local.status()
        active, queued, parallel = (status.get(key) for key in ("active", "queued", "parallel"))
        if self.turn_seconds is None or not all(isinstance(v, int) for v in (active, queued, parallel)):
            return 0.0
        ahead = active + queued - parallel + 1  # turns that must end before this one gets a slot
        return math.ceil(ahead / parallel) * self.turn_seconds if ahead > 0 and parallel > 0 else 0.0

    async def start_turn(self, request: TurnRequest) -> Turn:
        if self.after_s and (wait := self.expected_wait()) > self.after_s:
            return await self._spill(request, f"a local slot is ~{wait * 1000:.0f} ms away")
        try:
            turn = await self.local.start_turn(request)
        except Overloaded:
            return await self._spill(request, "local queue full")
        started = self.clock()

        async def observe() -> None:
            seconds = self.clock() - started
            self.turn_seconds = seconds if self.turn_seconds is None else 0.8 * self.turn_seconds + 0.2 * seconds

        turn.closers.append(observe)
        return turn

    async def _spill(self, request: TurnRequest, why: str) -> Turn:
        self.spilled += 1
        log.info("tier %s: %s, spilling the request over to its upstreams", self.remote.config.name, why)
        return await self.remote.start_turn(request)

    def status(self) -> Mapping[str, JsonValue]:
        return {**self.local.status(), "spilled": self.spilled, "upstreams": self.remote.pool.status()}

    @property
    def pool(self) -> Pool:
        return self.remote.pool

    def shutdown(self, timeout: float = 10.0) -> None:
        self.local.shutdown(timeout)
        self.remote.shutdown(timeout)


def with_spillover(local: ChatBackend, config: TierConfig) -> SpillOver:
    """`local` with the tier's spill-over pool behind it."""
    pool_config = dataclasses.replace(config, upstreams=config.spillover_upstreams, backend="remote")
    return SpillOver(local, RemoteChat(pool_config), config.spillover_after_ms)
