"""Bad input is a 400 at validation, before it reaches a tokenizer, the cache key digest or a schema check.

Over fakes that record what they were asked: every case asserts the 400 envelope naming the parameter,
that no model saw the request, and that nothing was logged with a stack trace.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.schemas import MAX_JSON_DEPTH
from chat.structured_output import MAX_SCHEMA_DEPTH, MAX_SCHEMA_NODES
from config import Settings, TierConfig
from tests.conftest import FAKE_ENV
from tests.fakes import FakeEmbedder, FakeRegistry, FakeReranker

ENV = {
    **FAKE_ENV,
    "EMBEDDING_MODEL_PATH": "/models/fake-embedder",
    "RERANKER_BACKEND": "similarity",
    "ENABLE_CACHE": "true",
}
LONE = "\ud800"  # a lone high surrogate: JSON's "\ud800" escape decodes to it


class Registry(FakeRegistry):
    """Chat fakes plus an embedder and a reranker that record every batch."""

    def __init__(self) -> None:
        super().__init__(context_length=200_000)  # room for the biggest schema within bounds in the prompt
        self.embedder = FakeEmbedder()
        self.reranker = FakeReranker()

    def factories(self) -> dict[str, Any]:
        def embedder(tier: TierConfig, settings: Settings) -> FakeEmbedder:
            return self.embedder

        def reranker(tier: TierConfig, settings: Settings) -> FakeReranker:
            return self.reranker

        return {**super().factories(), "embedding:sentence_transformers": embedder, "rerank:similarity": reranker}

    def asked(self) -> bool:
        chat = any(model.inserted for model in self.models.values())
        return chat or bool(self.embedder.batches) or bool(self.reranker.batches)


@pytest.fixture
def registry() -> Registry:
    return Registry()


@pytest.fixture
def client(make_client: Any, registry: Registry) -> TestClient:
    return make_client(ENV, registry=registry)


def post_raw(client: TestClient, path: str, body: Any) -> Any:
    # json.dumps escapes a lone surrogate as "\ud800" (ensure_ascii), as a hostile client would send it.
    return client.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def assert_400(response: Any, param: str | None) -> dict[str, Any]:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_request"
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] == param
    return error


def assert_no_stack_logged(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert sum(r.getMessage().count("\n") + 1 for r in caplog.records) < 20


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": "light", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **extra}


def tool(name: str = "f", **function: Any) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, **function}}


# ---------------------------------------------------------------- lone surrogates

# (endpoint, body, the parameter the 400 names): one string field of each kind on every endpoint.
SURROGATE_CASES: dict[str, tuple[str, dict[str, Any], str]] = {
    "chat content, temperature 0 (cache key)": (
        "/v1/chat/completions",
        chat_body(temperature=0, messages=[{"role": "user", "content": f"hi {LONE}"}]),
        "messages.0.content",
    ),
    "chat content, sampled (tokenizer)": (
        "/v1/chat/completions",
        chat_body(messages=[{"role": "system", "content": "s"}, {"role": "user", "content": LONE}]),
        "messages.1.content",
    ),
    "chat content part": (
        "/v1/chat/completions",
        chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": LONE}]}]),
        "messages.0.content.0.text",
    ),
    "message name": (
        "/v1/chat/completions",
        chat_body(messages=[{"role": "user", "content": "hi", "name": LONE}]),
        "messages.0.name",
    ),
    "earlier tool call arguments": (
        "/v1/chat/completions",
        chat_body(
            messages=[
                {"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": LONE}}]},
                {"role": "tool", "tool_call_id": "c", "content": "ok"},
            ]
        ),
        "messages.1.tool_calls.0.function.arguments",
    ),
    "stop string": ("/v1/chat/completions", chat_body(temperature=0, stop=LONE), "stop"),
    "stop list": ("/v1/chat/completions", chat_body(stop=["ok", LONE]), "stop.1"),
    "tool description": (
        "/v1/chat/completions",
        chat_body(tools=[tool(description=LONE)]),
        "tools.0.function.description",
    ),
    "tool parameters": (
        "/v1/chat/completions",
        chat_body(tools=[tool(parameters={"type": "object", "properties": {"a": {"enum": [LONE]}}})]),
        "tools.0.function.parameters.properties.a.enum.0",
    ),
    "tool_choice name": (
        "/v1/chat/completions",
        chat_body(tools=[tool()], tool_choice={"type": "function", "function": {"name": LONE}}),
        "tool_choice.function.name",
    ),
    "response_format schema": (
        "/v1/chat/completions",
        chat_body(response_format={"type": "json_schema", "json_schema": {"schema": {"description": LONE}}}),
        "response_format.json_schema.schema.description",
    ),
    "an object key": ("/v1/chat/completions", chat_body(logit_bias={LONE: 1.0}), "logit_bias"),
    "an ignored field": ("/v1/chat/completions", chat_body(user=LONE), "user"),
    "an unknown field": ("/v1/chat/completions", chat_body(vendor_extra={"x": [LONE]}), "vendor_extra.x.0"),
    "completion prompt": ("/v1/completions", {"model": "light", "prompt": LONE, "temperature": 0}, "prompt"),
    "completion prompt list": ("/v1/completions", {"model": "light", "prompt": ["a", LONE]}, "prompt.1"),
    "completion suffix": ("/v1/completions", {"model": "light", "prompt": "a", "suffix": LONE}, "suffix"),
    "embeddings input": ("/v1/embeddings", {"model": "embedding", "input": LONE}, "input"),
    "embeddings input list": ("/v1/embeddings", {"model": "embedding", "input": ["ok", LONE]}, "input.1"),
    "TEI embed inputs": ("/embed", {"inputs": [LONE]}, "inputs.0"),
    "model name": ("/v1/embeddings", {"model": LONE, "input": "x"}, "model"),
    "rerank query": ("/v1/rerank", {"model": "reranker", "query": LONE, "documents": ["a"]}, "query"),
    "rerank document": ("/v1/rerank", {"query": "q", "documents": ["a", {"text": LONE}]}, "documents.1.text"),
    "TEI rerank texts": ("/rerank", {"query": "q", "texts": [LONE]}, "texts.0"),
}


@pytest.mark.parametrize("case", list(SURROGATE_CASES))
def test_a_lone_surrogate_in_any_string_is_a_400_before_any_model_or_digest(
    client: TestClient, registry: Registry, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    path, body, param = SURROGATE_CASES[case]
    with caplog.at_level(logging.DEBUG):
        error = assert_400(post_raw(client, path, body), param)
    assert "surrogate" in error["message"]
    assert not registry.asked()
    assert_no_stack_logged(caplog)


def test_the_same_requests_with_a_valid_surrogate_pair_succeed(client: TestClient) -> None:
    """The cases above are refused for the lone surrogate alone: an escaped pair (an emoji) passes."""
    # Refused for other reasons: an unknown model (404), an unknown tool, a bias for a non-id, suffix (unsupported).
    skip = {"model name", "tool_choice name", "an object key", "completion suffix"}
    for case, (path, body, _) in SURROGATE_CASES.items():
        if case in skip:
            continue
        text = json.dumps(body).replace("\\ud800", "\\ud83d\\ude00")
        response = client.post(path, content=text, headers={"content-type": "application/json"})
        assert response.status_code == 200, (case, response.text)


# ---------------------------------------------------------------- deep and huge schemas


def nested_schema(levels: int) -> dict[str, Any]:
    """An object schema `levels` properties deep: two JSON containers per level."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def wide_schema(properties: int) -> dict[str, Any]:
    return {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(properties)}}


