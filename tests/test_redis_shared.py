"""Rate limits and sessions shared by replicas through a real `redis-server`: limits fail open (each
process limits on its own while Redis is away), sessions fail closed (a clear 503, never a lost turn).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scale.redis_store import RedisStore, StoreUnavailable
from sessions.store import Record, StoreFull
from tests.conftest import FAKE_ENV
from tests.fakes import FakeRegistry
from tests.redis_server import RedisServer, SilentServer, free_port
from tests.test_api import assert_error
from tests.test_keys import bearer, key_file
from tests.test_sessions import last_prompt, new_session, say, stored
from tests.waiting import wait_for, wait_for_async

CHAT = {"model": "light", "messages": [{"role": "user", "content": "hi"}]}
KEYS = """
[[keys]]
name = "three"
key = "sk-three"
rpm = 3

[[keys]]
name = "tokens"
key = "sk-tokens"
tpm = 20

[[keys]]
name = "single"
key = "sk-single"
max_parallel = 1

[[keys]]
name = "plain"
key = "sk-plain"
"""


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-shared"))
    yield server
    server.kill()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path)
    yield server
    server.kill()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


# ---------------------------------------------------------------- rate limits


def limited(make_client: Any, tmp_path: Path, url: str, prefix: str, **extra: str) -> Any:
    keys = key_file(tmp_path, KEYS)
    environment = {**FAKE_ENV, "API_KEYS_FILE": str(keys), "RATE_LIMIT_REDIS_URL": url, "REDIS_PREFIX": prefix}
    return make_client({**environment, **extra}, registry=FakeRegistry())


def test_requests_per_minute_are_counted_across_replicas(
    make_client: Any, tmp_path: Path, redis_server: RedisServer, prefix: str
) -> None:
    first, second = (limited(make_client, tmp_path, redis_server.url, prefix) for _ in range(2))
    remaining = []
    for client in (first, second, first):
        response = client.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-three"))
        assert response.status_code == 200, response.text
        remaining.append(response.headers["x-ratelimit-remaining-requests"])
    assert remaining == ["2", "1", "0"]
    refused = second.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-three"))
    assert_error(refused, 429, "rate_limit_exceeded")
    assert int(refused.headers["retry-after"]) >= 1 and refused.headers["x-ratelimit-limit-requests"] == "3"
    assert first.get("/health", headers=bearer("sk-plain")).json()["redis"] == {"rate_limits": "ok"}


def test_tokens_charged_on_one_replica_limit_the_other(
    make_client: Any, tmp_path: Path, redis_server: RedisServer, prefix: str
) -> None:
    first, second = (limited(make_client, tmp_path, redis_server.url, prefix) for _ in range(2))
    used = first.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-tokens"))
    assert used.status_code == 200 and used.json()["usage"]["total_tokens"] > 20
    refused = second.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-tokens"))
    error = assert_error(refused, 429, "rate_limit_exceeded")
    assert error["type"] == "tokens"


def test_parallel_slots_are_freed_when_requests_end(
    make_client: Any, tmp_path: Path, redis_server: RedisServer, prefix: str
) -> None:
    first, second = (limited(make_client, tmp_path, redis_server.url, prefix) for _ in range(2))
    for client in (first, second, first, second):
        assert client.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-single")).status_code == 200
    assert redis_server.client().zcard(f"{prefix}:limits:{{single}}:parallel") == 0


def test_without_redis_each_process_limits_on_its_own(make_client: Any, tmp_path: Path, prefix: str) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    client = limited(make_client, tmp_path, dead, prefix, REDIS_COOLDOWN_SECONDS="3600")
    for _ in range(3):
        assert client.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-three")).status_code == 200
    assert_error(client.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-three")), 429, "rate_limit_exceeded")
    for _ in range(2):  # the local limiter frees its own slots
        assert client.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-single")).status_code == 200
    assert client.get("/health", headers=bearer("sk-plain")).json()["redis"] == {"rate_limits": "bypassed"}


# ---------------------------------------------------------------- the sessions store


def record(
    record_id: str, ttl: float | None = 60.0, owner: str = "me", kind: Any = "session", order: int = 0
) -> Record:
    now = time.time()
    body = {"messages": [{"role": "user", "content": record_id}]}
    return Record(record_id, kind, owner, now + order / 100, None if ttl is None else now + ttl, body)


def test_redis_store_inserts_once_replaces_live_records_and_refuses_past_its_limit(
    redis_server: RedisServer, prefix: str
) -> None:
    async def scenario() -> None:
        store = RedisStore(redis_server.url, prefix, 3, timeout=10)
        assert await store.put(record("a"), new=True)
        assert not await store.put(record("a"), new=True)
        got = await store.get("a")
        assert got is not None and got.body == {"messages": [{"role": "user", "content": "a"}]} and got.owner == "me"
        assert await store.put(record("b", ttl=None), new=True)
        assert await store.put(record("c", ttl=0.3), new=True)
        with pytest.raises(StoreFull) as full:
            await store.put(record("d"), new=True)
        assert full.value.headers["Retry-After"] == "1"  # "c" expires first
        assert not await store.put(record("e"), new=False)  # replacing needs a live record
        changed = record("a")
        changed.body["turns"] = 2
        assert await store.put(changed, new=False)
        assert (await store.get("a")).body["turns"] == 2  # type: ignore[union-attr]
        await wait_for_async(lambda: time.time() > changed.created_at + 0.4, "c's expiry")
        assert await store.get("c") is None
        assert await store.put(record("d"), new=True)  # the insert purged "c" first
        assert await store.delete("a") and not await store.delete("a")
        assert await store.get("a") is None
        await store.aclose()

    asyncio.run(scenario())


def test_redis_store_pages_one_owner_oldest_first_and_purges(redis_server: RedisServer, prefix: str) -> None:
    async def scenario() -> None:
        store = RedisStore(redis_server.url, prefix, 100, timeout=10)
        expiring = record("s1", ttl=0.3, order=1)
        for i in range(5):
            await store.put(expiring if i == 1 else record(f"s{i}", order=i), new=True)
            await store.put(record(f"o{i}", owner="other", order=i), new=True)
        await store.put(record("r0", kind="response"), new=True)
        first, more = await store.page("session", "me", None, 2)
        assert [r.id for r in first] == ["s0", "s1"] and more
        await wait_for_async(lambda: time.time() > (expiring.expires_at or 0), "s1's expiry")
        rest, more = await store.page("session", "me", "s0", 10)
        assert [r.id for r in rest] == ["s2", "s3", "s4"] and not more
        assert await store.page("session", "me", "s1", 10) == ([], False)  # an expired cursor
        assert [r.id for r in (await store.page("response", "me", None, 10))[0]] == ["r0"]
        assert await store.purge() == 1 and await store.purge() == 0
        await store.aclose()

    asyncio.run(scenario())


def test_an_unreachable_or_silent_sessions_redis_is_a_503(prefix: str) -> None:
    async def scenario(url: str) -> None:
        store = RedisStore(url, prefix, 10, timeout=0.1)
        with pytest.raises(StoreUnavailable) as refused:
            await store.put(record("a"), new=True)
        assert refused.value.status == 503 and refused.value.headers["Retry-After"] == "1"
        with pytest.raises(StoreUnavailable):
            await store.get("a")
        assert store.status()["state"] == "unavailable"
        await store.aclose()

    silent = SilentServer()
    try:
        for url in (f"redis://127.0.0.1:{free_port()}/0", silent.url):
            asyncio.run(scenario(url))
    finally:
        silent.close()


# ---------------------------------------------------------------- sessions over HTTP


def sessions_replica(make_client: Any, url: str, prefix: str) -> tuple[Any, FakeRegistry]:
    registry = FakeRegistry()
    environment = {**FAKE_ENV, "SESSIONS_REDIS_URL": url, "REDIS_PREFIX": prefix, "SESSIONS_REDIS_TIMEOUT_MS": "200"}
    return make_client(environment, registry=registry), registry


def test_a_session_continues_on_another_replica(make_client: Any, redis_server: RedisServer, prefix: str) -> None:
    (first, _), (second, two) = (sessions_replica(make_client, redis_server.url, prefix) for _ in range(2))
    session = new_session(first, system="Be brief.")
    assert say(first, session, "SAY:one").status_code == 200
    assert say(second, session, "two").status_code == 200
    assert "<user>SAY:one<assistant>one<user>two" in last_prompt(two)
    assert [m["content"] for m in stored(first, session)] == ["Be brief.", "SAY:one", "one", "two", "echo: two"]
    assert [s["id"] for s in second.get("/v1/sessions").json()["data"]] == [session]
    assert second.delete(f"/v1/sessions/{session}").status_code == 200
    assert_error(first.get(f"/v1/sessions/{session}"), 404, "not_found")


def test_a_stored_response_chains_on_another_replica(make_client: Any, redis_server: RedisServer, prefix: str) -> None:
    (first, _), (second, two) = (sessions_replica(make_client, redis_server.url, prefix) for _ in range(2))
    created = first.post("/v1/responses", json={"model": "light", "input": "SAY:Hi Ann"})
    assert created.status_code == 200, created.text
    chained = second.post(
        "/v1/responses", json={"model": "light", "input": "and now?", "previous_response_id": created.json()["id"]}
    )
    assert chained.status_code == 200, chained.text
    assert "<user>SAY:Hi Ann<assistant>Hi Ann<user>and now?" in last_prompt(two)


def test_sessions_without_redis_are_a_503_and_other_requests_go_on(make_client: Any, prefix: str) -> None:
    client, _ = sessions_replica(make_client, f"redis://127.0.0.1:{free_port()}/0", prefix)
    refused = client.post("/v1/sessions", json={})
    assert_error(refused, 503, "sessions_unavailable")
    assert refused.headers["retry-after"] == "1"
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    assert client.get("/health").json()["redis"] == {"sessions": "unavailable"}


def test_a_turn_whose_commit_meets_a_dead_redis_says_so(make_client: Any, own_redis: RedisServer, prefix: str) -> None:
    client, registry = sessions_replica(make_client, own_redis.url, prefix)
    session = new_session(client)
    assert say(client, session, "warm up").status_code == 200
    model = registry.models["light"]
    model.hold_gate = threading.Event()
    answers: list[Any] = []
    turn = threading.Thread(target=lambda: answers.append(say(client, session, "lost?")))
    turn.start()
    wait_for(lambda: model.active, "the turn generating")
    own_redis.kill()
    model.hold_gate.set()
    turn.join(60)
    assert_error(answers[0], 503, "sessions_unavailable")  # the reply was not kept, and the client knows
