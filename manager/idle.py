"""Idle unloads: the TTL watch, Ollama's `keep_alive`, and unloading a tier once nothing holds it.

A tier with `{TIER}_TTL` > 0 is unloaded that many seconds after its last request finished. A request may
keep it longer (Ollama's `keep_alive`: seconds, or for ever), or ask for it to go as soon as its last
request ends (keep_alive 0, the old servers' unload route). A tier with a request in flight is never
unloaded. Kept apart from model_manager.py, which owns the tiers and calls in here from its public
`keep_alive`, `release`, `unload_idle` and `start_idle_watch`, and from the end of each lease.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from core.errors import Conflict

if TYPE_CHECKING:  # the manager owns this and passes itself
    from model_manager import ModelManager, TierRuntime

log = logging.getLogger("llmservice.models")


class IdleUnloads:
    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager
        self._watch: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()  # unloads a lease's end started without waiting

    def expired(self) -> list[str]:
        """Ready tiers whose TTL has passed since their last request finished, with nothing in flight."""
        now = self.manager.clock()
        return [
            name
            for name, rt in self.manager.tiers.items()
            if rt.config.ttl > 0 and rt.idle and now - rt.idle_since >= rt.config.ttl and now >= rt.keep_until
        ]

    def keep_alive(self, tier: str, seconds: float) -> None:
        """Keep the tier loaded at least `seconds` from now (math.inf: for ever; the TTL decides after that),
        or with 0 unload it once no request holds it. The last request's value replaces the one before, as
        in Ollama."""
        rt = self.manager.tiers[tier]
        rt.keep_until = self.manager.clock() + seconds if seconds > 0 else 0.0
        rt.release_when_idle = seconds <= 0
        self.release_if_asked(rt)

    async def release(self, tier: str) -> bool:
        """Unload the tier now if nothing holds it (True), else once its last request ends (False)."""
        from model_manager import LOADING

        rt = self.manager.tiers[tier]
        rt.keep_until = 0.0
        if rt.in_flight == 0 and rt.state != LOADING:
            rt.release_when_idle = False
            await self.manager.unload_runtime(rt)
            return True
        rt.release_when_idle = True
        return False

    def release_if_asked(self, rt: TierRuntime) -> None:
        """Start unloading `rt` when a request asked for it and none holds it now (a lease has just ended)."""
        if rt.release_when_idle and rt.idle:
            task = asyncio.ensure_future(self._release_idle(rt))  # a lease's end must not wait for it
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _release_idle(self, rt: TierRuntime) -> None:
        # Checked again here: a request may have taken the tier since the task was made.
        if rt.release_when_idle and rt.idle and self.manager.tiers.get(rt.config.name) is rt:
            rt.release_when_idle = False
            log.info("tier %s: unloading now that it is idle, as a request asked", rt.config.name)
            await self.manager.unload_runtime(rt)

    async def unload_idle(self) -> list[str]:
        """Unload the tiers whose TTL has passed; their names."""
        manager = self.manager
        unloaded = []
        for name in self.expired():
            rt = manager.tiers[name]
            if rt.idle:  # re-checked: an earlier unload awaited
                log.info("tier %s idle for %.0fs (TTL): unloading", name, manager.clock() - rt.idle_since)
                await manager.unload(name, force=False)
                unloaded.append(name)
        return unloaded

    def start(self) -> None:
        """Check TTLs in the background (only when some tier has one)."""
        ttls = [rt.config.ttl for rt in self.manager.tiers.values() if rt.config.ttl > 0]
        if ttls and self._watch is None:
            self._watch = asyncio.ensure_future(self._watch_idle(max(0.05, min(1.0, min(ttls) / 4))))

    def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()

    async def _watch_idle(self, poll: float) -> None:
        while not self.manager.closing:
            await asyncio.sleep(poll)
            try:
                await self.unload_idle()
            except Conflict:
                continue  # a request arrived while we unloaded another tier: next round