def as_response_format(schema: dict[str, Any]) -> dict[str, Any]:
    return chat_body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})


def as_tool(schema: dict[str, Any]) -> dict[str, Any]:
    return chat_body(tools=[tool("deep", parameters=schema)], tool_choice="required")


WHERE: dict[str, tuple[Callable[[dict[str, Any]], dict[str, Any]], str, str]] = {
    # how the schema is sent, the parameter a schema-check 400 names, the top-level field
    "response_format": (as_response_format, "response_format.json_schema.schema", "response_format"),
    "tool parameters": (as_tool, "tools.deep.parameters", "tools"),
}
TOO_BIG = {
    # what is wrong, the schema, which check refuses it
    "deeper than MAX_SCHEMA_DEPTH": (nested_schema(MAX_SCHEMA_DEPTH // 2 + 1), "schema"),
    "more than MAX_SCHEMA_NODES": (wide_schema(MAX_SCHEMA_NODES // 2), "schema"),
    "deeper than MAX_JSON_DEPTH": (nested_schema(MAX_JSON_DEPTH), "body"),
    "deep enough to recurse any checker": (nested_schema(300), "body"),
}


@pytest.mark.parametrize("where", list(WHERE))
@pytest.mark.parametrize("problem", list(TOO_BIG))
def test_a_deep_or_huge_schema_is_a_400_without_a_logged_stack(
    client: TestClient, registry: Registry, caplog: pytest.LogCaptureFixture, where: str, problem: str
) -> None:
    wrap, schema_param, field = WHERE[where]
    schema, refused_by = TOO_BIG[problem]
    with caplog.at_level(logging.DEBUG):
        response = post_raw(client, "/v1/chat/completions", wrap(schema))
    error = assert_400(response, schema_param if refused_by == "schema" else field)
    assert "nested" in error["message"] or "elements" in error["message"]
    assert not registry.asked()
    assert_no_stack_logged(caplog)


def test_a_body_too_deep_for_the_json_parser_is_a_400_envelope(client: TestClient) -> None:
    text = '{"model": "light", "messages": ' + "[" * 100_000 + "]" * 100_000 + "}"
    response = client.post("/v1/chat/completions", content=text, headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("where", list(WHERE))
def test_schemas_within_the_bounds_are_accepted(client: TestClient, where: str) -> None:
    wrap, _, _ = WHERE[where]
    for schema in (nested_schema(MAX_SCHEMA_DEPTH // 2 - 1), wide_schema(MAX_SCHEMA_NODES // 2 - 2)):
        response = post_raw(client, "/v1/chat/completions", wrap(schema))
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("meta", [5, [], None, {"$ref": "#"}])
def test_a_schema_whose_dollar_schema_is_not_a_string_is_a_400(client: TestClient, meta: Any) -> None:
    for wrap, param, _ in WHERE.values():
        error = assert_400(post_raw(client, "/v1/chat/completions", wrap({"$schema": meta})), param)
        assert "$schema" in error["message"]


# ---------------------------------------------------------------- tool_choice


@pytest.mark.parametrize("function", ["f", ["f"], {"nom": "f"}, {"name": 3}, None])
def test_a_tool_choice_whose_function_is_not_a_named_object_is_a_400(
    client: TestClient, registry: Registry, function: Any
) -> None:
    body = chat_body(tools=[tool("f")], tool_choice={"type": "function", "function": function})
    error = assert_400(post_raw(client, "/v1/chat/completions", body), "tool_choice.function")
    assert "name" in error["message"]
    assert not registry.asked()


# ---------------------------------------------------------------- the last resort


def test_an_unexpected_error_is_logged_with_a_bounded_trace(caplog: pytest.LogCaptureFixture) -> None:
    from middleware.envelope import LOGGED_FRAMES, log_unexpected

    def ping(n: int) -> int:
        return pong(n + 1)

    def pong(n: int) -> int:
        return ping(n + 1)

    try:
        ping(0)
    except RecursionError as exc:
        with caplog.at_level(logging.ERROR, logger="llmservice"):
            log_unexpected(exc, "POST", f"/v1/x{LONE}")
    (record,) = caplog.records
    text = record.getMessage()
    assert "RecursionError" in text and "unexpected error on POST" in text
    assert text.count("\n") < 4 * LOGGED_FRAMES
    text.encode("utf-8")  # the surrogate in the path is escaped
