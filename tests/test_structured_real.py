"""Constrained decoding on the packaged Gemma GGUF: every output parses and validates.

Each budget is one the schema guarantees (tests/budgets.py), so a reply closes whatever words this
CPU's kernels pick; only the unbounded json_object mode may run out, and then says so.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import jsonschema
import pytest

from tests.budgets import schema_budget
from tests.conftest import LiveServer

pytestmark = pytest.mark.real

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 2},
        "member": {"type": "boolean"},
    },
    "required": ["name", "age", "hobbies", "member"],
    "additionalProperties": False,
}
PERSON_BUDGET = schema_budget({"name": "", "age": 120, "hobbies": ["", ""], "member": False}, 12 + 2 * 10)
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER_BUDGET = schema_budget(
    {"tool_calls": [{"name": "get_weather", "arguments": {"city": "", "unit": "fahrenheit"}}]}, 20
)


def chat(server: LiveServer, body: dict[str, Any]) -> dict[str, Any]:
    response = httpx.post(server.url + "/v1/chat/completions", json={"model": "light", **body}, timeout=300)
    assert response.status_code == 200, response.text
    return response.json()


def test_twenty_samples_at_temperature_one_all_validate(real_server: LiveServer) -> None:
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}

    async def sample_all() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=real_server.url, timeout=600) as client:
            bodies = [
                {
                    "model": "light",
                    "messages": [{"role": "user", "content": "Invent a person."}],
                    "response_format": response_format,
                    "temperature": 1.0,
                    "seed": seed,
                    "max_tokens": PERSON_BUDGET,
                }
                for seed in range(20)
            ]
            slots = asyncio.Semaphore(4)  # the tier's parallel sequences: nobody waits in the queue

            async def post(body: dict[str, Any]) -> dict[str, Any]:
                async with slots:
                    return (await client.post("/v1/chat/completions", json=body)).json()

            return await asyncio.gather(*(post(b) for b in bodies))

    results = asyncio.run(sample_all())
    for data in results:
        assert "choices" in data, data
        choice = data["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), PERSON)


def test_running_out_of_tokens_inside_the_object_is_length(real_server: LiveServer) -> None:
    # The shortest object PERSON allows takes some 20 Gemma tokens (its JSON tokens hold at most 6
    # bytes, its keys are words of their own): 6 tokens can never close it, whatever the model picks.
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    data = chat(
        real_server,
        {"messages": [{"role": "user", "content": "A person."}], "response_format": response_format, "max_tokens": 6},
    )
    choice = data["choices"][0]
    assert choice["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 6
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice["message"]["content"])


def test_json_object_mode_always_parses(real_server: LiveServer) -> None:
    data = chat(
        real_server,
        {
            "messages": [{"role": "user", "content": "Give me JSON."}],
            "response_format": {"type": "json_object"},
            "max_tokens": 60,
            "temperature": 0,
        },
    )
    choice = data["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    else:
        assert choice["message"]["content"].lstrip().startswith("{")


def test_named_tool_choice_forces_a_valid_call(real_server: LiveServer) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    data = chat(
        real_server,
        {
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "tools": tools,
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "max_tokens": WEATHER_BUDGET,
        },
    )
    choice = data["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER)
