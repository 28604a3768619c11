"""Model lifecycle in the manager: lazy single-flight load, TTL unload, memory budget and eviction.

Time-dependent logic runs on an injected clock; nothing here sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from config import TierConfig, load_settings
from core.errors import ModelUnavailable, Overloaded
from model_manager import LOADING, READY, UNLOADED, ModelManager
from tests.conftest import FAKE_ENV
from tests.fakes import FakeRegistry
from tests.waiting import wait_for, wait_for_async

GIB = 1024**3
THREE_TIERS = {**FAKE_ENV, "HEAVY_MODEL_PATH": "/models/fake-70b.gguf"}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def manager_for(
    env: dict[str, str], registry: FakeRegistry, clock: Clock, sizes: dict[str, float] | None = None
) -> ModelManager:
    estimator: Callable[[TierConfig], int] = lambda tier: int((sizes or {}).get(tier.name, 0) * GIB)  # noqa: E731
    return ModelManager(load_settings(env), registry.factories(), clock=clock, estimator=estimator)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(scenario())


async def use(manager: ModelManager, tier: str) -> None:
    async with manager.lease(tier):
        pass


# ---------------------------------------------------------------- lazy load


def test_nothing_loads_until_first_use_and_concurrent_first_uses_load_once() -> None:
    registry = FakeRegistry()
    registry.load_gate = threading.Event()

    async def scenario() -> None:
        manager = manager_for(FAKE_ENV, registry, Clock())
        assert registry.loads == {}
        first = asyncio.ensure_future(manager.ensure_loaded("light"))
        second = asyncio.ensure_future(manager.ensure_loaded("light"))
        await wait_for_async(lambda: manager.tiers["light"].state == LOADING, "light loading")
        registry.load_gate.set()
        workers = await asyncio.gather(first, second)
        assert workers[0] is workers[1]
        assert registry.loads == {"light": 1}
        assert manager.tiers["medium"].state == UNLOADED
        await manager.close()

    run(scenario)


def test_preload_starts_loading_in_the_background() -> None:
    registry = FakeRegistry()
    registry.load_gate = threading.Event()

    async def scenario() -> None:
        manager = manager_for({**FAKE_ENV, "MEDIUM_PRELOAD": "true"}, registry, Clock())
        manager.preload()
        assert manager.status("medium")["state"] == "loading"
        assert manager.status("light")["state"] == "unloaded"
        registry.load_gate.set()
        await wait_for_async(lambda: manager.tiers["medium"].state == READY, "medium ready")
        await manager.close()

    run(scenario)


# ---------------------------------------------------------------- idle TTL


def test_ttl_unloads_an_idle_tier_after_its_last_request() -> None:
    clock = Clock()

    async def scenario() -> None:
        manager = manager_for({**FAKE_ENV, "LIGHT_TTL": "30"}, FakeRegistry(), clock)
        await use(manager, "light")
        clock.now += 29
        assert await manager.unload_idle() == []
        clock.now += 2
        assert await manager.unload_idle() == ["light"]
        assert manager.tiers["light"].state == UNLOADED
        await manager.close()

    run(scenario)


def test_ttl_never_unloads_a_busy_tier() -> None:
    clock = Clock()

    async def scenario() -> None:
        manager = manager_for({**FAKE_ENV, "LIGHT_TTL": "30"}, FakeRegistry(), clock)
        async with manager.lease("light"):
            clock.now += 1000
            assert await manager.unload_idle() == []
            assert manager.tiers["light"].state == READY
        clock.now += 29  # the TTL counts from the end of the last request
        assert await manager.unload_idle() == []
        clock.now += 2
        assert await manager.unload_idle() == ["light"]
        await manager.close()

    run(scenario)


def test_ttl_zero_means_never() -> None:
    clock = Clock()

    async def scenario() -> None:
        manager = manager_for(FAKE_ENV, FakeRegistry(), clock)
        await use(manager, "light")
        clock.now += 10**9
        assert await manager.unload_idle() == []
        await manager.close()

    run(scenario)


def test_the_background_watch_unloads_an_idle_tier(make_client: Any) -> None:
    client = make_client({**FAKE_ENV, "LIGHT_TTL": "0.2"})
    body = {"model": "light", "messages": [{"role": "user", "content": "hi"}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    wait_for(lambda: client.get("/admin/status").json()["tiers"]["light"]["state"] == "unloaded", "the idle unload")
    assert client.post("/v1/chat/completions", json=body).status_code == 200  # and loads again on demand


# ---------------------------------------------------------------- memory budget


def test_loading_over_budget_evicts_the_least_recently_used_idle_tier() -> None:
    clock = Clock()
    registry = FakeRegistry()

    async def scenario() -> None:
        env = {**THREE_TIERS, "MAX_MEMORY_GB": "1"}
        manager = manager_for(env, registry, clock, {"light": 0.4, "medium": 0.4, "heavy": 0.4})
        clock.now = 1
        await use(manager, "light")
        clock.now = 2
        await use(manager, "medium")
        clock.now = 3
        await use(manager, "light")  # light is now the most recently used
        clock.now = 4
        await use(manager, "heavy")
        states = {name: manager.tiers[name].state for name in ("light", "medium", "heavy")}
        assert states == {"light": READY, "medium": UNLOADED, "heavy": READY}
        assert manager.used_bytes == int(0.4 * GIB) * 2
        clock.now = 5
        await use(manager, "medium")  # now light (last used at 3) is the oldest idle tier
        assert manager.tiers["light"].state == UNLOADED
        assert manager.tiers["heavy"].state == READY
        await manager.close()

    run(scenario)


def test_eviction_unloads_only_as_much_as_needed() -> None:
    clock = Clock()

    async def scenario() -> None:
        env = {**THREE_TIERS, "MAX_MEMORY_GB": "1"}
        manager = manager_for(env, FakeRegistry(), clock, {"light": 0.3, "medium": 0.3, "heavy": 0.5})
        for tick, tier in enumerate(("light", "medium")):
            clock.now = tick
            await use(manager, tier)
        await use(manager, "heavy")  # needs 0.5, free 0.4: evicting light alone is enough
        assert manager.tiers["light"].state == UNLOADED
        assert manager.tiers["medium"].state == READY
        await manager.close()

    run(scenario)


def test_a_load_that_cannot_fit_while_others_are_busy_is_a_503_with_retry_after() -> None:
    async def scenario() -> None:
        env = {**THREE_TIERS, "MAX_MEMORY_GB": "1", "HEAVY_QUEUE_TIMEOUT": "0"}
        manager = manager_for(env, FakeRegistry(), Clock(), {"light": 0.4, "medium": 0.4, "heavy": 0.4})
        async with manager.lease("light"), manager.lease("medium"):
            with pytest.raises(Overloaded) as caught:
                await use(manager, "heavy")
        assert caught.value.status == 503 and "Retry-After" in caught.value.headers
        assert manager.tiers["heavy"].state == UNLOADED
        assert manager.tiers["light"].state == manager.tiers["medium"].state == READY
        await use(manager, "heavy")  # once they are idle, it fits by evicting one
        await manager.close()

    run(scenario)


def test_a_waiting_load_proceeds_when_a_busy_tier_becomes_idle() -> None:
    async def scenario() -> None:
        env = {**THREE_TIERS, "MAX_MEMORY_GB": "1", "HEAVY_QUEUE_TIMEOUT": "60"}
        manager = manager_for(env, FakeRegistry(), Clock(), {"light": 0.4, "medium": 0.4, "heavy": 0.4})
        release = asyncio.Event()

        async def hold(tier: str) -> None:
            async with manager.lease(tier):
                await release.wait()

        holders = [asyncio.ensure_future(hold(t)) for t in ("light", "medium")]
        await wait_for_async(
            lambda: manager.tiers["light"].state == manager.tiers["medium"].state == READY, "light and medium ready"
        )
        waiting = asyncio.ensure_future(use(manager, "heavy"))
        await wait_for_async(lambda: manager.tiers["heavy"].state == LOADING, "heavy loading (waiting for memory)")
        assert not waiting.done()
        release.set()
        await asyncio.gather(*holders)
        await waiting
        assert manager.tiers["heavy"].state == READY
        assert [manager.tiers[t].state for t in ("light", "medium")].count(UNLOADED) == 1
        await manager.close()

    run(scenario)


def test_a_tier_larger_than_the_whole_budget_is_unavailable() -> None:
    async def scenario() -> None:
        manager = manager_for({**FAKE_ENV, "MAX_MEMORY_GB": "1"}, FakeRegistry(), Clock(), {"light": 2})
        with pytest.raises(ModelUnavailable, match="MAX_MEMORY_GB"):
            await use(manager, "light")
        await manager.close()

    run(scenario)


def test_the_estimate_of_a_model_file_is_its_size(tmp_path: Any) -> None:
    from manager.memory import estimate_model_bytes

    model = tmp_path / "m.gguf"
    model.write_bytes(b"x" * 12345)
    tier = load_settings({"LIGHT_MODEL_PATH": str(model), "EMBEDDING_MODEL_PATH": "", "RERANKER_MODEL_PATH": ""})
    assert estimate_model_bytes(tier.tiers["light"]) == 12345


@pytest.mark.real
def test_the_estimate_of_the_packaged_gemma_is_its_parts() -> None:
    from manager.memory import estimate_model_bytes

    packaged = load_settings({"EMBEDDING_MODEL_PATH": "", "RERANKER_MODEL_PATH": ""}).tiers["light"]
    assert estimate_model_bytes(packaged) > 100_000_000  # the Gemma 270M GGUF's parts, not assembled


def test_drain_timeout_is_read_and_checked() -> None:
    from config import ConfigError

    assert load_settings(FAKE_ENV).drain_timeout == 30.0
    assert load_settings({**FAKE_ENV, "DRAIN_TIMEOUT": "2.5"}).drain_timeout == 2.5
    with pytest.raises(ConfigError, match="DRAIN_TIMEOUT"):
        load_settings({**FAKE_ENV, "DRAIN_TIMEOUT": "-1"})
