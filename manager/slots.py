"""One model at a time: `MAX_LOADED_CHAT_TIERS` (0 = no limit) caps the local chat tiers loaded at once.

For a single small GPU (the queue proxy this service replaces existed for this). A request for a chat
tier that is not loaded, when the cap is reached, waits in one FIFO queue: the driver waits for a loaded
tier's in-flight work to finish (new requests for it queue behind the waiting one, so it does drain),
unloads it, and admits the head of the queue, together with the requests for the same tier right behind
it. A request waits at most its tier's `{TIER}_QUEUE_TIMEOUT`, then gets 503 with Retry-After. A request
is admitted by counting it in flight on its tier before it is woken, so its tier cannot be taken for the
next one in between. `/health` and `/admin/status` show the queue.

Remote chat tiers hold no local model and are not counted; neither are pinned ones (`{TIER}_PIN`), which
are never unloaded for this. A request on a model being swapped out (a retiring one) is not queued.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from core.errors import Overloaded, ShuttingDown

if TYPE_CHECKING:  # the manager owns the slots and passes itself
    from model_manager import ModelManager, TierRuntime

log = logging.getLogger("llmservice.models")

POLL_S = 1.0  # a safety net only: the driver is woken when a lease ends or a tier unloads


@dataclass
class _Waiter:
    rt: TierRuntime
    admitted: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class ChatSlots:
    def __init__(self, manager: ModelManager, limit: int) -> None:
        self.manager = manager
        self.limit = limit
        self.waiting: collections.deque[_Waiter] = collections.deque()
        self.switches = 0  # tiers unloaded to make room (status and tests)
        self._driver: asyncio.Task[None] | None = None

    def applies(self, rt: TierRuntime) -> bool:
        config = rt.config
        return self.limit > 0 and config.kind == "chat" and config.backend != "remote" and not config.pin

    def _occupying(self) -> list[TierRuntime]:
        """Counted chat tiers that hold (or are about to hold) a model: loaded, loading or with admitted work."""
        from model_manager import LOADING, READY

        return [
            rt
            for rt in self.manager.tiers.values()
            if self.applies(rt) and (rt.state in (READY, LOADING) or rt.in_flight > 0)
        ]

    def _admissible(self, rt: TierRuntime) -> bool:
        occupying = self._occupying()
        return rt in occupying or len(occupying) < self.limit

    async def enter(self, rt: TierRuntime) -> None:
        """Count a request in flight on `rt`, after waiting its turn when its tier must be loaded first."""
        if not self.waiting and self._admissible(rt):
            rt.in_flight += 1
            return
        waiter = _Waiter(rt)
        self.waiting.append(waiter)
        self._kick()
        try:
            await asyncio.wait_for(asyncio.shield(waiter.admitted), rt.config.queue_timeout)
        except (asyncio.CancelledError, TimeoutError) as exc:
            if waiter.admitted.done() and not waiter.admitted.cancelled() and waiter.admitted.exception() is None:
                rt.in_flight -= 1  # admitted just as it gave up: give the count back
                self.manager.notify_freed()
            else:
                waiter.admitted.cancel()
                with contextlib.suppress(ValueError):
                    self.waiting.remove(waiter)
                self._kick()
            if isinstance(exc, TimeoutError):
                raise Overloaded(
                    f"Waited over {rt.config.queue_timeout:g}s for the {rt.config.name} tier to be loaded "
                    f"(MAX_LOADED_CHAT_TIERS={self.limit})",
                    retry_after=max(1, int(rt.config.queue_timeout)),
                ) from None
            raise

    def _kick(self) -> None:
        if self._driver is None or self._driver.done():
            self._driver = asyncio.ensure_future(self._drive())
        else:
            self.manager.notify_freed()  # the driver re-reads the queue's head

    async def _drive(self) -> None:
        while self.waiting and not self.manager.closing:
            head = self.waiting[0]
            if self._admissible(head.rt):
                self._admit_run(head.rt)
                continue
            victims = sorted(
                (rt for rt in self._occupying() if rt is not head.rt),
                key=lambda rt: (rt.in_flight > 0, rt.idle_since),
            )
            if not victims:  # cannot happen while the cap is reached; never spin
                await self.manager.wait_freed(POLL_S)
                continue
            victim = victims[0]
            if victim.in_flight > 0 or victim.loading is not None:
                await self.manager.wait_freed(POLL_S)  # a lease ends, a load finishes, or the queue changes
                continue
            log.info(
                "MAX_LOADED_CHAT_TIERS=%d: unloading tier %s for a request to %s (%d waiting)",
                self.limit,
                victim.config.name,
                head.rt.config.name,
                len(self.waiting),
            )
            self.switches += 1
            await self.manager.unload_runtime(victim)
        for waiter in self.waiting:  # shutting down: what waits is told at once
            if not waiter.admitted.done():
                waiter.admitted.set_exception(ShuttingDown("The server is shutting down", retry_after=5))
        self.waiting.clear()

    def _admit_run(self, rt: TierRuntime) -> None:
        """Admit the head and the requests for the same tier right behind it."""
        while self.waiting and self.waiting[0].rt is rt:
            waiter = self.waiting.popleft()
            if waiter.admitted.done():  # its client left
                continue
            rt.in_flight += 1
            waiter.admitted.set_result(None)

    def status(self) -> dict[str, object]:
        """The queue for /health: the cap, the tiers holding a model, and who waits for which tier, in order."""
        runs: list[tuple[str, int]] = []  # consecutive requests for one tier, in queue order
        for waiter in self.waiting:
            name = waiter.rt.config.name
            runs[-1:] = [(name, runs[-1][1] + 1)] if runs and runs[-1][0] == name else [*runs[-1:], (name, 1)]
        return {
            "max_loaded_chat_tiers": self.limit,
            "loaded": [rt.config.name for rt in self._occupying()],
            "waiting": [{"tier": name, "requests": count} for name, count in runs],
            "switches": self.switches,
        }
