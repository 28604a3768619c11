"""A swap that cannot load the new model beside the old one under `MAX_MEMORY_GB`: drain, unload, load.

`ModelManager.change_tier` first loads the new model beside the old one (tier_changes.py), so nothing
waits. When the memory budget cannot hold both, it comes here instead:

1. new requests for the tier wait at a gate (up to the tier's `{TIER}_QUEUE_TIMEOUT`, then 503);
2. requests already on the old model finish (up to `DRAIN_TIMEOUT`; what is left then is cancelled);
3. the old model unloads and the new one loads in its memory;
4. if the new one fails to load, the old one is loaded again and the admin's answer says why;
5. the caller switches the tier and opens the gate: the waiting requests run on whichever model serves.

So the tier serves nothing from the end of the drain until the new model is ready: its load time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from core.errors import ModelUnavailable, Overloaded, ServiceError

if TYPE_CHECKING:  # the manager calls in with itself
    from config import TierConfig
    from model_manager import ModelManager, TierRuntime

log = logging.getLogger("llmservice.models")


class SwapGates:
    """Tiers whose new requests wait while their model is replaced in place."""

    def __init__(self) -> None:
        self._gates: dict[str, asyncio.Event] = {}
        self.waiting: dict[str, int] = {}  # requests held at each gate (status and tests)

    def close(self, tier: str) -> None:
        self._gates.setdefault(tier, asyncio.Event())

    def open(self, tier: str) -> None:
        gate = self._gates.pop(tier, None)
        if gate is not None:
            gate.set()

    def closed(self, tier: str) -> bool:
        return tier in self._gates

    async def wait(self, tier: str, timeout: float) -> None:
        """Return at once when the tier is not being replaced; else when it is done (503 after `timeout`)."""
        gate = self._gates.get(tier)
        if gate is None:
            return
        self.waiting[tier] = self.waiting.get(tier, 0) + 1
        try:
            await asyncio.wait_for(gate.wait(), timeout)
        except TimeoutError:
            raise Overloaded(
                f"The {tier} tier is replacing its model and did not finish within {timeout:g}s", retry_after=5
            ) from None
        finally:
            self.waiting[tier] -= 1


async def replace_in_place(manager: ModelManager, tier: str, old: TierRuntime, config: TierConfig) -> TierRuntime:
    """Drain and unload `old`, then load `config` (the gate is already closed; the caller opens it).
    On failure, `old` is loaded again and the error says why."""
    started = time.perf_counter()
    await _drain(manager, old)
    await manager.unload_runtime(old)
    log.info("tier %s: old model drained and unloaded in %.2fs", tier, time.perf_counter() - started)
    try:
        staged = await manager.tier_changes.stage(config)
    except ServiceError as exc:
        reason = exc.message
    else:
        log.info("tier %s: replaced in place in %.2fs", tier, time.perf_counter() - started)
        return staged
    try:
        await manager.ensure_loaded(tier)
        back = "the old model is loaded again"
    except ServiceError as exc:
        back = f"loading the old model again failed too: {exc.message}"
    raise ModelUnavailable(
        f"The {tier} tier's new model did not fit beside the old one under MAX_MEMORY_GB, so the old one was "
        f"unloaded first; then: {reason}; {back}; the tier is unchanged"
    )


async def _drain(manager: ModelManager, old: TierRuntime) -> None:
    deadline = time.monotonic() + manager.settings.drain_timeout
    while old.in_flight > 0 and time.monotonic() < deadline:
        await manager.wait_freed(max(0.0, deadline - time.monotonic()))
    if old.in_flight:
        log.warning("tier %s: cancelling %d request(s) still on the old model", old.config.name, old.in_flight)
