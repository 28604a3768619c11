"""Spill-over: a local chat tier whose overflow goes to a pool of upstream servers.

With `{TIER}_SPILLOVER_UPSTREAMS` set, a request the local tier refuses because its queue is full
(`{TIER}_MAX_QUEUE`, the 503 `overloaded`) is sent to the pool instead, with everything a remote tier
does (balancing, failover before the first byte, breakers). The local tier serves whenever it can, so
the upstreams only see bursts. The pool shares the tier's remote keys (`UPSTREAM_MODEL`, `API_KEY`,
`RETRIES`, timeouts, breaker, `LB_POLICY`); it should serve the same model, since the response cache
does not tell the two apart.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

from config import TierConfig
from core.errors import Overloaded
from core.turns import ChatBackend, JsonValue, Turn, TurnRequest
from remote.chat import RemoteChat
from remote.pool import Pool

log = logging.getLogger("llmservice.remote")


class SpillOver:
    """A `ChatBackend`: the local backend first, the upstream pool when its queue is full."""

    def __init__(self, local: ChatBackend, remote: RemoteChat) -> None:
        self.local = local
        self.remote = remote
        self.ready = local.ready
        self.spilled = 0  # requests the pool took (status)

    async def start_turn(self, request: TurnRequest) -> Turn:
        try:
            return await self.local.start_turn(request)
        except Overloaded:
            self.spilled += 1
            log.info("tier %s: local queue full, spilling the request over to its upstreams", self.remote.config.name)
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
    return SpillOver(local, RemoteChat(pool_config))
