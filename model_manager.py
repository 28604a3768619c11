"""Per-tier model lifecycle: lazy single-flight load onto an owner thread, leases, status.

A request leases its tier: the lease loads the model on first use (concurrent first requests share
one load), counts the request in flight, and stamps the last-use time when released (for a stream,
after its last byte). Loading happens on the model's own thread (scheduler.py), so the event loop
never blocks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from backends import Factory
from config import Settings, TierConfig
from errors import ModelUnavailable, ServiceError, ShuttingDown
from microbatch import BatchWorker
from scheduler import CallWorker, ChatScheduler

log = logging.getLogger("llmservice.models")

UNLOADED, LOADING, READY, FAILED = "unloaded", "loading", "ready", "failed"


def default_factories() -> dict[str, Factory]:
    """Backend loaders keyed "kind:backend"; each imports its heavy library only when called."""
    import embedders
    import llms
    import rerankers

    return {
        "chat:llamacpp": llms.load_llamacpp_chat,
        "chat:mlx": llms.load_mlx_chat,
        **embedders.FACTORIES,
        **rerankers.FACTORIES,
    }


@dataclass
class TierRuntime:
    config: TierConfig
    state: str = UNLOADED
    reason: str = ""
    worker: ChatScheduler | CallWorker | BatchWorker | None = None
    in_flight: int = 0
    last_use: float = 0.0
    load_seconds: float = 0.0
    loaded_at: float = 0.0
    loading: asyncio.Future[None] | None = None


class ModelManager:
    def __init__(
        self,
        settings: Settings,
        factories: Mapping[str, Factory],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.factories = dict(factories)
        self.clock = clock
        self.tiers = {name: TierRuntime(config) for name, config in settings.tiers.items()}
        self.closing = False

    # ------------------------------------------------------------ status

    @property
    def in_flight(self) -> int:
        return sum(t.in_flight for t in self.tiers.values())

    def status(self, tier: str) -> dict[str, Any]:
        rt = self.tiers[tier]
        out: dict[str, Any] = {
            "state": rt.state,
            "backend": rt.config.backend,
            "model": rt.config.model_id,
            "in_flight": rt.in_flight,
        }
        if rt.reason:
            out["reason"] = rt.reason
        if rt.worker is not None and rt.state == READY:
            out.update(rt.worker.status())
            out["load_seconds"] = round(rt.load_seconds, 3)
        if rt.last_use:
            out["idle_seconds"] = round(self.clock() - rt.last_use, 1)
        return out

    # ------------------------------------------------------------ loading

    def _factory(self, config: TierConfig) -> Factory:
        key = f"{config.kind}:{config.backend}"
        factory = self.factories.get(key)
        if factory is None:
            raise ModelUnavailable(f"The {config.name} tier's backend {config.backend!r} is not available here")
        return factory

    def _start_worker(self, config: TierConfig) -> ChatScheduler | CallWorker | BatchWorker:
        factory = self._factory(config)
        loader = lambda: factory(config, self.settings)  # noqa: E731
        if config.kind == "chat":
            return ChatScheduler(loader, config.name, config.max_queue, config.queue_timeout)
        # Embedding and rerank tiers micro-batch concurrent requests (microbatch.py).
        return BatchWorker(
            loader, config.name, config.max_queue, config.batch_wait_ms, config.max_batch, config.queue_timeout
        )

    async def _load(self, rt: TierRuntime) -> None:
        started = time.perf_counter()
        rt.reason = ""
        try:
            worker = self._start_worker(rt.config)
            await asyncio.wrap_future(worker.ready)
        except ServiceError as exc:
            rt.state, rt.reason = FAILED, exc.message
            log.error("tier %s failed to load: %s", rt.config.name, exc.message)
            return
        except Exception as exc:  # noqa: BLE001 - any library failure marks the tier failed
            rt.state, rt.reason = FAILED, f"the model could not be loaded ({type(exc).__name__})"
            log.exception("tier %s failed to load", rt.config.name)
            return
        rt.worker = worker
        rt.load_seconds = time.perf_counter() - started
        rt.loaded_at = self.clock()
        rt.state = READY
        log.info("tier %s loaded %s in %.2fs", rt.config.name, rt.config.model_id, rt.load_seconds)

    async def ensure_loaded(self, tier: str) -> ChatScheduler | CallWorker | BatchWorker:
        rt = self.tiers[tier]
        if rt.state == UNLOADED:
            self.start_loading(tier)
        if rt.state == LOADING and rt.loading is not None:
            await asyncio.shield(rt.loading)
        if rt.state == FAILED:
            raise ModelUnavailable(f"The {tier} tier is unavailable: {rt.reason}")
        if rt.worker is None:
            raise ModelUnavailable(f"The {tier} tier was unloaded; retry", headers={"Retry-After": "1"})
        return rt.worker

    def start_loading(self, tier: str) -> None:
        """Begin loading in the background (single-flight: a load under way is reused)."""
        rt = self.tiers[tier]
        if rt.state in (UNLOADED, FAILED):
            rt.state = LOADING
            rt.loading = asyncio.ensure_future(self._load(rt))

    def preload(self) -> None:
        for name, rt in self.tiers.items():
            if rt.config.preload:
                self.start_loading(name)

    @contextlib.asynccontextmanager
    async def lease(self, tier: str) -> AsyncIterator[Any]:
        """Hold a tier for one request: loaded, counted in flight, last use stamped at the end."""
        if self.closing:
            raise ShuttingDown("The server is shutting down", retry_after=5)
        rt = self.tiers[tier]
        rt.in_flight += 1
        try:
            yield await self.ensure_loaded(tier)
        finally:
            rt.in_flight -= 1
            rt.last_use = self.clock()

    # ------------------------------------------------------------ unloading

    async def unload(self, tier: str) -> None:
        rt = self.tiers[tier]
        worker, rt.worker = rt.worker, None
        if rt.state == READY:
            rt.state = UNLOADED
        if worker is not None:
            await asyncio.to_thread(worker.shutdown)
            log.info("tier %s unloaded", tier)

    async def close(self) -> None:
        self.closing = True
        for tier in self.tiers:
            await self.unload(tier)
