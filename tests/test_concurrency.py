"""Scheduler behaviour under concurrency, against a real uvicorn (in-process clients never disconnect)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from config import load_settings
from server import create_app
from tests.conftest import FAKE_ENV, LiveServer
from tests.fakes import FakeRegistry
from tests.waiting import DEADLINE_S, wait_for, wait_for_async


def chat_body(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "light", "messages": [{"role": "user", "content": content}], **extra}


@pytest.fixture
def gated() -> Iterator[tuple[LiveServer, FakeRegistry]]:
    """A live server whose fake light model steps only while the test lets it."""
    registry = FakeRegistry()
    env = {**FAKE_ENV, "LIGHT_MAX_QUEUE": "1", "LIGHT_QUEUE_TIMEOUT": "0.01"}
    with LiveServer(create_app(load_settings(env), factories=registry.factories())) as live:
        warm = httpx.post(live.url + "/v1/chat/completions", json=chat_body("warm"), timeout=DEADLINE_S)
        assert warm.status_code == 200
        gate = threading.Event()
        registry.models["light"].step_gate = gate
        try:
            yield live, registry
        finally:
            gate.set()
            registry.models["light"].step_gate = None


def test_concurrent_requests_equal_one_at_a_time(live_fake_server: LiveServer) -> None:
    bodies = [chat_body(f"message number {i}", max_tokens=5 + 3 * i) for i in range(6)]
    bodies[3] = chat_body("message number 3", stop=["r 3"], max_tokens=40)

    async def run_all() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=live_fake_server.url, timeout=DEADLINE_S) as client:
            return [
                r.json() for r in await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))
            ]

    concurrent = asyncio.run(run_all())
    url = live_fake_server.url + "/v1/chat/completions"
    one_by_one = [httpx.post(url, json=b, timeout=DEADLINE_S).json() for b in bodies]
    strip = lambda d: (d["choices"], d["usage"])  # noqa: E731
    assert [strip(d) for d in concurrent] == [strip(d) for d in one_by_one]
    assert concurrent[3]["choices"][0]["message"]["content"] == "echo: message numbe"


def test_full_queue_is_503_with_retry_after(gated: tuple[LiveServer, FakeRegistry]) -> None:
    live, registry = gated
    scheduler = live.app.state.llm.manager.tiers["light"].worker.scheduler

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=live.url, timeout=DEADLINE_S) as client:
            running = [
                asyncio.ensure_future(client.post("/v1/chat/completions", json=chat_body("ENDLESS"))) for _ in range(3)
            ]
            await wait_for_async(lambda: scheduler.active + scheduler.queued == 3, "three requests with the scheduler")
            overflow = await client.post("/v1/chat/completions", json=chat_body("one too many"))
            registry.models["light"].step_gate.set()
            await asyncio.gather(*running, return_exceptions=True)
            return overflow

    response = asyncio.run(scenario())
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "overloaded"


def test_request_waiting_past_the_queue_timeout_is_503(gated: tuple[LiveServer, FakeRegistry]) -> None:
    live, registry = gated
    scheduler = live.app.state.llm.manager.tiers["light"].worker.scheduler

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=live.url, timeout=DEADLINE_S) as client:
            running = [
                asyncio.ensure_future(client.post("/v1/chat/completions", json=chat_body("ENDLESS", max_tokens=50)))
                for _ in range(2)
            ]
            await wait_for_async(lambda: scheduler.active + scheduler.queued == 2, "two requests with the scheduler")
            waiting = asyncio.ensure_future(client.post("/v1/chat/completions", json=chat_body("late")))
            await wait_for_async(lambda: scheduler.active + scheduler.queued == 3, "the late request queued")
            queued_at = time.monotonic()
            while time.monotonic() - queued_at < 0.1:  # let the 0.01 s queue timeout pass
                await asyncio.sleep(0.01)
            registry.models["light"].step_gate.set()
            late = await waiting
            await asyncio.gather(*running, return_exceptions=True)
            return late

    late = asyncio.run(scenario())
    assert late.status_code == 503
    assert "Waited over" in late.json()["error"]["message"]


def test_disconnect_frees_the_slot_within_a_step(gated: tuple[LiveServer, FakeRegistry]) -> None:
    live, registry = gated
    model = registry.models["light"]
    body = chat_body("ENDLESS", max_tokens=200, stream=True)
    with httpx.stream("POST", live.url + "/v1/chat/completions", json=body, timeout=DEADLINE_S) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # the role chunk; the model has not stepped yet
        wait_for(lambda: len(model.inserted) == 2, "the stream's sequence inserted")  # after the warm-up's
        job = model.inserted[-1]
    wait_for(job.cancelled.is_set, "the cancel")  # the server saw the disconnect while the model was blocked
    model.step_gate.set()
    wait_for(lambda: job in model.removed, "the sequence removed")
    assert job.completion_tokens <= 1
    wait_for(lambda: live.app.state.llm.manager.tiers["light"].worker.scheduler.active == 0, "no active sequence")


def test_drop_and_resend_a_hundred_times(live_fake_server: LiveServer, fake_registry: FakeRegistry) -> None:
    with httpx.Client(base_url=live_fake_server.url, timeout=DEADLINE_S) as client:
        for _ in range(100):
            with client.stream(
                "POST", "/v1/chat/completions", json=chat_body("ENDLESS", max_tokens=100000, stream=True)
            ) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        break
        final = client.post("/v1/chat/completions", json=chat_body("still alive"))
    assert final.json()["choices"][0]["message"]["content"] == "echo: still alive"
    worker = live_fake_server.app.state.llm.manager.tiers["light"].worker.scheduler
    wait_for(lambda: worker.active == 0 and worker.queued == 0, "an idle scheduler")
    assert live_fake_server.app.state.llm.manager.tiers["light"].in_flight == 0
