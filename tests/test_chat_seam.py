"""The chat-turn seam: a backend that serves whole turns (as an upstream OpenAI server does) fits
behind the same routes, cache and tool-call shaping as the local token engine."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import FAKE_ENV
from tests.fakes import FakeRegistry, FakeUpstream


@pytest.fixture
def upstream() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture
def client(make_client: Any, upstream: FakeUpstream) -> Any:
    registry = FakeRegistry()
    factories = {**registry.factories(), "turns:remote": lambda tier, settings: upstream}

    class Registry(FakeRegistry):
        def factories(self) -> dict[str, Any]:
            return factories

    env = {**FAKE_ENV, "MEDIUM_MODEL_PATH": "http://127.0.0.1:9/v1", "MEDIUM_BACKEND": "remote"}
    return make_client(env, Registry())


def chat(client: Any, content: str, **extra: Any) -> Any:
    body = {"model": "medium", "messages": [{"role": "user", "content": content}], **extra}
    return client.post("/v1/chat/completions", json=body)


def sse_events(response: Any) -> list[Any]:
    lines = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


def test_a_turn_level_backend_serves_chat_without_a_token_engine(client: Any, upstream: FakeUpstream) -> None:
    response = chat(client, "hello", max_tokens=5, temperature=0.5, user="u1")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "upstream: hello"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert response.headers["x-tier"] == "medium"
    (request,) = upstream.requests
    assert request.kind == "chat"
    assert request.messages == ({"role": "user", "content": "hello"},)
    assert request.sampling.max_tokens == 5 and request.sampling.temperature == 0.5
    assert request.wire["user"] == "u1"  # the request as sent, for an upstream that takes it as is


def test_a_turn_level_backend_streams_event_by_event(client: Any) -> None:
    response = chat(client, "SAY:abcdef", stream=True, stream_options={"include_usage": True})
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    texts = [e["choices"][0]["delta"].get("content") for e in events[1:-1] if e["choices"]]
    assert texts == ["ab", "cd", "ef", None]  # one chunk per upstream piece, then the finish chunk
    assert events[-2]["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def test_an_error_event_mid_stream_is_one_error_and_no_done(client: Any, upstream: FakeUpstream) -> None:
    events = sse_events(chat(client, "FAIL please", stream=True))
    assert "[DONE]" not in events
    assert events[-1]["error"]["code"] == "backend_error"
    assert len(upstream.cancelled) == 1  # the turn is closed when the stream ends


def test_an_error_without_streaming_is_an_error_response(client: Any) -> None:
    response = chat(client, "FAIL please")
    assert response.status_code == 500
    assert response.json()["error"]["code"] == "backend_error"


def test_the_cache_replays_the_turns_events_without_asking_the_backend(client: Any, upstream: FakeUpstream) -> None:
    first = chat(client, "SAY:cached words", temperature=0)
    assert first.headers["x-cache"] == "MISS"
    replay = chat(client, "SAY:cached words", temperature=0, stream=True)
    assert replay.headers["x-cache"] == "HIT"
    assert len(upstream.requests) == 1
    texts = [e["choices"][0]["delta"].get("content") for e in sse_events(replay)[1:-1]]
    assert "".join(t for t in texts if t) == "cached words"
    again = chat(client, "SAY:cached words", temperature=0)
    assert again.json()["choices"] == first.json()["choices"]
    assert again.json()["usage"] == first.json()["usage"]


def test_tool_calls_are_shaped_on_top_of_any_backend(client: Any) -> None:
    call = {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    response = chat(client, "SAY:" + json.dumps(call), tools=tools)
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (made,) = choice["message"]["tool_calls"]
    assert made["function"]["name"] == "get_weather"
    assert json.loads(made["function"]["arguments"]) == {"city": "Paris"}
