"""Changing a tier's model at run time (`ModelManager.change_tier`, the admin API).

The new model loads beside the old one; if it fails, nothing changes and the error says why. Then new
requests go to it at once, while those already holding the old one finish on it (a request that resolved
the old settings just before the switch is served there too); then the old one unloads, after
`DRAIN_TIMEOUT` cancelling what is left. When MAX_MEMORY_GB cannot hold both, the old one drains and
unloads first and new requests wait for the new one (swap.py). The change is kept in the manager's
`overrides` and saved (models_admin/overrides.py). Kept apart from model_manager.py, which owns the tiers
and counts the models staged and retiring here against the memory budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from config import ConfigError, Settings, TierConfig, apply_overrides
from core.errors import Conflict, InvalidRequest, ModelUnavailable, Overloaded, ServiceError, ShuttingDown
from manager.swap import replace_in_place
from models_admin.overrides import Overrides

if TYPE_CHECKING:  # the manager owns this and passes itself
    from model_manager import ModelManager, TierRuntime

log = logging.getLogger("llmservice.models")


class TierChanges:
    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager
        self.staging: list[TierRuntime] = []  # new models of tiers being swapped, loading
        self.retiring: list[TierRuntime] = []  # swapped-out models finishing their requests
        self.swapping: set[str] = set()
        self._saving = asyncio.Lock()  # one write at a time, each of the newest overrides
        self._background: set[asyncio.Task[None]] = set()

    async def change_tier(self, tier: str, changes: Mapping[str, str] | None) -> None:
        """Serve `tier` with `changes` (TIER_KEYS names -> text) over its environment settings, or with
        those settings again (None)."""
        manager = self.manager
        if tier in self.swapping:
            raise Conflict(f"A change of the {tier} tier is under way; retry when it is done")
        config = self._changed(tier, changes)[1].tiers.get(tier)  # a bad value is refused before any load
        current = manager.tiers.get(tier)
        same = current is not None and config == current.config
        self.swapping.add(tier)
        try:
            staged = None if config is None or same else await self._stage_or_replace(tier, config)
            try:
                if manager.closing:
                    raise ShuttingDown("The server is shutting down", retry_after=5)
                manager.overrides, manager.settings = self._changed(tier, changes)  # other tiers may have changed
            except ServiceError:
                if staged is not None:
                    self._retire(staged)
                raise
            if not same:
                self._switch(tier, staged)
        finally:
            self.swapping.discard(tier)
            manager.gates.open(tier)  # requests held by an in-place replacement go on, on the tier's model now
        try:
            async with self._saving:
                await asyncio.to_thread(manager.store.save, dict(manager.overrides))
        except OSError as exc:
            log.warning("the change of the %s tier holds until restart: saving it failed (%s)", tier, exc)

    def _changed(self, tier: str, changes: Mapping[str, str] | None) -> tuple[Overrides, Settings]:
        overrides = {name: values for name, values in self.manager.overrides.items() if name != tier}
        if changes is not None:
            overrides[tier] = dict(changes)
        try:
            return overrides, apply_overrides(self.manager.base_settings, overrides)
        except ConfigError as exc:
            raise InvalidRequest(str(exc)) from None

    async def _stage_or_replace(self, tier: str, config: TierConfig) -> TierRuntime:
        """Load the new model beside the old one; when the memory budget cannot hold both, replace the old
        one in place: drain, unload, load (swap.py)."""
        manager = self.manager
        try:
            return await self.stage(config)
        except Overloaded:
            old = manager.tiers.get(tier)
            if old is None or old.worker is None or manager.closing:
                raise
            idle = sum(t.reserved_bytes for t in manager.tiers.values() if t is not old and t.idle and not t.config.pin)
            if manager.estimator(config) > manager.budget_bytes - manager.used_bytes + old.reserved_bytes + idle:
                raise  # even without the old model it does not fit: other tiers are busy or pinned
        manager.gates.close(tier)
        return await replace_in_place(manager, tier, old, config)

    async def stage(self, config: TierConfig) -> TierRuntime:
        """Load `config` beside the tier's current model (no waiting for memory: the admin hears at once)."""
        from model_manager import READY, TierRuntime

        staged = TierRuntime(config)
        self.staging.append(staged)
        try:
            await self.manager.load_runtime(staged, patience=0.0)
        except Overloaded:
            raise Overloaded(
                f"Not enough memory under MAX_MEMORY_GB for the {config.name} tier's new model, even without its "
                "current one: other tiers are busy or pinned; retry, or unload them first",
                retry_after=5,
            ) from None
        finally:
            self.staging.remove(staged)
        if staged.state != READY:
            raise ModelUnavailable(
                f"The {config.name} tier's new model could not be loaded: {staged.reason}; the tier is unchanged"
            )
        return staged

    def _switch(self, tier: str, staged: TierRuntime | None) -> None:
        """From here on new requests lease `staged` (None: the tier is off); nothing awaits in between,
        and the manager's `settings`, which the routes resolve with, changed just before."""
        manager = self.manager
        old = manager.tiers.get(tier)
        runtimes = {**manager.tiers}
        if staged is not None:
            runtimes[tier] = staged
        manager.tiers = {name: runtimes[name] for name in manager.settings.tiers}  # in tier order; off ones drop out
        if old is not None:
            self._retire(old)
        log.info("tier %s now serves %s", tier, staged.config.model_id if staged else "nothing (off)")
        manager.start_idle_watch()

    def _retire(self, old: TierRuntime) -> None:
        if old.worker is None and old.loading is None:
            return
        old.drained = asyncio.Event()
        self.retiring.append(old)
        task = asyncio.ensure_future(self._drain_and_unload(old))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drain_and_unload(self, old: TierRuntime) -> None:
        """Unload a swapped-out model once its requests are done; after DRAIN_TIMEOUT, cancel the rest."""
        assert old.drained is not None
        try:
            if old.loading is not None:  # requests waiting for it get it first
                await asyncio.wait([old.loading])
            deadline = time.monotonic() + self.manager.settings.drain_timeout
            while old.in_flight > 0 and time.monotonic() < deadline:
                old.drained.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(old.drained.wait(), deadline - time.monotonic())
            if old.in_flight:
                log.warning("tier %s: cancelling %d request(s) still on the old model", old.config.name, old.in_flight)
            # Its worker is taken before any await: no new lease gets it.
            await self.manager.unload_runtime(old)
        finally:
            self.retiring.remove(old)
