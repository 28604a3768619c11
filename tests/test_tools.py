"""Tools and structured output through the HTTP API over fakes (the parsing and wire shapes)."""

from __future__ import annotations

import json
from typing import Any

from fastapi.testclient import TestClient

from tests.fakes import FakeRegistry
from tests.test_api import assert_error, sse_events

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'


def ask(client: TestClient, content: str, **extra: Any) -> Any:
    body = {
        "model": "light",
        "messages": [{"role": "user", "content": content}],
        "tools": [WEATHER],
        "max_tokens": 200,
        **extra,
    }
    return client.post("/v1/chat/completions", json=body)


def test_tool_call_is_parsed_into_tool_calls(client: TestClient) -> None:
    data = ask(client, "SAY:" + CALL).json()
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}


def test_hermes_style_tagged_call_is_understood(client: TestClient) -> None:
    tagged = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>'
    call = ask(client, "SAY:" + tagged).json()["choices"][0]["message"]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"city": "Oslo"}


def test_plain_answer_stays_text_in_auto_mode(client: TestClient) -> None:
    choice = ask(client, "hello").json()["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "echo: hello"}
    assert choice["finish_reason"] == "stop"


def test_unknown_function_name_is_not_a_call(client: TestClient) -> None:
    text = '{"tool_calls": [{"name": "rm_rf", "arguments": {}}]}'
    choice = ask(client, "SAY:" + text).json()["choices"][0]
    assert choice["message"]["content"] == text and choice["finish_reason"] == "stop"


def test_tools_are_described_in_the_prompt(client: TestClient, fake_registry: FakeRegistry) -> None:
    ask(client, "hello")
    prompt = "".join(chr(t) for t in fake_registry.models["light"].inserted[-1].prompt_tokens)
    assert prompt.startswith("<system>You can call these functions:")
    assert '"get_weather"' in prompt and "tool_calls" in prompt
    assert fake_registry.models["light"].inserted[-1].params.json_schema is None  # auto: nothing forced


def test_forced_call_sends_a_schema_to_the_decoder(client: TestClient, fake_registry: FakeRegistry) -> None:
    ask(client, "SAY:" + CALL, tool_choice={"type": "function", "function": {"name": "get_weather"}})
    schema = json.loads(fake_registry.models["light"].inserted[-1].params.json_schema)
    item = schema["properties"]["tool_calls"]["items"]
    assert item["properties"]["name"] == {"const": "get_weather"}
    assert item["properties"]["arguments"]["required"] == ["city"]
    assert schema["properties"]["tool_calls"]["maxItems"] == 1


def test_streamed_tool_call_deltas(client: TestClient) -> None:
    events = sse_events(ask(client, "SAY:" + CALL, stream=True).text)
    chunks = events[:-1]
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": ""}
    head = deltas[1]["tool_calls"][0]
    assert head["index"] == 0 and head["id"].startswith("call_") and head["type"] == "function"
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    assert json.loads(deltas[2]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert not any("content" in d and d["content"] for d in deltas)


def test_streamed_plain_answer_with_tools_still_streams_text(client: TestClient) -> None:
    chunks = sse_events(ask(client, "hi there", stream=True).text)[:-1]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "echo: hi there"
    assert len([c for c in chunks if c["choices"][0]["delta"].get("content")]) > 1  # not one buffered blob


def test_earlier_tool_calls_and_results_reach_the_prompt(client: TestClient, fake_registry: FakeRegistry) -> None:
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    response = client.post("/v1/chat/completions", json={"model": "light", "messages": messages, "tools": [WEATHER]})
    assert response.status_code == 200
    prompt = "".join(chr(t) for t in fake_registry.models["light"].inserted[-1].prompt_tokens)
    assert '<assistant>{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Rome"}}]}' in prompt
    assert "<tool>sunny" in prompt


def test_response_format_schema_reaches_the_decoder(client: TestClient, fake_registry: FakeRegistry) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    body = {"model": "light", "messages": [{"role": "user", "content": 'SAY:{"a": 1}'}]}
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    data = client.post("/v1/chat/completions", json={**body, "response_format": response_format}).json()
    assert json.loads(data["choices"][0]["message"]["content"]) == {"a": 1}
    assert json.loads(fake_registry.models["light"].inserted[-1].params.json_schema) == schema
    client.post("/v1/chat/completions", json={**body, "response_format": {"type": "json_object"}})
    assert json.loads(fake_registry.models["light"].inserted[-1].params.json_schema) == {"type": "object"}


def test_bad_schemas_and_choices_are_400(client: TestClient) -> None:
    body = {"model": "light", "messages": [{"role": "user", "content": "x"}]}
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}
    error = assert_error(
        client.post("/v1/chat/completions", json={**body, "response_format": bad}), 400, "invalid_request"
    )
    assert error["param"] == "response_format.json_schema.schema"
    missing = {"type": "json_schema", "json_schema": {"name": "x"}}
    assert_error(client.post("/v1/chat/completions", json={**body, "response_format": missing}), 400, "invalid_request")
    error = assert_error(
        ask(client, "x", tool_choice={"type": "function", "function": {"name": "nope"}}), 400, "invalid_request"
    )
    assert error["param"] == "tool_choice"
    bad_tool = {"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}
    response = client.post("/v1/chat/completions", json={**body, "tools": [bad_tool]})
    assert_error(response, 400, "invalid_request")
