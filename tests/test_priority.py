"""Request priorities (X-Priority / `priority`): the waiting queue serves higher priority first, never
starves the rest, a key may cap its requests' priority, and an unknown value is a 400."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from config import load_settings
from core import priority
from core.microbatch import BatchWorker
from core.priority import OVERTAKE_LIMIT, Priority, WaitingQueue
from server import create_app
from tests.conftest import FAKE_ENV, LiveServer
from tests.fakes import FakeChat, FakeRegistry
from tests.test_keys import bearer, key_file
from tests.waiting import DEADLINE_S, wait_for

# ---------------------------------------------------------------- the queue alone


def test_the_queue_admits_higher_priority_first_and_first_come_within_one() -> None:
    queue: WaitingQueue[str] = WaitingQueue()
    for name, level in [("n1", Priority.NORMAL), ("l1", Priority.LOW), ("h1", Priority.HIGH), ("n2", Priority.NORMAL)]:
        queue.append(name, level)
    assert queue.counts() == {"high": 1, "normal": 2, "low": 1}
    assert [queue.popleft() for _ in range(4)] == ["h1", "n1", "n2", "l1"]


def test_the_oldest_request_is_overtaken_a_bounded_number_of_times() -> None:
    queue: WaitingQueue[str] = WaitingQueue()
    queue.append("low", Priority.LOW)
    served: list[str] = []
    for i in range(20):  # a high request arrives before every admission: a stream of them
        queue.append(f"h{i}", Priority.HIGH)
        served.append(queue.popleft())
    assert served.index("low") == OVERTAKE_LIMIT
    assert served[: OVERTAKE_LIMIT + 1] == ["h0", "h1", "h2", "low"][:OVERTAKE_LIMIT] + ["low"]


def test_an_unknown_priority_is_refused() -> None:
    assert Priority.parse(" High ") is Priority.HIGH
    with pytest.raises(Exception, match="Unknown priority 'urgent': use high, normal or low"):
        Priority.parse("urgent")


# ---------------------------------------------------------------- the chat scheduler, over HTTP


@pytest.fixture
def one_slot() -> FakeRegistry:
    return FakeRegistry(max_parallel=1)  # one sequence at a time: everything else waits in the queue


@pytest.fixture
def live(one_slot: FakeRegistry, tmp_path: Path) -> Iterator[LiveServer]:
    keys = key_file(tmp_path, '[[keys]]\nname = "batch"\nkey = "sk-batch"\npriority = "low"\n')
    env = {**FAKE_ENV, "API_KEYS": "sk-admin", "API_KEYS_FILE": str(keys), "CACHE_DIR": str(tmp_path / "cache")}
    with LiveServer(create_app(load_settings(env), factories=one_slot.factories())) as server:
        yield server


def _post(url: str, results: dict[str, int], name: str, key: str = "sk-admin", **extra: Any) -> threading.Thread:
    headers = {**bearer(key), **extra.pop("headers", {})}
    body = {"model": "light", "messages": [{"role": "user", "content": f"SAY:{name}"}], **extra}

    def send() -> None:
        response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=DEADLINE_S)
        results[name] = response.status_code

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def _admitted(model: FakeChat) -> list[str]:
    """The requests the model started, in order (their prompts end "SAY:<name><assistant>")."""
    prompts = ["".join(chr(t) for t in job.prompt_tokens) for job in model.inserted]
    return [p.rsplit("SAY:", 1)[1].removesuffix("<assistant>") for p in prompts][1:]  # after the warm-up


def _held_model(live: LiveServer, registry: FakeRegistry, results: dict[str, int]) -> tuple[FakeChat, Any]:
    """The light model with one request decoding and its steps held: what comes next waits in the queue."""
    _post(live.url, results, "warm-up").join(DEADLINE_S)  # loads the model
    model: FakeChat = registry.models["light"]
    model.hold_gate = threading.Event()
    threads = [_post(live.url, results, "first")]
    wait_for(lambda: len(model.inserted) == 2, "the first request decoding")
    scheduler = live.app.state.llm.manager.tiers["light"].worker.scheduler
    return model, (scheduler, threads)


def test_a_high_request_overtakes_a_queue_of_low_ones(live: LiveServer, one_slot: FakeRegistry) -> None:
    results: dict[str, int] = {}
    model, (scheduler, threads) = _held_model(live, one_slot, results)
    for i in range(3):
        threads.append(_post(live.url, results, f"low{i}", headers={"X-Priority": "low"}))
        wait_for(lambda i=i: scheduler.queued == i + 1, f"low request {i} queued")
    threads.append(_post(live.url, results, "high", priority="high"))
    wait_for(lambda: scheduler.queued == 4, "the high request queued")
    waiting = live.app.state.llm.manager.detailed_status("light")["queued_by_priority"]
    assert waiting == {"high": 1, "normal": 0, "low": 3}
    model.hold_gate.set()
    for thread in threads:
        thread.join(DEADLINE_S)
    assert set(results.values()) == {200}
    assert _admitted(model) == ["first", "high", "low0", "low1", "low2"]


def test_low_requests_still_complete_under_a_stream_of_high_ones(live: LiveServer, one_slot: FakeRegistry) -> None:
    results: dict[str, int] = {}
    model, (scheduler, threads) = _held_model(live, one_slot, results)
    threads.append(_post(live.url, results, "low", priority="low"))
    wait_for(lambda: scheduler.queued == 1, "the low request queued")
    for i in range(8):
        threads.append(_post(live.url, results, f"high{i}", priority="high"))
        wait_for(lambda i=i: scheduler.queued == i + 2, f"high request {i} queued")
    model.hold_gate.set()
    for thread in threads:
        thread.join(DEADLINE_S)
    assert set(results.values()) == {200}
    order = _admitted(model)
    assert order.index("low") == 1 + OVERTAKE_LIMIT  # after "first" and at most OVERTAKE_LIMIT highs
    assert order[1 : 1 + OVERTAKE_LIMIT] == [f"high{i}" for i in range(OVERTAKE_LIMIT)]


def test_a_keys_priority_is_its_default_and_its_ceiling(live: LiveServer, one_slot: FakeRegistry) -> None:
    results: dict[str, int] = {}
    model, (scheduler, threads) = _held_model(live, one_slot, results)
    threads.append(_post(live.url, results, "asks-high", key="sk-batch", priority="high"))  # capped to low
    threads.append(_post(live.url, results, "plain", key="sk-batch"))  # defaults to low
    wait_for(lambda: scheduler.queued == 2, "both requests of the low key queued")
    waiting = live.app.state.llm.manager.detailed_status("light")["queued_by_priority"]
    assert waiting == {"high": 0, "normal": 0, "low": 2}
    model.hold_gate.set()
    for thread in threads:
        thread.join(DEADLINE_S)
    assert set(results.values()) == {200}


@pytest.mark.parametrize(
    ("where", "param"),
    [({"headers": {"X-Priority": "urgent"}}, "X-Priority"), ({"json_extra": {"priority": "urgent"}}, "priority")],
)
def test_an_unknown_priority_is_a_400(live: LiveServer, where: dict[str, Any], param: str) -> None:
    body = {"model": "light", "messages": [{"role": "user", "content": "hi"}], **where.get("json_extra", {})}
    headers = {**bearer("sk-admin"), **where.get("headers", {})}
    for path, payload in [
        ("/v1/chat/completions", body),
        ("/v1/completions", {"model": "light", "prompt": "hi", **where.get("json_extra", {})}),
        ("/v1/responses", {"model": "light", "input": "hi", **where.get("json_extra", {})}),
        ("/api/chat", {"model": "light", "messages": [{"role": "user", "content": "hi"}]}),  # Ollama: the header
    ]:
        if path == "/api/chat" and "headers" not in where:
            continue
        response = httpx.post(f"{live.url}{path}", json=payload, headers=headers, timeout=DEADLINE_S)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        if path == "/api/chat":  # Ollama's error shape: the message alone
            assert "use high, normal or low" in error
            continue
        assert (error["param"], error["type"]) == (param, "invalid_request_error")
        assert "use high, normal or low" in error["message"]


# ---------------------------------------------------------------- the micro-batching worker


def test_the_micro_batching_queue_serves_higher_priority_first() -> None:
    release = threading.Event()
    ran: list[str] = []

    def run(model: object, items: list[str]) -> list[str]:
        if items == ["blocker"]:
            release.wait(DEADLINE_S)
        ran.extend(items)
        return items

    worker = BatchWorker(lambda: object(), "embedding", max_queue=16, wait_ms=0)
    try:
        worker.ready.result(DEADLINE_S)
        futures = [worker.submit_batch("blocker", ["blocker"], run)]
        wait_for(lambda: worker.active, "the blocker running")
        for name, level in [("low", Priority.LOW), ("normal", Priority.NORMAL), ("high", Priority.HIGH)]:
            priority.use(level)  # what the route does for its request
            futures.append(worker.submit_batch(name, [name], run))  # a key each: nothing merges
        priority.use(Priority.NORMAL)
        release.set()
        for future in futures:
            future.result(DEADLINE_S)
        assert ran == ["blocker", "high", "normal", "low"]
    finally:
        worker.shutdown()


def test_embeddings_and_rerank_refuse_an_unknown_priority_and_accept_cohere_integers(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from tests.fakes import FakeEmbedder, FakeReranker

    env = {**FAKE_ENV, "EMBEDDING_MODEL_PATH": "/models/emb", "RERANKER_MODEL_PATH": "/models/rr"}
    env |= {"EMBEDDING_BACKEND": "sentence_transformers", "RERANKER_BACKEND": "cross_encoder"}
    env["CACHE_DIR"] = str(tmp_path / "cache")
    factories = {
        **FakeRegistry().factories(),
        "embedding:sentence_transformers": lambda tier, settings: FakeEmbedder(),
        "rerank:cross_encoder": lambda tier, settings: FakeReranker(),
    }
    app = create_app(load_settings(env), factories=factories)
    with TestClient(app, base_url="http://localhost") as client:
        bad = client.post("/v1/embeddings", json={"model": "embedding", "input": "a", "priority": "top"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "priority"
        ok = client.post("/v1/embeddings", json={"input": "a", "model": "embedding"}, headers={"X-Priority": "low"})
        assert ok.status_code == 200, ok.text
        rerank = {"query": "q", "documents": ["a", "b"], "model": "reranker"}
        assert client.post("/v1/rerank", json={**rerank, "priority": 5}).status_code == 200  # Cohere's integer
        refused = client.post("/v1/rerank", json={**rerank, "priority": "soon"})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "priority"
