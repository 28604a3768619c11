"""The Responses API over fake models: the real OpenAI SDK and LangChain against a live server, and
plain HTTP for the wire shapes and errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from config import load_settings
from server import create_app
from tests.conftest import FAKE_ENV, LiveServer
from tests.fakes import FakeRegistry
from tests.test_api import assert_error
from tests.waiting import DEADLINE_S

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}
CALL = 'SAY:{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'


@pytest.fixture
def live(fake_registry: FakeRegistry) -> Iterator[LiveServer]:
    app = create_app(load_settings(FAKE_ENV), factories=fake_registry.factories())
    with LiveServer(app) as server:
        yield server


@pytest.fixture
def sdk(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=DEADLINE_S)


def last_prompt(registry: FakeRegistry) -> str:
    return "".join(chr(t) for t in registry.models["light"].inserted[-1].prompt_tokens)


def sse(text: str) -> list[dict[str, Any]]:
    """A Responses stream: `event: <type>` then `data: {...}` whose type matches, blank line between."""
    events = []
    for block in text.strip().split("\n\n"):
        head, data = block.split("\n")
        event = json.loads(data.removeprefix("data: "))
        assert head == f"event: {event['type']}"
        events.append(event)
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    return events


# ---------------------------------------------------------------- the OpenAI SDK


def test_sdk_create_retrieve_input_items_and_delete(sdk: openai.OpenAI, fake_registry: FakeRegistry) -> None:
    response = sdk.responses.create(model="light", input="SAY:Hello there", instructions="Be kind.")
    assert response.status == "completed" and response.output_text == "Hello there"
    assert response.id.startswith("resp_") and response.usage is not None and response.usage.output_tokens == 11
    assert last_prompt(fake_registry) == "<system>Be kind.<user>SAY:Hello there<assistant>"
    again = sdk.responses.retrieve(response.id)
    assert again.output_text == "Hello there" and again.instructions == "Be kind."
    (item,) = sdk.responses.input_items.list(response.id).data
    assert item.type == "message" and item.role == "user" and item.content[0].text == "SAY:Hello there"  # type: ignore[union-attr]
    sdk.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(response.id)


def test_sdk_stream_events_and_the_stream_helper(sdk: openai.OpenAI) -> None:
    events = list(sdk.responses.create(model="light", input="SAY:streamed text", stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "streamed text"
    assert events[-1].response.output_text == "streamed text"  # type: ignore[union-attr]
    with sdk.responses.stream(model="light", input="SAY:with the helper") as stream:
        snapshots = [e.snapshot for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert snapshots[-1] == "with the helper" and final.output_text == "with the helper"
    assert sdk.responses.retrieve(final.id).output_text == "with the helper"


def test_sdk_chains_with_previous_response_id(sdk: openai.OpenAI, fake_registry: FakeRegistry) -> None:
    first = sdk.responses.create(model="light", input="My name is Ann.", instructions="Only for the first.")
    second = sdk.responses.create(model="light", input="SAY:Hi Ann", previous_response_id=first.id, stream=True)
    final = [e for e in second if e.type == "response.completed"][0].response
    assert final.previous_response_id == first.id
    # Instructions are not carried over; the first input and its answer are.
    assert (
        last_prompt(fake_registry) == "<user>My name is Ann.<assistant>echo: My name is Ann.<user>SAY:Hi Ann<assistant>"
    )
    third = sdk.responses.create(model="light", input="And now?", previous_response_id=final.id)
    assert third.output_text == "echo: And now?"
    assert "<assistant>Hi Ann<user>And now?" in last_prompt(fake_registry)
    sdk.responses.delete(first.id)  # every stored response keeps its whole conversation
    sdk.responses.create(model="light", input="still?", previous_response_id=third.id)
    assert last_prompt(fake_registry).startswith("<user>My name is Ann.")


def test_sdk_function_tool_round_trip(sdk: openai.OpenAI, fake_registry: FakeRegistry) -> None:
    asked = sdk.responses.create(model="light", input=CALL, tools=[WEATHER], max_output_tokens=200)  # type: ignore[list-item]
    (call,) = asked.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Paris"}
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}
    answered = sdk.responses.create(
        model="light",
        input=[output],
        previous_response_id=asked.id,
        tools=[WEATHER],
        max_output_tokens=200,  # type: ignore[list-item]
    )
    assert answered.output_text == "echo: sunny, 21 C"
    prompt = last_prompt(fake_registry)
    assert '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}<tool>sunny, 21 C' in prompt
    streamed = list(
        sdk.responses.create(model="light", input=CALL, tools=[WEATHER], max_output_tokens=200, stream=True)
    )  # type: ignore[list-item]
    kinds = [e.type for e in streamed]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    assert streamed[-1].response.output[0].type == "function_call"  # type: ignore[union-attr]


def test_sdk_text_format_json_schema(sdk: openai.OpenAI, fake_registry: FakeRegistry) -> None:
    class City(BaseModel):
        name: str
        population: int

    parsed = sdk.responses.parse(
        model="light", input='SAY:{"name": "Oslo", "population": 700000}', text_format=City, max_output_tokens=200
    )
    assert parsed.output_parsed == City(name="Oslo", population=700000)
    schema = json.loads(fake_registry.models["light"].inserted[-1].params.json_schema)
    assert schema["properties"]["population"] == {"title": "Population", "type": "integer"}


def test_langchain_chat_model_over_the_responses_api(live: LiveServer) -> None:
    chat_openai = pytest.importorskip("langchain_openai").ChatOpenAI
    model = chat_openai(
        model="light", base_url=live.url + "/v1", api_key="x", use_responses_api=True, max_retries=0, timeout=DEADLINE_S
    )
    assert model.invoke("SAY:from langchain").text == "from langchain"
    streamed = "".join(chunk.text for chunk in model.stream("SAY:streamed by langchain"))
    assert streamed == "streamed by langchain"


# ---------------------------------------------------------------- wire shapes and errors


def create(client: Any, **body: Any) -> Any:
    return client.post("/v1/responses", json={"model": "light", **body})


def test_items_input_roles_and_store_false(client: TestClient, fake_registry: FakeRegistry) -> None:
    items = [
        {"role": "developer", "content": "Rules."},
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "part one "}, {"type": "input_text", "text": "two"}],
        },
        {"role": "assistant", "content": [{"type": "output_text", "text": "ok"}]},
        {"role": "user", "content": "last"},
    ]
    response = create(client, input=items, store=False).json()
    assert response["store"] is False and response["output"][0]["content"][0]["text"] == "echo: last"
    assert last_prompt(fake_registry) == "<developer>Rules.<user>part one two<assistant>ok<user>last<assistant>"
    assert_error(client.get(f"/v1/responses/{response['id']}"), 404, "not_found")
    assert_error(create(client, input="x", previous_response_id=response["id"]), 404, "not_found")


def test_max_output_tokens_makes_an_incomplete_response(client: TestClient) -> None:
    response = create(client, input="a rather long question", max_output_tokens=3).json()
    assert response["status"] == "incomplete" and response["incomplete_details"] == {"reason": "max_output_tokens"}
    assert response["output"][0]["content"][0]["text"] == "ech"
    events = sse(create(client, input="a rather long question", max_output_tokens=3, stream=True).text)
    assert events[-1]["type"] == "response.incomplete" and events[-1]["response"]["status"] == "incomplete"


def test_an_error_mid_stream_is_one_failed_event_and_nothing_is_stored(client: TestClient) -> None:
    events = sse(create(client, input="BOOM", stream=True).text)
    assert events[-1]["type"] == "response.failed" and events[-1]["response"]["error"]["code"] == "backend_error"
    assert [e["type"] for e in events].count("response.failed") == 1
    assert_error(client.get(f"/v1/responses/{events[0]['response']['id']}"), 404, "not_found")
    assert_error(create(client, input="BOOM"), 500, "backend_error")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input.0.content.0"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input.0.type"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input.0"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0"),
        ({"input": "x", "tool_choice": {"type": "file_search"}}, "tool_choice"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"input": []}, "input"),
        ({"input": "x", "previous_response_id": "resp_" + "0" * 32}, "previous_response_id"),
    ],
)
def test_unsupported_or_bad_input_is_refused_naming_the_parameter(client: TestClient, body: Any, param: str) -> None:
    response = create(client, **body)
    assert response.status_code in (400, 404), response.text
    assert response.json()["error"]["param"] == param


def test_truncation_auto_drops_the_oldest_turns_that_do_not_fit(make_client: Any) -> None:
    registry = FakeRegistry(context_length=200)  # characters: two turns of these and a question fit, three do not
    client = make_client(registry=registry)
    previous = None
    for i in range(4):
        response = create(client, input=f"turn {i} " + "y" * 20, previous_response_id=previous, truncation="auto")
        assert response.status_code == 200, response.text
        previous = response.json()["id"]
    assert last_prompt(registry).startswith("<user>turn 1 ") and "<user>turn 3 " in last_prompt(registry)
    refused = create(client, input="z" * 30, previous_response_id=previous)  # truncation disabled: a 400
    assert_error(refused, 400, "context_length_exceeded")


def test_another_keys_response_is_not_found(make_client: Any) -> None:
    client = make_client({**FAKE_ENV, "API_KEYS": "key-a,key-b"})
    a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
    made = client.post("/v1/responses", json={"model": "light", "input": "hi"}, headers=a).json()
    assert client.get(f"/v1/responses/{made['id']}", headers=a).status_code == 200
    assert_error(client.get(f"/v1/responses/{made['id']}", headers=b), 404, "not_found")
    chained = {"model": "light", "input": "x", "previous_response_id": made["id"]}
    assert_error(client.post("/v1/responses", json=chained, headers=b), 404, "not_found")


def test_input_items_pages_newest_first_by_default(client: TestClient) -> None:
    items = [{"role": "user", "content": f"m{i}", "id": f"msg_{i}"} for i in range(3)]
    made = create(client, input=items).json()
    listing = client.get(f"/v1/responses/{made['id']}/input_items", params={"limit": 2}).json()
    assert [i["id"] for i in listing["data"]] == ["msg_2", "msg_1"] and listing["has_more"]
    rest = client.get(f"/v1/responses/{made['id']}/input_items", params={"after": "msg_1"}).json()
    assert [i["id"] for i in rest["data"]] == ["msg_0"] and not rest["has_more"]
    ascending = client.get(f"/v1/responses/{made['id']}/input_items", params={"order": "asc"}).json()
    assert [i["id"] for i in ascending["data"]] == ["msg_0", "msg_1", "msg_2"]
