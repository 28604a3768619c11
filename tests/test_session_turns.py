"""One turn at a time per session: in one process, across two replicas sharing a real `redis-server`,
and what a turn that cannot wait, or whose client leaves, gets. Also the CORS headers sessions need.

Replicas are two apps over fakes on real uvicorns (disconnects are real), sharing one Redis; the
fake chat model renders a conversation as `<role>content...<assistant>`, so the prompt each turn
was given can be compared with the history the session stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from config import load_settings
from remote.chat import load_remote_chat
from scale.redis_locks import RedisLocks
from scale.redis_store import RedisStore, StoreUnavailable
from server import create_app
from sessions.conversations import Conversations
from sessions.locks import LocalLocks, SessionBusy
from tests.conftest import FAKE_ENV, LiveServer
from tests.fakes import FakeChat, FakeRegistry
from tests.redis_server import RedisServer, SilentServer
from tests.test_api import assert_error
from tests.test_sessions import new_session, say, stored
from tests.upstreams import StandIn, build
from tests.waiting import DEADLINE_S, wait_for, wait_for_async


@dataclass
class Replica:
    server: LiveServer
    registry: FakeRegistry
    keeper: Conversations
    http: httpx.Client

    @property
    def model(self) -> FakeChat:
        return self.registry.models["light"]  # type: ignore[no-any-return]


@pytest.fixture
def start() -> Iterator[Any]:
    """Start a replica (an app over fakes on a live server) for an environment added to FAKE_ENV."""
    with contextlib.ExitStack() as stack:

        def replica(**env: str) -> Replica:
            registry = FakeRegistry()
            app = create_app(load_settings({**FAKE_ENV, **env}), factories=registry.factories())
            server = stack.enter_context(LiveServer(app))
            http = stack.enter_context(httpx.Client(base_url=server.url, timeout=DEADLINE_S))
            return Replica(server, registry, app.state.llm.conversations, http)

        yield replica


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-turns"))
    yield server
    server.kill()


@pytest.fixture
def prefix() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


def held(replica: Replica, session: str, content: str, answers: dict[str, Any], **extra: Any) -> threading.Thread:
    """A turn sent from a thread; its response lands in `answers[content]`."""

    def turn() -> None:
        answers[content] = say(replica.http, session, content, **extra)

    thread = threading.Thread(target=turn)
    thread.start()
    return thread


def render(messages: list[dict[str, Any]]) -> str:
    return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


def prompts(*replicas: Replica) -> list[str]:
    return ["".join(chr(t) for t in job.prompt_tokens) for r in replicas for job in r.model.inserted]


def assert_one_turn_at_a_time(history: list[dict[str, Any]], seen: list[str]) -> None:
    """Strictly user/assistant alternating, each reply answering its own question, and each turn's
    prompt exactly the history before it: no turn started before the previous one was stored."""
    assert [m["role"] for m in history] == ["user", "assistant"] * (len(history) // 2)
    for i in range(0, len(history), 2):
        assert history[i + 1]["content"] == f"echo: {history[i]['content']}"
        assert seen.count(render(history[: i + 1])) == 1, f"turn {i // 2} saw another history"


# ---------------------------------------------------------------- one process


def test_a_turn_that_cannot_wait_is_a_409_and_stores_nothing(start: Any) -> None:
    one = start(SESSIONS_TURN_WAIT_SECONDS="0.2")
    session = new_session(one.http)
    say(one.http, session, "warm up")
    one.model.hold_gate = threading.Event()
    answers: dict[str, Any] = {}
    first = held(one, session, "first", answers)
    wait_for(lambda: one.model.active, "the first turn decoding")
    refused = say(one.http, session, "second")
    error = assert_error(refused, 409, "session_busy")
    assert error["param"] == "session_id" and refused.headers["retry-after"] == "1"
    one.model.hold_gate.set()
    first.join(DEADLINE_S)
    assert answers["first"].status_code == 200
    assert [m["content"] for m in stored(one.http, session)] == ["warm up", "echo: warm up", "first", "echo: first"]


def test_a_turn_whose_client_leaves_while_it_waits_gives_up_its_place(start: Any) -> None:
    one = start()
    session = new_session(one.http)
    say(one.http, session, "warm up")
    one.model.hold_gate = threading.Event()
    answers: dict[str, Any] = {}
    first = held(one, session, "first", answers)
    wait_for(lambda: one.model.active, "the first turn decoding")
    body = json.dumps({"model": "light", "session_id": session, "messages": [{"role": "user", "content": "gone"}]})
    head = "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    with socket.create_connection(("127.0.0.1", one.server.port)) as raw:
        raw.sendall(f"{head}Content-Length: {len(body)}\r\n\r\n{body}".encode())
        wait_for(lambda: one.keeper.busy(session) == 2, "the second turn waiting")
    wait_for(lambda: one.keeper.busy(session) == 1, "the departed client's turn giving up its wait")
    one.model.hold_gate.set()
    first.join(DEADLINE_S)
    assert say(one.http, session, "third").status_code == 200
    assert [m["content"] for m in stored(one.http, session)][2:] == ["first", "echo: first", "third", "echo: third"]
    assert "gone" not in "".join(prompts(one))


def test_local_locks_hand_over_in_order_and_forget_idle_sessions() -> None:
    async def scenario() -> None:
        locks = LocalLocks()
        first = await locks.acquire("s", 1)
        with pytest.raises(SessionBusy):
            await locks.acquire("s", 0)
        waiting = asyncio.ensure_future(locks.acquire("s", DEADLINE_S))
        await wait_for_async(lambda: locks.users("s") == 2, "the second waiting")
        await first.release()
        await first.release()  # twice is harmless
        second = await waiting
        await second.confirm()
        await second.release()
        assert locks.users("s") == 0

    asyncio.run(scenario())


# ---------------------------------------------------------------- two replicas, one Redis


def replicas(start: Any, redis: RedisServer, prefix: str, **env: str) -> tuple[Replica, Replica]:
    shared = {"SESSIONS_REDIS_URL": redis.url, "REDIS_PREFIX": prefix, **env}
    return start(**shared), start(**shared)


def lock_key(prefix: str, session: str) -> str:
    return f"{prefix}:records:lock:{session}"


def test_a_turn_on_one_replica_waits_for_the_turn_on_the_other(
    start: Any, redis_server: RedisServer, prefix: str
) -> None:
    a, b = replicas(start, redis_server, prefix)
    session = new_session(a.http)
    for replica in (a, b):
        say(replica.http, session, f"warm {id(replica)}")  # loads both models
    a.model.hold_gate = threading.Event()
    answers: dict[str, Any] = {}
    first = held(a, session, "first", answers)
    wait_for(lambda: a.model.active, "the first turn decoding on replica a")
    assert redis_server.client().exists(lock_key(prefix, session))
    second = held(b, session, "second", answers)
    wait_for(lambda: b.keeper.busy(session) == 1, "the second turn waiting on replica b")
    inserted = len(b.model.inserted)
    a.model.hold_gate.set()
    first.join(DEADLINE_S)
    second.join(DEADLINE_S)
    assert [answers[k].status_code for k in ("first", "second")] == [200, 200]
    assert len(b.model.inserted) == inserted + 1
    history = stored(b.http, session)
    assert [m["content"] for m in history][4:] == ["first", "echo: first", "second", "echo: second"]
    assert "<user>first<assistant>echo: first<user>second<assistant>" in prompts(b)[-1]
    assert_one_turn_at_a_time(history, prompts(a, b))
    assert not redis_server.client().exists(lock_key(prefix, session))


def test_many_concurrent_turns_through_both_replicas_never_interleave(
    start: Any, redis_server: RedisServer, prefix: str
) -> None:
    a, b = replicas(start, redis_server, prefix)
    session = new_session(a.http)
    answers: dict[str, Any] = {}
    threads = [held((a, b)[i % 2], session, f"turn {i}", answers) for i in range(8)]
    for thread in threads:
        thread.join(DEADLINE_S)
    assert sorted(r.status_code for r in answers.values()) == [200] * 8
    history = stored(a.http, session)
    assert sorted(m["content"] for m in history[::2]) == [f"turn {i}" for i in range(8)]
    assert_one_turn_at_a_time(history, prompts(a, b))
    assert a.http.get(f"/v1/sessions/{session}").json()["turns"] == 8


def test_a_replica_that_cannot_wait_answers_409_session_busy(
    start: Any, redis_server: RedisServer, prefix: str
) -> None:
    a, b = replicas(start, redis_server, prefix, SESSIONS_TURN_WAIT_SECONDS="0")
    session = new_session(a.http)
    say(a.http, session, "warm up")
    a.model.hold_gate = threading.Event()
    answers: dict[str, Any] = {}
    first = held(a, session, "first", answers)
    wait_for(lambda: a.model.active, "the first turn decoding on replica a")
    refused = say(b.http, session, "second")
    assert_error(refused, 409, "session_busy")
    assert refused.headers["retry-after"] == "1" and b.keeper.busy(session) == 0
    a.model.hold_gate.set()
    first.join(DEADLINE_S)
    assert say(b.http, session, "third").status_code == 200  # the lock went with the first turn
    assert [m["content"] for m in stored(b.http, session)][2:] == ["first", "echo: first", "third", "echo: third"]


def test_a_stream_whose_client_leaves_releases_the_session_on_every_replica(
    start: Any, redis_server: RedisServer, prefix: str
) -> None:
    a, b = replicas(start, redis_server, prefix, SESSIONS_TURN_WAIT_SECONDS="0")
    session = new_session(a.http)
    say(a.http, session, "kept")
    a.model.hold_gate = threading.Event()  # the reply never ends on its own: the client leaves first
    body = {"model": "light", "session_id": session, "stream": True, "messages": [{"role": "user", "content": "gone"}]}
    with a.http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        assert json.loads(next(line for line in lines if line.startswith("data: "))[6:])["choices"]
        assert redis_server.client().exists(lock_key(prefix, session))
    wait_for(lambda: not redis_server.client().exists(lock_key(prefix, session)), "the lock released in Redis")
    wait_for(lambda: a.keeper.busy(session) == 0, "the turn closed on replica a")
    a.model.hold_gate.set()
    assert say(b.http, session, "after").status_code == 200
    assert [m["content"] for m in stored(b.http, session)] == ["kept", "echo: kept", "after", "echo: after"]


# ---------------------------------------------------------------- the Redis lock on its own


def test_a_long_turn_keeps_its_lock_and_a_lapsed_one_stores_nothing(redis_server: RedisServer, prefix: str) -> None:
    async def scenario() -> None:
        store = RedisStore(redis_server.url, prefix, 10, timeout=10)
        locks = RedisLocks(store, ttl=0.3)
        hold = await locks.acquire("s", 0)
        began = time.monotonic()
        await wait_for_async(lambda: time.monotonic() > began + 1.0, "three lock lifetimes")
        with pytest.raises(SessionBusy):  # renewed all along: still held
            await RedisLocks(store, ttl=0.3).acquire("s", 0)
        await hold.confirm()
        await hold.release()
        other = await RedisLocks(store, ttl=0.3).acquire("s", 0)  # another replica may take it now
        redis_server.client().delete(lock_key(prefix, "s"))  # as if it expired while Redis was away
        taken = await locks.acquire("s", 0)  # and someone else took it
        with pytest.raises(StoreUnavailable) as lapsed:
            await other.confirm()
        assert lapsed.value.status == 503 and lapsed.value.code == "sessions_unavailable"
        await other.release()  # never raises, and leaves the new owner's lock alone
        assert redis_server.client().exists(lock_key(prefix, "s"))
        await taken.release()
        assert not redis_server.client().exists(lock_key(prefix, "s"))
        await store.aclose()

    asyncio.run(scenario())


def test_a_cancelled_wait_leaves_nothing_behind(redis_server: RedisServer, prefix: str) -> None:
    async def scenario() -> None:
        store = RedisStore(redis_server.url, prefix, 10, timeout=10)
        first, second = RedisLocks(store), RedisLocks(store)
        hold = await first.acquire("s", 0)
        waiting = asyncio.ensure_future(second.acquire("s", DEADLINE_S))
        await wait_for_async(lambda: second.users("s") == 1, "the second replica waiting")
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert second.users("s") == 0
        await hold.release()
        assert not redis_server.client().exists(lock_key(prefix, "s"))
        await store.aclose()

    asyncio.run(scenario())


def test_locking_without_redis_is_a_503(prefix: str) -> None:
    async def scenario(url: str) -> None:
        store = RedisStore(url, prefix, 10, timeout=0.1)
        locks = RedisLocks(store)
        with pytest.raises(StoreUnavailable) as refused:
            await locks.acquire("s", 5)
        assert refused.value.status == 503 and refused.value.headers["Retry-After"] == "1"
        assert locks.users("s") == 0
        await store.aclose()

    silent = SilentServer()
    try:
        asyncio.run(scenario(silent.url))
    finally:
        silent.close()


# ---------------------------------------------------------------- CORS


def test_browsers_may_send_the_session_header_and_read_the_session_and_limit_headers(make_client: Any) -> None:
    origin = "http://localhost:3000"
    client = make_client({**FAKE_ENV, "CORS_ORIGINS": origin})
    preflight = client.options(
        "/v1/chat/completions",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type,x-session-id",
        },
    )
    assert preflight.status_code == 200, preflight.text
    allowed = {h.strip().lower() for h in preflight.headers["access-control-allow-headers"].split(",")}
    assert {"content-type", "x-session-id"} <= allowed
    session = new_session(client)
    chat = {"model": "light", "messages": [{"role": "user", "content": "hi"}]}
    response = client.post("/v1/chat/completions", json=chat, headers={"Origin": origin, "X-Session-ID": session})
    assert response.status_code == 200 and response.headers["x-session-id"] == session
    assert response.headers["access-control-allow-origin"] == origin
    exposed = {h.strip().lower() for h in response.headers["access-control-expose-headers"].split(",")}
    assert {"x-session-id", "x-session-trimmed", "retry-after", "x-ratelimit-remaining-requests"} <= exposed
    assert {f"x-ratelimit-{w}-{k}" for w in ("limit", "remaining", "reset") for k in ("requests", "tokens")} <= exposed


# ---------------------------------------------------------------- remote tiers


class RemoteRegistry(FakeRegistry):
    def factories(self) -> dict[str, Any]:
        return {**super().factories(), "turns:remote": load_remote_chat}


@pytest.mark.parametrize("style", ["openai", "llama-server"])
def test_a_session_on_a_remote_tier_trims_when_the_upstream_says_its_context_is_full(
    make_client: Any, style: str
) -> None:
    stand_in = StandIn("up", context_chars=45, context_style=style)
    with LiveServer(build(stand_in)) as upstream:
        env = {**FAKE_ENV, "MEDIUM_MODEL_PATH": "", "MEDIUM_UPSTREAMS": f"{upstream.url}/v1"}
        client = make_client({**env, "MEDIUM_UPSTREAM_MODEL": "upstream-model"}, RemoteRegistry())
        session = new_session(client, system="Be brief.")
        sent = []
        for n in range(4):
            body = {"model": "medium", "session_id": session, "messages": [{"role": "user", "content": f"SAY:{n}" * 2}]}
            sent.append(client.post("/v1/chat/completions", json=body))
        assert [r.status_code for r in sent] == [200] * 4
        assert [r.headers.get("x-session-trimmed") for r in sent] == [None, None, "2", "2"]  # a question and its reply
        kept = stored(client, session)
        assert kept[0] == {"role": "system", "content": "Be brief."}
        assert [m["content"] for m in kept[1:]] == ["SAY:2SAY:2", "2SAY:2", "SAY:3SAY:3", "3SAY:3"]
        assert client.get(f"/v1/sessions/{session}").json()["trimmed_messages"] == 4
        plain = {"model": "medium", "messages": [{"role": "user", "content": "x" * 46}]}
        error = assert_error(client.post("/v1/chat/completions", json=plain), 400, "context_length_exceeded")
        assert "context holds 45" in error["message"]  # a plain request gets the upstream's refusal
