"""The Redis cache tier shared by replicas: two apps over one real `redis-server`, and Redis failing
under them (a closed port, a server that never answers, a SIGSTOPped Redis, Redis killed and back).

Each test uses its own key prefix, so tests sharing the session's Redis never see each other's keys.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from config import Settings, TierConfig
from tests.conftest import FAKE_ENV
from tests.fakes import FakeEmbedder, FakeRegistry
from tests.redis_server import RedisServer, SilentServer, free_port
from tests.test_api import sse_events
from tests.test_metrics import scrape, value

CHAT = {"model": "light", "messages": [{"role": "user", "content": "shared?"}], "temperature": 0}


class Registry(FakeRegistry):
    """Fake chat plus a fake embedder, as one replica's models."""

    def __init__(self) -> None:
        super().__init__()
        self.embedder = FakeEmbedder()

    def factories(self) -> dict[str, Any]:
        def embedder(tier: TierConfig, settings: Settings) -> FakeEmbedder:
            return self.embedder

        return {**super().factories(), "embedding:sentence_transformers": embedder}


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, to freeze or kill."""
    server = RedisServer(tmp_path)
    yield server
    server.kill()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def env(url: str, prefix: str, **extra: str) -> dict[str, str]:
    return {
        **FAKE_ENV,
        "EMBEDDING_MODEL_PATH": "/models/fake-embedder",
        "CACHE_REDIS_URL": url,
        "REDIS_PREFIX": prefix,
        **extra,
    }


def replica(make_client: Any, url: str, prefix: str, **extra: str) -> tuple[Any, Registry]:
    registry = Registry()
    return make_client(env(url, prefix, **extra), registry=registry), registry


def generated(registry: Registry) -> int:
    model = registry.models.get("light")
    return len(model.inserted) if model is not None else 0


def chat(client: Any, body: dict[str, Any] = CHAT) -> Any:
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return response


# ---------------------------------------------------------------- sharing


def test_a_temperature_zero_answer_is_computed_once_for_two_replicas(
    make_client: Any, redis_server: RedisServer, prefix: str
) -> None:
    (first, one), (second, two) = (replica(make_client, redis_server.url, prefix) for _ in range(2))
    miss = chat(first)
    assert miss.headers["x-cache"] == "MISS"
    hit = chat(second)
    assert hit.headers["x-cache"] == "HIT"
    assert hit.json()["choices"] == miss.json()["choices"]
    assert (generated(one), generated(two)) == (1, 0)
    stats = second.get("/admin/cache").json()["redis"]
    assert stats["hits"] == 1 and stats["state"] == "ok" and stats["errors"] == 0


def test_a_stream_recorded_on_one_replica_replays_on_the_other(
    make_client: Any, redis_server: RedisServer, prefix: str
) -> None:
    (first, _), (second, two) = (replica(make_client, redis_server.url, prefix) for _ in range(2))
    body = {**CHAT, "stream": True, "messages": [{"role": "user", "content": "stream me"}]}
    live = first.post("/v1/chat/completions", json=body)
    replayed = second.post("/v1/chat/completions", json=body)
    assert (live.headers["x-cache"], replayed.headers["x-cache"]) == ("MISS", "HIT")

    def text(response: Any) -> str:
        events = [e for e in sse_events(response.text) if e != "[DONE]"]
        return "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])

    assert text(replayed) == text(live) == "echo: stream me"
    assert generated(two) == 0


def test_embeddings_are_shared_per_text(make_client: Any, redis_server: RedisServer, prefix: str) -> None:
    (first, one), (second, two) = (replica(make_client, redis_server.url, prefix) for _ in range(2))
    a = first.post("/v1/embeddings", json={"model": "embedding", "input": ["alpha", "beta"]})
    b = second.post("/v1/embeddings", json={"model": "embedding", "input": ["beta", "gamma", "alpha"]})
    assert a.status_code == b.status_code == 200
    assert one.embedder.batches == [["alpha", "beta"]] and two.embedder.batches == [["gamma"]]
    vectors = [item["embedding"] for item in b.json()["data"]]
    assert vectors[0] == a.json()["data"][1]["embedding"] and vectors[2] == a.json()["data"][0]["embedding"]


def test_entries_are_json_with_their_key_under_our_prefix_and_expire(
    make_client: Any, redis_server: RedisServer, prefix: str
) -> None:
    client, _ = replica(make_client, redis_server.url, prefix, CACHE_TTL_SECONDS="120")
    chat(client)
    redis = redis_server.client()
    (name,) = redis.keys(f"{prefix}:*")
    assert name.decode().startswith(f"{prefix}:cache:")
    entry = json.loads(redis.get(name))
    assert entry["key"] == name.decode().removeprefix(f"{prefix}:cache:") and "choices" in entry["value"]
    assert 0 < redis.ttl(name) <= 120


def test_an_entry_that_does_not_match_its_key_is_a_miss_and_is_replaced(
    make_client: Any, redis_server: RedisServer, prefix: str
) -> None:
    (first, _), (second, two) = (replica(make_client, redis_server.url, prefix) for _ in range(2))
    chat(first)
    redis = redis_server.client()
    (name,) = redis.keys(f"{prefix}:cache:*")
    forged = {"key": "0" * 64, "value": {"choices": [{"pieces": ["forged"], "finish_reason": "stop"}]}}
    redis.set(name, json.dumps(forged))
    response = chat(second)
    assert response.headers["x-cache"] == "MISS" and "forged" not in response.text
    assert generated(two) == 1
    assert json.loads(redis.get(name))["key"] == name.decode().removeprefix(f"{prefix}:cache:")
    assert second.get("/admin/cache").json()["redis"]["dropped"] == 1


def test_clearing_the_cache_unlinks_only_our_prefix(make_client: Any, redis_server: RedisServer, prefix: str) -> None:
    client, registry = replica(make_client, redis_server.url, prefix)
    chat(client)
    client.post("/v1/embeddings", json={"model": "embedding", "input": ["one", "two"]})
    redis = redis_server.client()
    redis.set("someone-else:key", "keep")
    redis.set(f"{prefix}x:cache:{'0' * 64}", "a longer prefix: keep")
    redis.set(f"{prefix}:records:rec:sess_1", "our sessions: keep")
    cleared = client.delete("/admin/cache").json()
    assert cleared["redis_removed"] == 3 and cleared["redis"]["hits"] == 0
    assert redis.keys(f"{prefix}:cache:*") == []
    assert redis.get("someone-else:key") == b"keep"
    assert redis.exists(f"{prefix}x:cache:{'0' * 64}", f"{prefix}:records:rec:sess_1") == 2
    assert chat(client).headers["x-cache"] == "MISS" and generated(registry) == 2


def test_redis_counters_reach_admin_and_metrics(make_client: Any, redis_server: RedisServer, prefix: str) -> None:
    client, _ = replica(make_client, redis_server.url, prefix, CACHE_MAX_SIZE="0")  # no memory tier: Redis answers
    chat(client)
    chat(client)
    redis_stats = client.get("/admin/status").json()["cache"]["redis"]
    assert (redis_stats["hits"], redis_stats["misses"], redis_stats["errors"]) == (1, 1, 0)
    samples = scrape(client)
    assert value(samples, "llmservice_redis_hits_total", use="cache") == 1
    assert value(samples, "llmservice_redis_misses_total", use="cache") == 1
    assert value(samples, "llmservice_redis_up", use="cache") == 1
    assert client.get("/health").json()["redis"] == {"cache": "ok"}


# ---------------------------------------------------------------- failing open


def requests_all_succeed(client: Any, count: int = 4) -> list[str]:
    """Distinct deterministic requests, then the first again: every one answers, memory still caches."""
    statuses = []
    for i in range(count):
        statuses.append(chat(client, {**CHAT, "messages": [{"role": "user", "content": f"q{i}"}]}).headers["x-cache"])
    statuses.append(chat(client, {**CHAT, "messages": [{"role": "user", "content": "q0"}]}).headers["x-cache"])
    embedded = client.post("/v1/embeddings", json={"model": "embedding", "input": ["x", "y"]})
    assert embedded.status_code == 200
    return statuses


def test_a_closed_port_is_bypassed_logged_once_and_shown_in_health(
    make_client: Any, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="llmservice.redis")
    client, _ = replica(make_client, f"redis://127.0.0.1:{free_port()}/0", prefix, REDIS_COOLDOWN_SECONDS="3600")
    assert requests_all_succeed(client) == ["MISS"] * 4 + ["HIT"]
    warnings = [r for r in caplog.records if r.name == "llmservice.redis" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "bypassed" in warnings[0].getMessage()
    assert client.get("/health").json()["redis"] == {"cache": "bypassed"}
    stats = client.get("/admin/cache").json()["redis"]
    assert stats["errors"] == 1 and stats["bypassed"] > 0 and "ConnectionError" in stats["last_error"]
    assert value(scrape(client), "llmservice_redis_up", use="cache") == 0


def test_a_server_that_never_answers_is_bypassed(make_client: Any, prefix: str) -> None:
    silent = SilentServer()
    try:
        client, _ = replica(make_client, silent.url, prefix, REDIS_COOLDOWN_SECONDS="3600")
        assert requests_all_succeed(client) == ["MISS"] * 4 + ["HIT"]
        stats = client.get("/admin/cache").json()["redis"]
        assert stats["state"] == "bypassed" and stats["errors"] == 1 and "Timeout" in stats["last_error"]
    finally:
        silent.close()


def test_a_frozen_redis_costs_no_request_and_sharing_resumes_once_it_thaws(
    make_client: Any, own_redis: RedisServer, prefix: str
) -> None:
    # Cooldown 0: every request probes, so each one meets the frozen server (the worst case).
    (first, one), (second, two) = (
        replica(make_client, own_redis.url, prefix, REDIS_COOLDOWN_SECONDS="0") for _ in range(2)
    )
    chat(first)
    own_redis.freeze()
    try:
        assert requests_all_succeed(second) == ["MISS"] * 4 + ["HIT"]
        assert second.get("/admin/cache").json()["redis"]["errors"] >= 4
    finally:
        own_redis.thaw()
    assert chat(second).headers["x-cache"] == "HIT"  # the entry the first replica stored before the freeze
    fresh = {**CHAT, "messages": [{"role": "user", "content": "after the thaw"}]}
    assert chat(first, fresh).headers["x-cache"] == "MISS"
    assert chat(second, fresh).headers["x-cache"] == "HIT"
    assert second.get("/health").json()["redis"] == {"cache": "ok"}


def test_redis_killed_mid_run_then_back_on_its_port(make_client: Any, own_redis: RedisServer, prefix: str) -> None:
    (first, _), (second, _) = (
        replica(make_client, own_redis.url, prefix, REDIS_COOLDOWN_SECONDS="0") for _ in range(2)
    )
    chat(first)
    own_redis.kill()
    assert requests_all_succeed(second) == ["MISS"] * 4 + ["HIT"]
    own_redis.start()  # empty: nothing was persisted
    fresh = {**CHAT, "messages": [{"role": "user", "content": "after the restart"}]}
    assert chat(first, fresh).headers["x-cache"] == "MISS"
    assert chat(second, fresh).headers["x-cache"] == "HIT"
