"""Process isolation (`{TIER}_ISOLATION=process`): a crash in a tier's native code takes down that tier's
worker process, not the service.

The fakes in tests/isolation_fakes.py call `os.abort()` on cue, as an assertion in llama.cpp or MLX
would. Light and embedding run in worker processes, medium in process; a crash of light fails light's
requests with a 503 `tier_crashed` (one error event in a stream), /health shows it failed with the
signal, the other tiers answer meanwhile, and the next request restarts it (repeated crashes back off,
on the manager's clock).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from config import ConfigError, load_settings
from core.errors import ModelUnavailable, ServiceError
from core.events import DoneEvent, ErrorEvent, Event, TextEvent
from core.turns import ChatBackend, SamplingRequest, TurnRequest
from isolation.supervisor import Restarts, TierCrashed
from model_manager import FAILED, READY, ModelManager
from models_admin.overrides import OverrideStore
from server import create_app
from tests import isolation_fakes
from tests.conftest import LiveServer
from tests.waiting import DEADLINE_S, wait_for, wait_for_async

ENV = {
    "LIGHT_MODEL_PATH": "/models/fake-light.gguf",
    "LIGHT_ISOLATION": "process",
    "MEDIUM_MODEL_PATH": "/models/fake-7b.gguf",  # in process
    "EMBEDDING_MODEL_PATH": "/models/fake-embedder",
    "EMBEDDING_ISOLATION": "process",
    "RERANKER_MODEL_PATH": "",
    "ENABLE_CACHE": "false",
}


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def chat(content: str, model: str = "light", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def turn_request(content: str) -> TurnRequest:
    return TurnRequest(kind="chat", sampling=SamplingRequest(), messages=({"role": "user", "content": content},))


async def crash(backend: ChatBackend, content: str) -> ServiceError:
    """What a request that crashes the worker gets: an error event, or a refused start when the worker
    died before it could say the turn had started."""
    try:
        turn = await backend.start_turn(turn_request(content))
    except TierCrashed as exc:
        return exc
    last = [event async for event in turn.choices[0].events()][-1]
    await turn.aclose()
    assert isinstance(last, ErrorEvent), last
    return last.error


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def live() -> Iterator[LiveServer]:
    with LiveServer(create_app(load_settings(ENV), factories=isolation_fakes.factories())) as server:
        yield server


def health(live: LiveServer) -> dict[str, Any]:
    return httpx.get(live.url + "/health", timeout=DEADLINE_S).json()["tiers"]


def _held(tier: dict[str, Any]) -> dict[str, Any] | None:
    return tier if tier["state"] == "ready" and tier["in_flight"] == 2 else None


def _failed(tier: dict[str, Any]) -> dict[str, Any] | None:
    return tier if tier["state"] == "failed" else None


# ---------------------------------------------------------------- serving through a worker process


def test_a_tier_in_a_worker_process_answers_as_in_process(live: LiveServer) -> None:
    with httpx.Client(base_url=live.url, timeout=DEADLINE_S) as client:
        isolated = client.post("/v1/chat/completions", json=chat("hello", n=2)).json()
        in_process = client.post("/v1/chat/completions", json=chat("hello", model="medium", n=2)).json()
        assert [c["message"] for c in isolated["choices"]] == [c["message"] for c in in_process["choices"]]
        assert isolated["choices"][0]["message"]["content"] == "echo: hello"
        assert isolated["usage"] == in_process["usage"]
        with client.stream("POST", "/v1/chat/completions", json=chat("streamed", stream=True)) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        text = "".join(
            choice["delta"].get("content") or ""
            for line in lines[:-1]
            for choice in json.loads(line[len("data: ") :])["choices"]
        )
        assert text == "echo: streamed"
        completion = client.post("/v1/completions", json={"model": "light", "prompt": ["a", "b"], "n": 2}).json()
        assert len(completion["choices"]) == 4
        refused = client.post("/v1/completions", json={"model": "light", "prompt": [5, 0x110000]})  # typed errors
        assert refused.status_code == 400 and "1114112" in refused.json()["error"]["message"]  # cross the pipe
        embedded = client.post("/v1/embeddings", json={"model": "embedding", "input": ["one", "three"]})
        assert embedded.status_code == 200 and embedded.json()["data"][1]["embedding"]
    tiers = health(live)
    assert tiers["light"]["state"] == "ready" and tiers["light"]["isolation"] == "process"
    assert tiers["light"]["pid"] != os.getpid()
    assert tiers["embedding"]["isolation"] == "process" and "isolation" not in tiers["medium"]


def test_a_crash_fails_that_tiers_requests_and_no_other(live: LiveServer, tmp_path: Path) -> None:
    # The gate is never opened: both requests stay held, one decoding, one queued (whichever came first).
    gate, bomb = tmp_path / "gate", tmp_path / "bomb"

    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=live.url, timeout=DEADLINE_S) as client:
            held = f"HOLD:{gate} DIE_ON:{bomb}"
            stream = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(held, stream=True)))
            whole = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat(f"{held} two")))
            light = await wait_for_async(lambda: _held(health(live)["light"]), "two requests on a loaded light")
            first_pid = light["pid"]
            assert (
                await client.post("/v1/chat/completions", json=chat("meanwhile", model="medium"))
            ).status_code == 200
            bomb.touch()  # the worker aborts under both requests
            streamed, refused = await stream, await whole
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "tier_crashed"
            assert refused.headers["Retry-After"]
            events = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
            assert json.loads(events[-1][len("data: ") :])["error"]["code"] == "tier_crashed"
            assert "data: [DONE]" not in events
            crashed = await wait_for_async(lambda: _failed(health(live)["light"]), "light failed")
            assert crashed["state"] == "failed" and "SIGABRT" in crashed["reason"]
            # Other tiers answer while light is down.
            assert (await client.post("/v1/chat/completions", json=chat("still", model="medium"))).status_code == 200
            embedded = await client.post("/v1/embeddings", json={"model": "embedding", "input": "still here"})
            assert embedded.status_code == 200
            assert (await client.get("/health")).json()["status"] == "degraded"
            # The next request starts a new worker (a first crash restarts at once).
            again = await client.post("/v1/chat/completions", json=chat("back"))
            assert again.json()["choices"][0]["message"]["content"] == "echo: back"
            restarted = health(live)["light"]
            assert restarted["state"] == "ready" and restarted["pid"] != first_pid

    asyncio.run(scenario())


def test_an_embedding_worker_crash_is_a_503_and_the_tier_restarts(live: LiveServer) -> None:
    with httpx.Client(base_url=live.url, timeout=DEADLINE_S) as client:
        assert client.post("/v1/embeddings", json={"model": "embedding", "input": "warm"}).status_code == 200
        crashed = client.post("/v1/embeddings", json={"model": "embedding", "input": ["fine", "ABORT"]})
        assert crashed.status_code == 503 and crashed.json()["error"]["code"] == "tier_crashed"
        tier = wait_for(lambda: _failed(health(live)["embedding"]), "embedding failed")
        assert "SIGABRT" in tier["reason"]
        assert client.post("/v1/chat/completions", json=chat("chat goes on")).status_code == 200
        assert client.post("/v1/embeddings", json={"model": "embedding", "input": "fine"}).status_code == 200
        assert health(live)["embedding"]["state"] == "ready"


# ---------------------------------------------------------------- the manager: restarts, loads, unloads


def test_repeated_crashes_back_off_on_the_managers_clock() -> None:
    async def scenario() -> None:
        clock = Clock()
        manager = ModelManager(load_settings(ENV), isolation_fakes.factories(), clock=clock)
        light = manager.tiers["light"]
        for retry_after in (None, None, "1", "2"):  # a first crash restarts at once, then 1 s, 2 s ...
            if retry_after is not None:  # a crash soon after the last one: refused until the backoff ends
                with pytest.raises(TierCrashed) as refused:
                    await manager.ensure_loaded("light")
                assert refused.value.headers["Retry-After"] == retry_after
                clock.now += float(retry_after)
            backend = await manager.ensure_loaded("light")
            assert (await crash(backend, "ABORT soon")).code == "tier_crashed"
            await wait_for_async(lambda: light.state == FAILED, "light failed")
        clock.now += 60.0  # a long quiet spell: the backoff has ended
        backend = await manager.ensure_loaded("light")
        clock.now += 60.0  # a worker that ran a minute before crashing starts the count over
        await crash(backend, "ABORT later")
        await wait_for_async(lambda: light.state == FAILED, "light failed again")
        await manager.ensure_loaded("light")
        assert light.state == READY
        await manager.close()

    asyncio.run(scenario())


def test_restart_backoff_doubles_up_to_a_minute() -> None:
    restarts = Restarts()
    waits = []
    for _ in range(10):
        restarts.crashed(now=0.0, uptime=1.0, reason="killed")
        waits.append(restarts.retry_at)
    assert waits == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    restarts.crashed(now=0.0, uptime=60.0, reason="killed")
    assert restarts.retry_at == 0.0


def test_a_model_swapped_in_reports_its_own_crash() -> None:
    async def scenario() -> None:
        manager = ModelManager(load_settings(ENV), isolation_fakes.factories(), store=OverrideStore(None))
        await manager.ensure_loaded("light")
        await manager.change_tier("light", {"model_path": "/models/fake-other.gguf"})
        swapped = manager.tiers["light"]
        assert (await crash(await manager.ensure_loaded("light"), "ABORT now")).code == "tier_crashed"
        await wait_for_async(lambda: swapped.state == FAILED, "the swapped-in model failed")
        assert "SIGABRT" in manager.status("light")["reason"]
        await manager.close()

    asyncio.run(scenario())


def test_a_crash_while_loading_is_a_failed_load_naming_the_signal() -> None:
    async def scenario() -> None:
        env = {**ENV, "LIGHT_MODEL_PATH": "/models/abort-on-load.gguf"}
        manager = ModelManager(load_settings(env), isolation_fakes.factories())
        with pytest.raises(ModelUnavailable, match="SIGABRT"):
            await manager.ensure_loaded("light")
        assert "SIGABRT" in manager.status("light")["reason"]
        await manager.close()

    asyncio.run(scenario())


def test_unload_stops_the_worker_process_and_cancels_its_requests(tmp_path: Path) -> None:
    async def scenario() -> None:
        manager = ModelManager(load_settings(ENV), isolation_fakes.factories())
        backend = await manager.ensure_loaded("light")
        pid = int(manager.status("light")["pid"])
        turn = await backend.start_turn(turn_request(f"HOLD:{tmp_path / 'never'}"))
        events = asyncio.ensure_future(_collect(turn.choices[0].events()))
        await manager.unload("light")
        last = (await events)[-1]
        assert isinstance(last, ErrorEvent) and last.error.code == "request_cancelled"
        assert not alive(pid)
        assert manager.status("light")["state"] == "unloaded"
        await manager.close()

    asyncio.run(scenario())


async def _collect(events: Any) -> list[Event]:
    return [event async for event in events]


def test_a_loader_that_cannot_be_pickled_fails_the_load_clearly() -> None:
    async def scenario() -> None:
        factories = {"chat:llamacpp": lambda tier, settings: isolation_fakes.load_chat(tier, settings)}
        manager = ModelManager(load_settings(ENV), factories)
        with pytest.raises(ModelUnavailable, match="LIGHT_ISOLATION=process"):
            await manager.ensure_loaded("light")
        await manager.close()

    asyncio.run(scenario())


def test_isolation_is_read_and_checked() -> None:
    assert load_settings({}).tiers["light"].isolation == "thread"
    settings = load_settings({"LIGHT_ISOLATION": "Process"})
    assert settings.tiers["light"].isolation == "process"
    assert load_settings({}).tiers["embedding"].isolation in ("thread", "process")
    with pytest.raises(ConfigError, match="LIGHT_ISOLATION has value 'fork'"):
        load_settings({"LIGHT_ISOLATION": "fork"})


# ---------------------------------------------------------------- the packaged Gemma


@pytest.mark.real
def test_packaged_gemma_answers_the_same_in_a_worker_process() -> None:
    async def answer(isolation: str) -> tuple[str, DoneEvent]:
        env = {
            "LIGHT_ISOLATION": isolation,
            "LIGHT_N_CTX": "512",
            "EMBEDDING_MODEL_PATH": "",
            "RERANKER_MODEL_PATH": "",
        }
        manager = ModelManager(load_settings(env), {"chat:llamacpp": _packaged_gemma_loader()})
        backend = await manager.ensure_loaded("light")
        request = TurnRequest(
            kind="completion", sampling=SamplingRequest(temperature=0.0, max_tokens=8), prompts=("The capital of",)
        )
        turn = await backend.start_turn(request)
        events = [event async for event in turn.choices[0].events()]
        await manager.close()
        done = events[-1]
        assert isinstance(done, DoneEvent), done
        return "".join(e.text for e in events if isinstance(e, TextEvent)), done

    in_process, isolated = asyncio.run(answer("thread")), asyncio.run(answer("process"))
    assert isolated[0] == in_process[0] and isolated[1].completion_tokens == in_process[1].completion_tokens > 0


def _packaged_gemma_loader() -> Any:
    from chat.loaders import load_llamacpp_chat

    return load_llamacpp_chat
