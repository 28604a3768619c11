"""Ollama's `keep_alive` with a prompt: a duration keeps the tier loaded at least that long after the
request (a deadline the idle unloader honours), 0 unloads it once idle, -1 keeps it for ever.

The manager's deadline runs on an injected clock; the HTTP tests use the `ollama` client over fakes.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import ollama
import pytest

from api.ollama_wire import keep_alive_seconds
from config import load_settings
from core.errors import InvalidRequest
from model_manager import READY, UNLOADED
from server import create_app
from tests.conftest import FAKE_ENV, LiveServer
from tests.fakes import FakeRegistry
from tests.test_cache_rag import ENV, RagRegistry
from tests.test_keys import key_file
from tests.test_lifecycle import Clock, manager_for, run, use
from tests.waiting import DEADLINE_S, wait_for, wait_for_async

HI = [{"role": "user", "content": "hi"}]
KEYS = """
[[keys]]
name = "app"
key = "sk-app"

[[keys]]
name = "ops"
key = "sk-ops"
admin = true
"""


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("", None),
        (0, 0.0),
        ("0", 0.0),
        ("0s", 0.0),
        (300, 300.0),
        (2.5, 2.5),
        ("300", 300.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1h30m", 5400.0),
        ("1.5h", 5400.0),
        ("300ms", 0.3),
        (-1, math.inf),
        ("-1", math.inf),
        ("-5m", math.inf),
    ],
)
def test_keep_alive_values(value: float | str | None, seconds: float | None) -> None:
    assert keep_alive_seconds(value) == (pytest.approx(seconds) if seconds not in (None, math.inf) else seconds)


@pytest.mark.parametrize("value", ["soon", "5 minutes", "m", "1x", "nan"])
def test_a_bad_keep_alive_is_a_400(value: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        keep_alive_seconds(value)
    assert info.value.param == "keep_alive"


# ---------------------------------------------------------------- the manager's deadline


def test_a_keep_alive_deadline_outlasts_the_ttl() -> None:
    clock = Clock()

    async def scenario() -> None:
        manager = manager_for({**FAKE_ENV, "LIGHT_TTL": "30"}, FakeRegistry(), clock)
        await use(manager, "light")
        manager.keep_alive("light", 300)  # told at the end of the request
        clock.now += 31  # past the TTL, within keep_alive
        assert await manager.unload_idle() == []
        assert manager.detailed_status("light")["keep_alive"]["forever"] is False
        clock.now += 270
        assert await manager.unload_idle() == ["light"]
        await manager.close()

    run(scenario)


def test_keep_alive_forever_and_a_later_request_replacing_it() -> None:
    clock = Clock()

    async def scenario() -> None:
        manager = manager_for({**FAKE_ENV, "LIGHT_TTL": "30"}, FakeRegistry(), clock)
        await use(manager, "light")
        manager.keep_alive("light", math.inf)
        clock.now += 10**7
        assert await manager.unload_idle() == []
        assert manager.detailed_status("light")["keep_alive"] == {"forever": True, "until": None}
        await use(manager, "light")
        manager.keep_alive("light", 60)  # the last request's keep_alive counts, as in Ollama
        clock.now += 61
        assert await manager.unload_idle() == ["light"]
        await manager.close()

    run(scenario)


def test_keep_alive_zero_unloads_once_the_last_request_ends() -> None:
    clock = Clock()

    async def scenario() -> None:
        manager = manager_for(FAKE_ENV, FakeRegistry(), clock)  # no TTL: only keep_alive unloads it
        async with manager.lease("light"):
            async with manager.lease("light"):
                pass
            manager.keep_alive("light", 0)  # one request ends asking for the unload; another holds the tier
            await asyncio.sleep(0)
            assert manager.tiers["light"].state == READY
        await wait_for_async(lambda: manager.tiers["light"].state == UNLOADED, "the unload after the last request")
        async with manager.lease("light"):  # the next request loads it again, and stays loaded
            pass
        await asyncio.sleep(0)
        assert manager.tiers["light"].state == READY
        await manager.close()

    run(scenario)


# ---------------------------------------------------------------- through the ollama client


@pytest.fixture
def rag() -> RagRegistry:
    return RagRegistry()


@pytest.fixture
def live(rag: RagRegistry) -> Iterator[LiveServer]:
    env = {**ENV, "LIGHT_TTL": "30"}
    with LiveServer(create_app(load_settings(env), factories=rag.factories())) as server:
        yield server


@pytest.fixture
def sdk(live: LiveServer) -> ollama.Client:
    return ollama.Client(host=live.url, timeout=DEADLINE_S)


def expires_in(sdk: ollama.Client, model: str) -> float:
    found = [m for m in sdk.ps().models if m.model == model]
    assert found, f"{model} is not running"
    expires = found[0].expires_at
    assert isinstance(expires, datetime)
    return expires.timestamp() - time.time()


def test_chat_with_keep_alive_zero_unloads_after_the_request(sdk: ollama.Client) -> None:
    reply = sdk.chat(model="medium", messages=HI, keep_alive=0)
    assert reply.message.content == "echo: hi"
    wait_for(lambda: sdk.ps().models == [], "the tier unloading after the request")
    parts = list(sdk.generate(model="medium", prompt="hi", stream=True, keep_alive="0s"))  # streamed too
    assert "".join(p.response for p in parts) == "echo: hi"
    wait_for(lambda: sdk.ps().models == [], "the tier unloading after the stream")


def test_a_keep_alive_duration_shows_in_ps_and_the_admin_status(sdk: ollama.Client, live: LiveServer) -> None:
    sdk.chat(model="light", messages=HI)
    assert expires_in(sdk, "light:latest") <= 31  # the TTL alone
    sdk.chat(model="light", messages=HI, keep_alive="1h")
    assert 3000 < expires_in(sdk, "light:latest") <= 3601
    status = live.app.state.llm.manager.detailed_status("light")
    assert status["keep_alive"]["forever"] is False and status["keep_alive"]["until"] > time.time() + 3000
    sdk.generate(model="light", prompt="", keep_alive="2h")  # Ollama's load request honours it too
    assert 7000 < expires_in(sdk, "light:latest") <= 7201
    sdk.generate(model="light", prompt="hi", keep_alive=-1)
    assert expires_in(sdk, "light:latest") > 365 * 86400  # for ever
    assert [m.model for m in sdk.ps().models] == ["light:latest"]


def test_embed_keep_alive_and_a_bad_value(sdk: ollama.Client) -> None:
    assert len(sdk.embed(model="embedding", input=["alpha"], keep_alive=0).embeddings) == 1
    wait_for(lambda: "embedding:latest" not in [m.model for m in sdk.ps().models], "the embedding tier unloading")
    with pytest.raises(ollama.ResponseError) as info:
        sdk.chat(model="light", messages=HI, keep_alive="soon")
    assert info.value.status_code == 400 and "keep_alive" in info.value.error


def test_only_admin_keys_unload_with_keep_alive_zero(tmp_path: Path, fake_registry: FakeRegistry) -> None:
    settings = load_settings({**FAKE_ENV, "API_KEYS_FILE": str(key_file(tmp_path, KEYS))})
    with LiveServer(create_app(settings, factories=fake_registry.factories())) as live:
        app = ollama.Client(host=live.url, timeout=DEADLINE_S, headers={"Authorization": "Bearer sk-app"})
        ops = ollama.Client(host=live.url, timeout=DEADLINE_S, headers={"Authorization": "Bearer sk-ops"})
        assert app.chat(model="light", messages=HI, keep_alive=0).message.content == "echo: hi"
        light = live.app.state.llm.manager.tiers["light"]  # ignored: no unload asked, none done
        assert (light.release_when_idle, light.state, fake_registry.models["light"].closed) == (False, READY, False)
        ops.chat(model="light", messages=HI, keep_alive=0)
        wait_for(lambda: app.ps().models == [], "the admin's keep_alive 0 unloading the tier")
