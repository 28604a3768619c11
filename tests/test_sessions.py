"""Sessions: the store and trimming on their own, then the whole HTTP stack over fake models.

The fake chat model renders a conversation as `<role>content...<assistant>` and echoes the last message
(or says exactly what follows "SAY:"), so what a session turn gave the model can be compared with what a
client resending the history would have given it.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from config import load_settings
from core.errors import ContextLengthExceeded
from core.turns import Message, Turn
from server import create_app
from sessions import history
from sessions.conversations import Conversations, Limits
from sessions.store import MemoryStore, Record, StoreFull
from tests.conftest import FAKE_ENV, LiveServer
from tests.fakes import FakeChat, FakeRegistry, FakeUpstream
from tests.test_api import assert_error, sse_events
from tests.waiting import DEADLINE_S, wait_for, wait_for_async


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(record_id: str, clock: Clock, ttl: float = 10.0, owner: str = "", kind: Any = "session") -> Record:
    return Record(record_id, kind, owner, clock.now, clock.now + ttl, {"messages": [{"role": "user", "content": "x"}]})


# ---------------------------------------------------------------- the store


def test_memory_store_keeps_json_copies_expires_and_refuses_past_its_limit() -> None:
    async def scenario() -> None:
        clock = Clock()
        store = MemoryStore(2, clock)
        assert await store.put(record("a", clock), new=True)
        assert not await store.put(record("a", clock), new=True)  # ids are never reused
        got = await store.get("a")
        assert got is not None
        got.body["messages"] = []  # what a reader holds is a copy
        assert (await store.get("a")).body["messages"] == [{"role": "user", "content": "x"}]  # type: ignore[union-attr]
        await store.put(record("b", clock, ttl=30), new=True)
        with pytest.raises(StoreFull) as full:
            await store.put(record("c", clock), new=True)
        assert full.value.status == 503 and full.value.headers["Retry-After"] == "11"  # when "a" expires
        clock.now += 10
        assert await store.get("a") is None
        assert not await store.put(record("a", clock), new=False)  # an expired record is not brought back
        assert await store.put(record("c", clock), new=True)  # room again
        clock.now += 100
        assert await store.purge() == 2 and len(store) == 0

    asyncio.run(scenario())


def test_memory_store_pages_one_owner_oldest_first() -> None:
    async def scenario() -> None:
        clock = Clock()
        store = MemoryStore(100, clock)
        for i in range(5):
            await store.put(record(f"s{i}", clock, owner="me"), new=True)
            await store.put(record(f"o{i}", clock, owner="other"), new=True)
        await store.put(record("r0", clock, owner="me", kind="response"), new=True)
        first, more = await store.page("session", "me", None, 2)
        assert [r.id for r in first] == ["s0", "s1"] and more
        rest, more = await store.page("session", "me", "s1", 10)
        assert [r.id for r in rest] == ["s2", "s3", "s4"] and not more

    asyncio.run(scenario())


# ---------------------------------------------------------------- trimming


def turns(n: int) -> list[Message]:
    out: list[Message] = [{"role": "system", "content": "rules"}]
    for i in range(n):
        out += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]
    return out


def test_fit_drops_oldest_turns_keeps_the_system_prompt_and_the_new_turn() -> None:
    tail: list[Message] = [{"role": "user", "content": "now"}, {"role": "assistant", "content": "answer"}]
    kept, dropped = history.fit(turns(4), tail, max_messages=7, max_bytes=10**6)
    assert kept == [turns(4)[0], *turns(4)[5:]] and dropped == 4
    kept, dropped = history.fit(turns(4), tail, max_messages=2, max_bytes=10**6)
    assert kept == [turns(4)[0]] and dropped == 8  # nothing else can go: the tail is never trimmed
    small = history.size([turns(1)[0], *turns(4)[-2:], *tail])
    kept, _ = history.fit(turns(4), tail, max_messages=100, max_bytes=small)
    assert kept == [turns(4)[0], *turns(4)[-2:]]


def test_a_tool_round_trip_is_one_turn() -> None:
    messages: list[Message] = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function"}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny"},
        {"role": "user", "content": "thanks"},
    ]
    assert history.drop_oldest_turn(messages) == 4 and messages == [{"role": "user", "content": "thanks"}]


def test_context_trimming_retries_without_the_oldest_turns() -> None:
    async def scenario() -> None:
        tried: list[int] = []

        async def begin(messages: tuple[Message, ...]) -> Turn:
            tried.append(len(messages))
            if len(messages) > 4:
                raise ContextLengthExceeded("too long")
            return Turn([], 0)

        new: list[Message] = [{"role": "user", "content": "now"}]
        _, kept, dropped = await history.start_fitting((), turns(3), new, begin, trim=True)
        assert tried == [8, 6, 4] and kept == [turns(3)[0], *turns(3)[-2:]] and dropped == 4
        with pytest.raises(ContextLengthExceeded):
            await history.start_fitting((), turns(3), new, begin, trim=False)

    asyncio.run(scenario())


def test_sessions_expire_and_a_late_reply_never_revives_a_deleted_one() -> None:
    async def scenario() -> None:
        clock = Clock()
        keeper = Conversations(MemoryStore(10, clock), Limits(60, 100, 10**6, 0), clock)
        short = await keeper.create_session("", "sys", None, {}, ttl=5)
        long = await keeper.create_session("", None, "light", {"k": "v"}, ttl=None)
        clock.now += 30
        assert [r.id for r in (await keeper.page("", "session", None, 10))[0]] == [long.id]
        with pytest.raises(Exception, match="No session"):
            await keeper.find("", "session", short.id)
        await keeper.store.delete(long.id)
        await keeper._append(long, [], [{"role": "user", "content": "late"}], 0)
        assert await keeper.store.get(long.id) is None

    asyncio.run(scenario())


def test_expired_records_are_purged_in_the_background() -> None:
    async def scenario() -> None:
        clock = Clock()
        store = MemoryStore(10, clock)
        keeper = Conversations(store, Limits(5, 100, 10**6, purge_every=0.01), clock)
        keeper.start_purging()
        await keeper.create_session("", None, None, {}, ttl=None)
        clock.now += 5
        await wait_for_async(lambda: len(store) == 0, "the purge")
        await keeper.close()

    asyncio.run(scenario())


# ---------------------------------------------------------------- over HTTP


def new_session(client: Any, **fields: Any) -> str:
    response = client.post("/v1/sessions", json=fields)
    assert response.status_code == 200, response.text
    return str(response.json()["id"])


def say(client: Any, session: str, content: str, **extra: Any) -> Any:
    body = {"model": "light", "session_id": session, "messages": [{"role": "user", "content": content}], **extra}
    return client.post("/v1/chat/completions", json=body)


def stored(client: Any, session: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/sessions/{session}/messages")
    assert response.status_code == 200, response.text
    return list(response.json()["data"])


def last_prompt(registry: FakeRegistry) -> str:
    return "".join(chr(t) for t in registry.models["light"].inserted[-1].prompt_tokens)


def test_session_routes_create_list_read_delete_also_under_the_old_prefix(client: TestClient) -> None:
    created = client.post("/v1/sessions", json={"system": "Be brief.", "model": "light", "metadata": {"user": "ann"}})
    session = created.json()
    assert session["id"].startswith("sess_") and len(session["id"]) >= 32  # 128 random bits
    assert session["system"] == "Be brief." and session["metadata"] == {"user": "ann"} and session["message_count"] == 1
    others = [new_session(client) for _ in range(2)]
    page = client.get("/v1/sessions", params={"limit": 2}).json()
    assert [s["id"] for s in page["data"]] == [session["id"], others[0]] and page["has_more"]
    rest = client.get("/api/v1/sessions", params={"after": page["last_id"]}).json()
    assert [s["id"] for s in rest["data"]] == [others[1]] and not rest["has_more"]
    assert client.get(f"/api/v1/sessions/{session['id']}").json()["model"] == "light"
    assert client.delete(f"/v1/sessions/{session['id']}").json() == {
        "id": session["id"],
        "object": "session.deleted",
        "deleted": True,
    }
    assert_error(client.get(f"/v1/sessions/{session['id']}"), 404, "not_found")
    assert_error(client.delete(f"/v1/sessions/{session['id']}"), 404, "not_found")
    assert_error(client.get("/v1/sessions", params={"after": "sess_nope"}), 400, "invalid_request")
    assert_error(client.post("/v1/sessions", json={"ttl_seconds": -1}), 400, "invalid_request")


def test_ten_turns_give_the_model_exactly_the_history_a_client_would_resend(
    client: TestClient, fake_registry: FakeRegistry
) -> None:
    session = new_session(client, system="You are terse.")
    resent: list[dict[str, Any]] = [{"role": "system", "content": "You are terse."}]
    for i in range(10):
        content = f"SAY:reply {i}" if i % 2 else f"question {i}"
        response = say(client, session, content, stream=i % 3 == 0)
        assert response.status_code == 200 and response.headers["X-Session-ID"] == session
        resent.append({"role": "user", "content": content})
        session_prompt = last_prompt(fake_registry)
        assert session_prompt == FakeChat(fake_registry.models["light"].tier).render_chat(resent)  # type: ignore[arg-type]
        resent.append({"role": "assistant", "content": f"reply {i}" if i % 2 else f"echo: {content}"})
    assert stored(client, session) == resent
    plain = client.post("/v1/chat/completions", json={"model": "light", "messages": resent[:-1]})
    assert plain.status_code == 200 and last_prompt(fake_registry) == session_prompt
    assert client.get(f"/v1/sessions/{session}").json()["turns"] == 10


def test_the_header_names_the_session_and_bad_uses_are_refused(client: TestClient) -> None:
    session = new_session(client)
    body = {"model": "light", "messages": [{"role": "user", "content": "by header"}]}
    response = client.post("/v1/chat/completions", json=body, headers={"X-Session-ID": session})
    assert response.json()["choices"][0]["message"]["content"] == "echo: by header"
    assert [m["content"] for m in stored(client, session)] == ["by header", "echo: by header"]
    assert_error(say(client, "sess_unknown", "hi"), 404, "not_found")
    assert_error(say(client, session, "hi", n=2), 400, "invalid_request")


def test_a_failed_turn_stores_nothing(client: TestClient) -> None:
    session = new_session(client)
    say(client, session, "first")
    assert say(client, session, "BOOM now").status_code == 500
    streamed = say(client, session, "BOOM again", stream=True)
    assert "error" in sse_events(streamed.text)[-1]
    assert [m["content"] for m in stored(client, session)] == ["first", "echo: first"]


def test_tool_calls_and_results_are_kept_and_shown_to_the_model_again(
    client: TestClient, fake_registry: FakeRegistry
) -> None:
    weather = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    session = new_session(client)
    call = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'
    first = say(client, session, "SAY:" + call, tools=[weather], max_tokens=200).json()["choices"][0]["message"]
    (tool_call,) = first["tool_calls"]
    result = {"role": "tool", "tool_call_id": tool_call["id"], "content": "sunny"}
    body = {"model": "light", "session_id": session, "messages": [result], "tools": [weather], "max_tokens": 200}
    assert client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] == "echo: sunny"
    assert '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}' in last_prompt(fake_registry)
    kept = stored(client, session)
    assert kept[1] == {"role": "assistant", "content": None, "tool_calls": [tool_call]}
    assert kept[2:] == [result, {"role": "assistant", "content": "echo: sunny"}]


def test_history_that_outgrows_the_context_loses_its_oldest_turns_not_the_system_prompt(make_client: Any) -> None:
    registry = FakeRegistry(context_length=200)
    client = make_client(registry=registry)
    session = new_session(client, system="KEEP")
    trimmed = []
    for i in range(6):
        response = say(client, session, f"message number {i} " + "x" * 20)
        assert response.status_code == 200, response.text
        trimmed.append(int(response.headers.get("X-Session-Trimmed", "0")))
        assert last_prompt(registry).startswith("<system>KEEP<user>")
    assert sum(trimmed) > 0 and trimmed[0] == 0
    kept = stored(client, session)
    assert kept[0] == {"role": "system", "content": "KEEP"} and kept[-1]["content"].startswith("echo: message number 5")
    assert client.get(f"/v1/sessions/{session}").json()["trimmed_messages"] == sum(trimmed)


def test_bounds_trim_old_turns_and_a_full_store_refuses_new_sessions(make_client: Any) -> None:
    client = make_client({**FAKE_ENV, "SESSIONS_MAX_MESSAGES": "5", "SESSIONS_MAX": "2"})
    session = new_session(client, system="S")
    for i in range(4):
        say(client, session, f"m{i}")
    assert [m["content"] for m in stored(client, session)] == ["S", "m2", "echo: m2", "m3", "echo: m3"]
    new_session(client)
    full = client.post("/v1/sessions", json={})
    assert_error(full, 503, "sessions_full") and full.headers["Retry-After"]
    big = [{"role": "user", "content": str(i)} for i in range(5)]
    body = {"model": "light", "session_id": session, "messages": big}
    assert_error(client.post("/v1/chat/completions", json=body), 400, "invalid_request")


def test_a_session_turn_shares_cache_entries_only_with_the_same_history(make_client: Any) -> None:
    client = make_client()
    one, two = new_session(client, system="one"), new_session(client, system="two")
    assert say(client, one, "same", temperature=0).headers["X-Cache"] == "MISS"
    assert say(client, two, "same", temperature=0).headers["X-Cache"] == "MISS"  # another history: another key
    plain = [{"role": "system", "content": "one"}, {"role": "user", "content": "same"}]
    again = client.post("/v1/chat/completions", json={"model": "light", "messages": plain, "temperature": 0})
    assert again.headers["X-Cache"] == "HIT"  # the same conversation sent whole
    assert say(client, one, "same", temperature=0).headers["X-Cache"] == "MISS"  # one has grown since
    assert [m["content"] for m in stored(client, one)][-2:] == ["same", "echo: same"]


def test_another_keys_session_is_not_found(make_client: Any) -> None:
    client = make_client({**FAKE_ENV, "API_KEYS": "key-a,key-b"})
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    session = client.post("/v1/sessions", json={}, headers=a).json()["id"]
    assert client.get(f"/v1/sessions/{session}", headers=a).status_code == 200
    assert_error(client.get(f"/v1/sessions/{session}", headers=b), 404, "not_found")
    assert_error(client.delete(f"/v1/sessions/{session}", headers=b), 404, "not_found")
    assert client.get("/v1/sessions", headers=b).json()["data"] == []
    body = {"model": "light", "session_id": session, "messages": [{"role": "user", "content": "hi"}]}
    assert_error(client.post("/v1/chat/completions", json=body, headers=b), 404, "not_found")


def test_a_remote_tier_gets_the_whole_conversation_and_one_affinity_key_per_session(make_client: Any) -> None:
    upstream = FakeUpstream()

    class Registry(FakeRegistry):
        def factories(self) -> dict[str, Any]:
            return {**super().factories(), "turns:remote": lambda tier, settings: upstream}

    client = make_client({**FAKE_ENV, "MEDIUM_MODEL_PATH": "http://127.0.0.1:9/v1"}, Registry())
    one, two = new_session(client, system="S"), new_session(client)
    for session, content in ((one, "a"), (one, "b"), (two, "c")):
        body = {"model": "medium", "session_id": session, "messages": [{"role": "user", "content": content}]}
        assert client.post("/v1/chat/completions", json=body).status_code == 200
    first, second, third = (request.wire for request in upstream.requests)
    assert [m["content"] for m in second["messages"]] == ["S", "a", "upstream: a", "b"]
    assert second["session_id"] is None  # the upstream gets a plain chat request
    assert first["user"] == second["user"] != third["user"] and one not in str(first["user"])
    body = {"model": "medium", "session_id": two, "user": "ann", "messages": [{"role": "user", "content": "d"}]}
    client.post("/v1/chat/completions", json=body)
    assert upstream.requests[-1].wire["user"] == "ann"  # the client's own affinity key wins


# ---------------------------------------------------------------- against a live server


@pytest.fixture
def live(fake_registry: FakeRegistry) -> Any:
    app = create_app(load_settings(FAKE_ENV), factories=fake_registry.factories())
    with LiveServer(app) as server:
        yield server, app.state.llm.conversations


def test_concurrent_turns_on_one_session_never_interleave(live: Any, fake_registry: FakeRegistry) -> None:
    server, keeper = live
    http = httpx.Client(base_url=server.url, timeout=DEADLINE_S)
    session = new_session(http)
    say(http, session, "warm up")  # loads the model
    model = fake_registry.models["light"]
    model.hold_gate = threading.Event()
    answers: dict[str, str] = {}

    def turn(content: str) -> None:
        answers[content] = say(http, session, content).json()["choices"][0]["message"]["content"]

    first = threading.Thread(target=turn, args=("first",))
    first.start()
    wait_for(lambda: len(model.active) == 1, "the first turn decoding")
    second = threading.Thread(target=turn, args=("second",))
    second.start()
    wait_for(lambda: keeper.busy(session) == 2, "the second turn waiting for the first")
    assert len(model.inserted) == 2  # warm-up and first: the second has not reached the model
    model.hold_gate.set()
    first.join(DEADLINE_S)
    second.join(DEADLINE_S)
    assert answers == {"first": "echo: first", "second": "echo: second"}
    assert "<user>first<assistant>echo: first<user>second" in last_prompt(fake_registry)
    assert [m["content"] for m in stored(http, session)][2:] == ["first", "echo: first", "second", "echo: second"]
    assert keeper.busy(session) == 0


def test_a_cancelled_stream_stores_nothing(live: Any, fake_registry: FakeRegistry) -> None:
    server, keeper = live
    http = httpx.Client(base_url=server.url, timeout=DEADLINE_S)
    session = new_session(http)
    say(http, session, "kept")
    model = fake_registry.models["light"]
    model.hold_gate = threading.Event()  # the reply never ends on its own: the client leaves first
    body = {"model": "light", "session_id": session, "stream": True, "messages": [{"role": "user", "content": "gone"}]}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        assert json.loads(next(line for line in lines if line.startswith("data: "))[6:])["choices"]
    wait_for(lambda: len(model.removed) == 2 and keeper.busy(session) == 0, "the stream's turn ending")
    model.hold_gate.set()
    assert [m["content"] for m in stored(http, session)] == ["kept", "echo: kept"]
    assert say(http, session, "after").json()["choices"][0]["message"]["content"] == "echo: after"
