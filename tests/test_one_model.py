"""One model at a time (MAX_LOADED_CHAT_TIERS=1): requests for two chat tiers, interleaved, are served in
the order they came, with never two chat models loaded at once, and the queue shows in /health."""

from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from config import ConfigError, Settings, TierConfig, load_settings
from core.protocols import GenerationJob
from server import create_app
from tests.conftest import FAKE_ENV, LiveServer
from tests.fakes import FakeChat, FakeRegistry
from tests.waiting import DEADLINE_S, wait_for


class Journal:
    """What the fake models did, in order, from their own threads: loads, starts of requests, closes. At
    every load it also notes which other chat models were still open."""

    def __init__(self) -> None:
        self.events: list[str] = []
        self.open: set[str] = set()
        self.overlaps: list[str] = []
        self.lock = threading.Lock()

    def note(self, event: str) -> None:
        with self.lock:
            self.events.append(event)


class JournalChat(FakeChat):
    journal: Journal

    def insert(self, job: GenerationJob) -> None:
        super().insert(job)
        said = "".join(chr(t) for t in job.prompt_tokens).rsplit("SAY:", 1)[-1].removesuffix("<assistant>")
        self.journal.note(f"serve {said.split('HOLD:')[0]}")

    def close(self) -> None:
        super().close()
        with self.journal.lock:
            self.journal.open.discard(self.tier.name)
        self.journal.note(f"close {self.tier.name}")


class JournalRegistry(FakeRegistry):
    def __init__(self) -> None:
        super().__init__()
        self.journal = Journal()

    def _load_chat(self, tier: TierConfig, settings: Settings) -> FakeChat:
        with self.journal.lock:
            if self.journal.open:
                self.journal.overlaps.append(f"{tier.name} loaded while {sorted(self.journal.open)} open")
            self.journal.open.add(tier.name)
        self.journal.note(f"load {tier.name}")
        model = JournalChat(tier)
        model.journal = self.journal
        self.models[tier.name] = model
        return model


@pytest.fixture
def registry() -> JournalRegistry:
    return JournalRegistry()


@pytest.fixture
def live(registry: JournalRegistry, tmp_path: Path) -> Iterator[LiveServer]:
    env = {**FAKE_ENV, "MAX_LOADED_CHAT_TIERS": "1", "CACHE_DIR": str(tmp_path / "cache")}
    with LiveServer(create_app(load_settings(env), factories=registry.factories())) as server:
        yield server


def _send(url: str, tier: str, text: str, results: dict[str, int]) -> threading.Thread:
    body = {"model": tier, "messages": [{"role": "user", "content": f"SAY:{text}"}]}

    def send() -> None:
        results[text] = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=DEADLINE_S).status_code

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_interleaved_requests_for_two_tiers_are_served_in_order_one_model_at_a_time(
    live: LiveServer, registry: JournalRegistry, tmp_path: Path
) -> None:
    url, results = live.url, dict[str, int]()
    release = tmp_path / "release"
    threads = [_send(url, "light", f"L1HOLD:{release}", results)]  # decodes until the file exists
    wait_for(lambda: "serve L1" in registry.journal.events, "the first light request decoding")
    slots = live.app.state.llm.manager.slots
    for i, (tier, text) in enumerate([("medium", "M1"), ("light", "L2"), ("medium", "M2")]):
        threads.append(_send(url, tier, text, results))
        wait_for(lambda i=i: len(slots.waiting) == i + 1, f"{text} waiting its turn")

    health = httpx.get(f"{url}/health").json()["chat_queue"]
    assert health["loaded"] == ["light"] and health["max_loaded_chat_tiers"] == 1
    waiting = [{"tier": "medium", "requests": 1}, {"tier": "light", "requests": 1}, {"tier": "medium", "requests": 1}]
    assert health["waiting"] == waiting
    assert httpx.get(f"{url}/admin/status").json()["tiers"]["medium"]["waiting_to_load"] == 2

    release.touch()
    for thread in threads:
        thread.join(DEADLINE_S)
    assert results == {f"L1HOLD:{release}": 200, "M1": 200, "L2": 200, "M2": 200}
    assert registry.journal.events == [
        "load light",
        "serve L1",
        "close light",
        "load medium",
        "serve M1",
        "close medium",
        "load light",
        "serve L2",
        "close light",
        "load medium",
        "serve M2",
    ]
    assert registry.journal.overlaps == []
    assert httpx.get(f"{url}/health").json()["chat_queue"]["waiting"] == []


def test_requests_for_the_loaded_tier_join_the_run_at_the_head_of_the_queue(
    live: LiveServer, registry: JournalRegistry, tmp_path: Path
) -> None:
    url, results = live.url, dict[str, int]()
    release = tmp_path / "release"
    threads = [_send(url, "light", f"L1HOLD:{release}", results)]
    wait_for(lambda: "serve L1" in registry.journal.events, "the first light request decoding")
    slots = live.app.state.llm.manager.slots
    for i, (tier, text) in enumerate([("medium", "M1"), ("medium", "M2"), ("light", "L2")]):
        threads.append(_send(url, tier, text, results))
        wait_for(lambda i=i: len(slots.waiting) == i + 1, f"{text} waiting its turn")
    release.touch()
    for thread in threads:
        thread.join(DEADLINE_S)
    assert set(results.values()) == {200}
    events = registry.journal.events
    assert events[:3] == ["load light", "serve L1", "close light"]
    assert events[-3:] == ["close medium", "load light", "serve L2"]
    assert sorted(events[4:6]) == ["serve M1", "serve M2"]  # both medium ones in one load of medium
    assert events.count("load medium") == 1 and registry.journal.overlaps == []


def test_a_request_that_waits_past_its_queue_timeout_gets_503_and_leaves_the_queue(
    registry: JournalRegistry, tmp_path: Path
) -> None:
    env = {**FAKE_ENV, "MAX_LOADED_CHAT_TIERS": "1", "MEDIUM_QUEUE_TIMEOUT": "0.5", "CACHE_DIR": str(tmp_path)}
    release, results = tmp_path / "release", dict[str, int]()
    with LiveServer(create_app(load_settings(env), factories=registry.factories())) as live:
        held = _send(live.url, "light", f"L1HOLD:{release}", results)
        wait_for(lambda: "serve L1" in registry.journal.events, "the light request decoding")
        body = {"model": "medium", "messages": [{"role": "user", "content": "late"}]}
        refused = httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=DEADLINE_S)
        assert refused.status_code == 503 and "retry-after" in refused.headers
        assert "to be loaded (MAX_LOADED_CHAT_TIERS=1)" in refused.json()["error"]["message"]
        assert live.app.state.llm.manager.slots.waiting == collections.deque()
        release.touch()
        held.join(DEADLINE_S)
    assert "load medium" not in registry.journal.events


def test_the_limit_is_checked() -> None:
    with pytest.raises(ConfigError, match="MAX_LOADED_CHAT_TIERS"):
        load_settings({**FAKE_ENV, "MAX_LOADED_CHAT_TIERS": "-1"})
    assert load_settings(FAKE_ENV).max_loaded_chat_tiers == 0
