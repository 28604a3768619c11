"""Per-tier model lifecycle: lazy single-flight load onto an owner thread, leases, idle unload,
memory budget, status.

A request leases its tier: the lease loads the model on first use (concurrent first requests share
one load), counts the request in flight, and stamps the last-use time when released (for a stream,
after its last byte). Loading happens on the model's own thread (scheduler.py), so the event loop
never blocks.

Idle unload: a tier with `{TIER}_TTL` > 0 is unloaded that many seconds after its last request
finished; a tier with a request in flight (or waiting for it) is never unloaded (manager/idle.py, with
Ollama's keep_alive).

Memory budget (`MAX_MEMORY_GB` > 0): a load reserves the model's estimated size (its files on disk).
When it does not fit, idle tiers are unloaded, lowest `{TIER}_PRIORITY` first and then least recently
used, never a pinned one (`{TIER}_PIN`); when even that is not enough, the load waits (up to the tier's
queue timeout) for a busy tier to become idle, then gives up with 503 and Retry-After. The RSS change
measured around each load is logged and reported.

Swap (`change_tier`, the admin API): a tier's new model loads beside the old one, then new requests go
to it while those holding the old one finish on it; then the old one unloads (manager/tier_changes.py;
manager/swap.py when MAX_MEMORY_GB cannot hold both). The settings change is kept in `overrides`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

from cache import skip_storing
from chat.local import LocalChat
from chat.scheduler import ChatScheduler
from config import ConfigError, Settings, TierConfig, apply_overrides
from core.errors import Conflict, ModelUnavailable, Overloaded, ServiceError, ShuttingDown
from core.microbatch import BatchWorker
from core.protocols import Factory
from core.turns import ChatBackend
from isolation.chat import IsolatedChat
from isolation.models import isolated_batch_worker
from isolation.supervisor import CrashReport, Restarts
from manager.factories import import_all, warm_modules
from manager.idle import IdleUnloads
from manager.memory import estimate_model_bytes, rss_bytes
from manager.slots import ChatSlots
from manager.swap import SwapGates
from manager.tier_changes import TierChanges
from models_admin.overrides import Overrides, OverrideStore

if TYPE_CHECKING:  # imported by its factory, only when a tier is remote
    from remote.embeddings import RemoteWorker

Worker: TypeAlias = "ChatBackend | BatchWorker | RemoteWorker"  # what a loaded tier runs on

log = logging.getLogger("llmservice.models")

UNLOADED, LOADING, READY, FAILED = "unloaded", "loading", "ready", "failed"


@dataclass
class TierRuntime:
    config: TierConfig
    state: str = UNLOADED
    reason: str = ""
    worker: Worker | None = None
    in_flight: int = 0
    last_use: float = 0.0
    load_seconds: float = 0.0
    loaded_at: float = 0.0
    loading: asyncio.Future[None] | None = None
    reserved_bytes: int = 0  # counted against MAX_MEMORY_GB while loading or loaded
    rss_delta_bytes: int | None = None  # measured around the load
    unload_seconds: float = 0.0
    restarts: Restarts = field(default_factory=Restarts)  # crashes of its worker process, and the backoff
    generation: int = 0  # worker processes started: a late crash report of an older one is ignored
    drained: asyncio.Event | None = None  # once swapped out: set when its last request ends
    keep_until: float = 0.0  # clock time before which the TTL never unloads it (Ollama's keep_alive; inf: never)
    release_when_idle: bool = False  # unload once its last request ends (keep_alive 0, the old servers' unload)

    @property
    def idle_since(self) -> float:
        return self.last_use or self.loaded_at

    @property
    def idle(self) -> bool:
        """Loaded with no request holding it: only then may the TTL or the memory budget unload it."""
        return self.state == READY and self.in_flight == 0


class ModelManager:
    def __init__(
        self,
        settings: Settings,
        factories: Mapping[str, Factory],
        clock: Callable[[], float] = time.monotonic,
        estimator: Callable[[TierConfig], int] = estimate_model_bytes,
        store: OverrideStore | None = None,
    ) -> None:
        self.base_settings = settings  # from the environment; admin changes apply over it
        self.store = store if store is not None else OverrideStore.for_settings(settings)
        self.overrides: Overrides = self.store.load()
        try:
            self.settings = apply_overrides(settings, self.overrides) if self.overrides else settings
        except ConfigError as exc:
            raise ConfigError(f"{self.store.path}: {exc} (fix or delete the file)") from None
        self.factories = dict(factories)
        self.clock = clock
        self.estimator = estimator
        self.tiers = {name: TierRuntime(config) for name, config in self.settings.tiers.items()}
        self.closing = False
        self.budget_bytes = int(settings.max_memory_gb * 1024**3)
        self._budget_lock = asyncio.Lock()
        self._freed = asyncio.Event()  # set when a lease ends or a tier unloads: memory may be free
        self.idle_unloads = IdleUnloads(self)  # TTL and keep_alive unloads (manager/idle.py)
        self.tier_changes = TierChanges(self)  # swapping a tier's model at run time (manager/tier_changes.py)
        self.gates = SwapGates()  # tiers replacing their model in place (manager/swap.py)
        self.slots = ChatSlots(self, settings.max_loaded_chat_tiers)  # MAX_LOADED_CHAT_TIERS (manager/slots.py)

    # ------------------------------------------------------------ status

    @property
    def in_flight(self) -> int:
        return sum(t.in_flight for t in self.tiers.values())

    @property
    def used_bytes(self) -> int:
        changes = self.tier_changes  # models loading beside a tier's, or finishing after it
        return sum(t.reserved_bytes for t in (*self.tiers.values(), *changes.staging, *changes.retiring))

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
        if rt.config.isolation == "process":
            out["isolation"] = "process"
        if rt.worker is not None and rt.state == READY:
            out.update(rt.worker.status())
            out["load_seconds"] = round(rt.load_seconds, 3)
        if rt.last_use:
            out["idle_seconds"] = round(self.clock() - rt.last_use, 1)
        return out

    def detailed_status(self, tier: str) -> dict[str, Any]:
        """`status` plus memory, queue, TTL and timings, for the admin API."""
        rt = self.tiers[tier]
        out = self.status(tier)
        out.setdefault("active", 0)
        out.setdefault("queued", 0)
        out["memory"] = {"estimated_bytes": rt.reserved_bytes or None, "rss_delta_bytes": rt.rss_delta_bytes}
        out["ttl_seconds"] = rt.config.ttl
        out["load_seconds"] = round(rt.load_seconds, 3) if rt.load_seconds else None
        out["unload_seconds"] = round(rt.unload_seconds, 3) if rt.unload_seconds else None
        out["last_use"] = time.time() - (self.clock() - rt.last_use) if rt.last_use else None
        out["pin"], out["priority"] = rt.config.pin, rt.config.priority
        kept = rt.keep_until - self.clock()
        if kept > 0:  # an Ollama keep_alive holds it
            out["keep_alive"] = {"forever": kept == math.inf, "until": None if kept == math.inf else time.time() + kept}
        out["source"] = "admin" if tier in self.overrides else "env"
        if tier in self.overrides:
            out["overrides"] = dict(self.overrides[tier])
        if tier in self.tier_changes.swapping:
            out["swapping"] = True
        if self.gates.closed(tier):  # replaced in place: new requests wait for the new model
            out["replacing_in_place"] = {"waiting": self.gates.waiting.get(tier, 0)}
        if self.slots.applies(rt):
            out["waiting_to_load"] = sum(1 for w in self.slots.waiting if w.rt is rt)
        old = [t for t in self.tier_changes.retiring if t.config.name == tier]
        if old:
            out["retiring"] = [{"model": t.config.model_id, "in_flight": t.in_flight} for t in old]
        return out

    # ------------------------------------------------------------ loading

    def _factory(self, config: TierConfig) -> Factory:
        key = f"{config.kind}:{config.backend}"
        factory = self.factories.get(key)
        if factory is None:
            raise ModelUnavailable(f"The {config.name} tier's backend {config.backend!r} is not available here")
        return factory

    def _direct_factory(self, config: TierConfig) -> Factory | None:
        """A backend that serves whole requests itself (an upstream pool) needs no owner thread of ours:
        "turns:<backend>" builds a chat tier's ChatBackend, "workers:<kind>:<backend>" (or, for embedding
        and rerank tiers, "workers:<backend>") a worker with the micro-batching worker's surface."""
        if config.kind == "chat":
            return self.factories.get(f"turns:{config.backend}")
        found = self.factories.get(f"workers:{config.kind}:{config.backend}")
        if found is None and config.kind in ("embedding", "rerank"):
            found = self.factories.get(f"workers:{config.backend}")
        return found

    def _start_worker(self, config: TierConfig, runtime: TierRuntime) -> Worker:
        direct = self._direct_factory(config)
        if direct is not None:
            backend: Worker = direct(config, self.settings)
            return backend
        factory = self._factory(config)
        loader = lambda: factory(config, self.settings)  # noqa: E731
        process = config.isolation == "process"  # the model runs in a worker process: a crash ends only that
        if config.kind == "chat":
            local: ChatBackend = (
                IsolatedChat(factory, config, self.settings, self._crash_report(runtime))
                if process
                else LocalChat(ChatScheduler(loader, config.name, config.max_queue, config.queue_timeout), config)
            )
            if config.spillover_upstreams:  # a full queue overflows to upstream servers instead of a 503
                from remote.spillover import with_spillover

                return with_spillover(local, config)
            return local
        # Embedding, rerank and speech tiers micro-batch concurrent requests (microbatch.py; a speech
        # batch is decoded window by window together, speech_batch.py).
        if process:
            return isolated_batch_worker(factory, config, self.settings, self._crash_report(runtime))
        return BatchWorker(
            loader, config.name, config.max_queue, config.batch_wait_ms, config.max_batch, config.queue_timeout
        )

    def _crash_report(self, rt: TierRuntime) -> CrashReport:
        """What a new worker process of `rt` (a tier's current model, or one staged by a swap) calls, from
        its own thread, when it dies unasked."""
        loop = asyncio.get_running_loop()
        rt.generation += 1
        generation = rt.generation

        def report(reason: str) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the service is exiting anyway
                loop.call_soon_threadsafe(self._crashed, rt, generation, reason)

        return report

    def _crashed(self, rt: TierRuntime, generation: int, reason: str) -> None:
        """A worker process died: the tier is failed with the exit reason until a request restarts it."""
        if generation != rt.generation:
            return
        rt.restarts.crashed(self.clock(), self.clock() - rt.loaded_at if rt.state == READY else 0.0, reason)
        if rt.state != READY:
            return  # it died while loading: the load reports it
        worker, rt.worker = rt.worker, None
        rt.state, rt.reason, rt.reserved_bytes = FAILED, reason, 0
        self._freed.set()
        if worker is not None:  # its threads on this side end too
            asyncio.get_running_loop().run_in_executor(None, worker.shutdown)

    async def load_runtime(self, rt: TierRuntime, patience: float | None = None) -> None:
        """Load `rt` (a tier's model, or one a swap stages) under the memory budget; a failure marks it
        failed. `patience`: how long to wait for memory (default the tier's queue timeout)."""
        rt.reason = ""
        try:
            await self._reserve(rt, patience)
        except ServiceError:
            rt.state = UNLOADED
            raise
        started, rss_before = time.perf_counter(), rss_bytes()
        try:
            worker = self._start_worker(rt.config, rt)
            await asyncio.wrap_future(worker.ready)
        except ServiceError as exc:
            self._failed(rt, exc.message)
            return
        except Exception as exc:  # noqa: BLE001 - any library failure marks the tier failed
            log.exception("tier %s failed to load", rt.config.name)
            self._failed(rt, f"the model could not be loaded ({type(exc).__name__})")
            return
        rt.worker = worker
        rt.load_seconds = time.perf_counter() - started
        rss_after = rss_bytes()
        rt.rss_delta_bytes = rss_after - rss_before if rss_after is not None and rss_before is not None else None
        rt.loaded_at = self.clock()
        rt.state = READY
        log.info(
            "tier %s loaded %s in %.2fs (estimated %.0f MB, RSS %+.0f MB)",
            rt.config.name,
            rt.config.model_id,
            rt.load_seconds,
            rt.reserved_bytes / 1e6,
            (rt.rss_delta_bytes or 0) / 1e6,
        )

    def _failed(self, rt: TierRuntime, reason: str) -> None:
        rt.state, rt.reason, rt.reserved_bytes = FAILED, reason, 0
        self._freed.set()
        log.error("tier %s failed to load: %s", rt.config.name, reason)

    async def _reserve(self, rt: TierRuntime, patience: float | None = None) -> None:
        """Reserve the tier's memory under the budget: evict idle tiers (lowest priority, then least
        recently used; never pinned ones, nor the tier itself), else wait (`patience`, default the
        tier's queue timeout), else 503."""
        need = self.estimator(rt.config)
        if self.budget_bytes <= 0:
            rt.reserved_bytes = need
            return
        name = rt.config.name
        if need > self.budget_bytes:
            raise ModelUnavailable(
                f"The {name} tier needs about {need / 1e9:.2f} GB, over MAX_MEMORY_GB "
                f"({self.budget_bytes / 1024**3:g} GiB)"
            )
        deadline = self.clock() + (rt.config.queue_timeout if patience is None else patience)
        async with self._budget_lock:
            while True:
                self._freed.clear()
                free = self.budget_bytes - self.used_bytes
                if need <= free:
                    rt.reserved_bytes = need
                    return
                idle = sorted(
                    (t for t in self.tiers.values() if t.config.name != name and t.idle and not t.config.pin),
                    key=lambda t: (t.config.priority, t.idle_since),
                )
                if need <= free + sum(t.reserved_bytes for t in idle):
                    for victim in idle:
                        if need <= self.budget_bytes - self.used_bytes:
                            break
                        log.info("memory budget: unloading idle tier %s to load %s", victim.config.name, name)
                        await self.unload(victim.config.name)
                    continue
                remaining = deadline - self.clock()
                if remaining <= 0 or not await self._wait_freed(remaining):
                    raise Overloaded(
                        f"Not enough memory under MAX_MEMORY_GB to load the {name} tier while other tiers are "
                        "busy or pinned",
                        retry_after=max(1, int(rt.config.queue_timeout) or 5),
                    )

    def notify_freed(self) -> None:
        self._freed.set()

    async def wait_freed(self, timeout: float) -> bool:
        """Wait (up to `timeout`) for a lease to end, a tier to unload or a load to finish."""
        self._freed.clear()
        return await self._wait_freed(timeout)

    async def unload_runtime(self, rt: TierRuntime) -> None:
        await self._unload(rt)

    async def _wait_freed(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._freed.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def ensure_loaded(self, tier: str) -> Worker:
        rt = self.tiers[tier]
        if rt.state in (UNLOADED, FAILED) and rt.loading is None:
            rt.restarts.check(tier, self.clock())  # a worker process that keeps crashing restarts ever later
            self.start_loading(tier)
        if rt.loading is not None:
            await asyncio.shield(rt.loading)
        if rt.state == FAILED:
            raise ModelUnavailable(f"The {tier} tier is unavailable: {rt.reason}")
        if rt.worker is None:
            raise ModelUnavailable(f"The {tier} tier was unloaded; retry", headers={"Retry-After": "1"})
        return rt.worker

    def start_loading(self, tier: str) -> None:
        """Begin loading in the background (single-flight: a load under way is reused)."""
        rt = self.tiers[tier]
        if rt.state in (UNLOADED, FAILED) and rt.loading is None:
            rt.state = LOADING
            rt.loading = asyncio.ensure_future(self.load_runtime(rt))
            rt.loading.add_done_callback(lambda future, rt=rt: self._load_done(rt, future))

    def _load_done(self, rt: TierRuntime, future: asyncio.Future[None]) -> None:
        rt.loading = None
        self._freed.set()  # whoever waits for a tier to settle (manager/slots.py) looks again
        if not future.cancelled() and future.exception() is not None:
            log.warning("tier %s was not loaded: %s", rt.config.name, future.exception())

    def preload(self) -> None:
        """Start loading the tiers marked PRELOAD (no more chat tiers than MAX_LOADED_CHAT_TIERS); warm the
        libraries of those that load on first use."""
        room = self.slots.limit or len(self.tiers)
        for name, rt in self.tiers.items():
            if rt.config.preload and self.slots.applies(rt):
                room -= 1
                if room < 0:
                    log.info("tier %s is not preloaded: MAX_LOADED_CHAT_TIERS=%d", name, self.slots.limit)
                    continue
            if rt.config.preload:
                self.start_loading(name)
        modules = self.lazy_modules() if self.settings.warm_imports else []
        if modules:
            threading.Thread(target=import_all, args=(modules,), name="warm-imports", daemon=True).start()

    def lazy_modules(self) -> list[str]:
        """The libraries local tiers import on first use, in tier order (a tier not configured is not here)."""
        known = warm_modules()
        modules: list[str] = []
        for rt in self.tiers.values():
            factory = self.factories.get(f"{rt.config.kind}:{rt.config.backend}")
            if rt.config.preload or rt.config.isolation != "thread" or factory is None:
                continue  # loading now anyway, or its model lives in a process of its own
            modules += [name for name in known.get(factory, ()) if name not in modules]
        return modules

    @contextlib.asynccontextmanager
    async def lease(self, tier: str, config: TierConfig | None = None) -> AsyncIterator[Any]:
        """Hold a tier for one request: loaded, counted in flight, last use stamped at the end.
        `config` is the tier's settings the request was resolved (and its cache key made) with."""
        if self.closing:
            raise ShuttingDown("The server is shutting down", retry_after=5)
        if self.gates.closed(tier):  # its model is being replaced in place: wait for the new one
            current = self.tiers.get(tier)
            await self.gates.wait(tier, current.config.queue_timeout if current is not None else 60.0)
        rt = self._runtime_for(tier, config)
        if rt.drained is None and self.slots.applies(rt):
            await self.slots.enter(rt)  # counts it in flight, after its turn when another tier must unload
        else:
            rt.in_flight += 1
        try:
            yield rt.worker if rt.drained is not None else await self.ensure_loaded(tier)
        finally:
            rt.in_flight -= 1
            rt.last_use = self.clock()
            self._freed.set()
            self.idle_unloads.release_if_asked(rt)
            if rt.drained is not None and rt.in_flight == 0:
                rt.drained.set()

    def _runtime_for(self, tier: str, config: TierConfig | None) -> TierRuntime:
        """The tier's current model, or, for a request resolved just before a swap, the old one while it
        still runs. Failing that, the current one serves it but its answer stays out of the cache: its
        key names the old model."""
        current = self.tiers.get(tier)
        if config is None or (current is not None and current.config == config):
            if current is None:
                raise ModelUnavailable(f"The {tier} tier is off", headers={"Retry-After": "1"})
            return current
        for old in self.tier_changes.retiring:
            if old.config == config and old.worker is not None:
                return old
        skip_storing()
        if current is None:
            raise ModelUnavailable(f"The {tier} tier was turned off", headers={"Retry-After": "1"})
        return current

    # ------------------------------------------------------------ unloading

    async def unload(self, tier: str, force: bool = True) -> None:
        """Unload a tier. Without `force`, a busy or loading tier is a 409; with it, requests in
        flight are cancelled (streams end with an error event, waiting requests get 503)."""
        rt = self.tiers[tier]
        if not force and rt.state == LOADING:
            raise Conflict(f"The {tier} tier is loading; retry when it is ready")
        if not force and rt.in_flight > 0:
            raise Conflict(f"The {tier} tier has {rt.in_flight} request(s) in flight; use force=true to cancel them")
        await self._unload(rt)

    async def _unload(self, rt: TierRuntime) -> None:
        worker, rt.worker = rt.worker, None  # from here on no lease gets it
        if rt.state == READY:
            rt.state = UNLOADED
        if worker is None:
            return
        started = time.perf_counter()
        await asyncio.to_thread(worker.shutdown)
        rt.unload_seconds = time.perf_counter() - started
        rt.reserved_bytes = 0
        self._freed.set()
        log.info("tier %s unloaded %s in %.2fs", rt.config.name, rt.config.model_id, rt.unload_seconds)

    def keep_alive(self, tier: str, seconds: float) -> None:
        """Ollama's `keep_alive`, told when a request ends (manager/idle.py)."""
        self.idle_unloads.keep_alive(tier, seconds)

    async def release(self, tier: str) -> bool:
        """Unload the tier now if nothing holds it (True), else once its last request ends (False)."""
        return await self.idle_unloads.release(tier)

    async def unload_idle(self) -> list[str]:
        """Unload the tiers whose TTL has passed since their last request; their names."""
        return await self.idle_unloads.unload_idle()

    def start_idle_watch(self) -> None:
        """Check TTLs in the background (only when some tier has one)."""
        self.idle_unloads.start()

    async def close(self) -> None:
        self.closing = True
        self.idle_unloads.stop()
        for tier in list(self.tiers):
            await self.unload(tier)
        for rt in (*self.tier_changes.staging, *self.tier_changes.retiring):
            await self._unload(rt)

    # ------------------------------------------------------------ changing a tier's model at run time

    async def change_tier(self, tier: str, changes: Mapping[str, str] | None) -> None:
        """Serve `tier` with `changes` (TIER_KEYS names -> text) over its environment settings, or with
        those settings again (None): the new model loads beside the old one, which unloads once its
        requests are done (manager/tier_changes.py)."""
        await self.tier_changes.change_tier(tier, changes)
