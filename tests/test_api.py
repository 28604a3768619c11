"""The HTTP API over fake models: every route, every error path, the SSE framing."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.fakes import FakeRegistry


def chat(client: TestClient, content: str = "hi", **extra: Any) -> Any:
    body = {"model": "light", "messages": [{"role": "user", "content": content}], **extra}
    return client.post("/v1/chat/completions", json=body)


def sse_events(text: str) -> list[Any]:
    """Parse an SSE body strictly: every event is `data: ...` followed by a blank line."""
    assert text.endswith("\n\n")
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code"}
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    return error


# ---------------------------------------------------------------- chat


def test_chat_completion_shape_and_usage(client: TestClient) -> None:
    response = chat(client, "hello")
    assert response.status_code == 200
    data = response.json()
    assert data["object"] == "chat.completion" and data["id"].startswith("chatcmpl-")
    assert data["model"] == "light"
    choice = data["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "echo: hello"}
    assert choice["finish_reason"] == "stop"
    prompt_tokens = len("<user>hello<assistant>")
    assert data["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": len("echo: hello"),
        "total_tokens": prompt_tokens + len("echo: hello"),
    }
    assert response.headers["x-tier"] == "light"
    assert float(response.headers["x-queue-time-ms"]) >= 0


def test_every_route_is_served_without_the_v1_prefix(client: TestClient) -> None:
    body = {"model": "light", "messages": [{"role": "user", "content": "x"}]}
    assert client.post("/chat/completions", json=body).json()["choices"][0]["message"]["content"] == "echo: x"
    assert client.post("/completions", json={"model": "light", "prompt": "ab"}).status_code == 200
    assert client.get("/models").json()["object"] == "list"


def test_max_tokens_and_its_alias_cut_with_length(client: TestClient) -> None:
    data = chat(client, "hello", max_tokens=3).json()
    assert data["choices"][0]["message"]["content"] == "ech"
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["completion_tokens"] == 3
    data = chat(client, "hello", max_completion_tokens=4).json()
    assert data["choices"][0]["message"]["content"] == "echo"


def test_logit_bias_reaches_the_sampler_clamped(client: TestClient, fake_registry: FakeRegistry) -> None:
    assert chat(client, "a", logit_bias={"5": -300, "7": 2.5}).status_code == 200
    assert fake_registry.models["light"].inserted[-1].params.logit_bias == ((5, -100.0), (7, 2.5))


def test_tier_defaults_fill_absent_parameters(client: TestClient, fake_registry: FakeRegistry) -> None:
    chat(client, "a")
    params = fake_registry.models["light"].inserted[-1].params
    assert params.max_tokens == 64  # LIGHT_MAX_TOKENS in FAKE_ENV
    assert params.temperature == 0.7 and params.top_k == 40
    chat(client, "a", temperature=0, top_p=0.5, top_k=3, seed=11, presence_penalty=0.5, stop="x")
    params = fake_registry.models["light"].inserted[-1].params
    assert (params.temperature, params.top_p, params.top_k, params.seed) == (0.0, 0.5, 3, 11)
    assert params.presence_penalty == 0.5 and params.stop == ("x",)


@pytest.mark.parametrize(
    ("stop", "expected"),
    [("o:", "ech"), (["zz", ": h"], "echo"), (["hello"], "echo: "), ("not-there", "echo: hello")],
)
def test_stop_sequences_end_the_text_before_the_match(client: TestClient, stop: Any, expected: str) -> None:
    data = chat(client, "hello", stop=stop).json()
    assert data["choices"][0]["message"]["content"] == expected
    assert data["choices"][0]["finish_reason"] == "stop"


def test_n_returns_several_choices(client: TestClient) -> None:
    data = chat(client, "hey", n=3, seed=1).json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2]
    assert all(c["message"]["content"] == "echo: hey" for c in data["choices"])
    assert data["usage"]["completion_tokens"] == 3 * len("echo: hey")


def test_content_parts_are_joined(client: TestClient) -> None:
    body = {
        "model": "light",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
    }
    assert client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"] == "echo: ab"


# ---------------------------------------------------------------- streaming


def test_chat_stream_framing(client: TestClient) -> None:
    response = chat(client, "yo", stream=True)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({c["id"] for c in chunks}) == 1 and len({c["created"] for c in chunks}) == 1
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == "echo: yo"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop" and chunks[-1]["choices"][0]["delta"] == {}
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert all("usage" not in c for c in chunks)


def test_stream_usage_chunk_only_when_asked(client: TestClient) -> None:
    events = sse_events(chat(client, "yo", stream=True, stream_options={"include_usage": True}, max_tokens=2).text)
    chunks = events[:-1]
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2
    assert all(c["usage"] is None for c in chunks[:-1])


def test_error_after_stream_started_is_one_error_event(client: TestClient) -> None:
    events = sse_events(chat(client, "BOOM", stream=True).text)
    assert "[DONE]" not in events
    assert events[-1]["error"]["code"] == "backend_error"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == "ech"


def test_completion_stream(client: TestClient) -> None:
    response = client.post("/v1/completions", json={"model": "light", "prompt": "abc", "stream": True})
    events = sse_events(response.text)
    chunks = events[:-1]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "echo: abc"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


# ---------------------------------------------------------------- completions


def test_completion_variants(client: TestClient) -> None:
    data = client.post("/v1/completions", json={"model": "light", "prompt": "abc"}).json()
    assert data["object"] == "text_completion" and data["choices"][0]["text"] == "echo: abc"
    data = client.post("/v1/completions", json={"model": "light", "prompt": "abc", "echo": True}).json()
    assert data["choices"][0]["text"] == "abcecho: abc"
    data = client.post("/v1/completions", json={"model": "light", "prompt": ["a", "b"]}).json()
    assert [c["text"] for c in data["choices"]] == ["echo: a", "echo: b"]
    data = client.post("/v1/completions", json={"model": "light", "prompt": [104, 105]}).json()
    assert data["choices"][0]["text"] == "echo: hi" and data["usage"]["prompt_tokens"] == 2


# ---------------------------------------------------------------- models and health


def test_models_list_and_retrieve(client: TestClient) -> None:
    data = client.get("/v1/models").json()
    ids = [m["id"] for m in data["data"]]
    assert ids == ["light/fake-light", "medium/fake-7b"]
    assert all(m["object"] == "model" and isinstance(m["created"], int) and m["owned_by"] for m in data["data"])
    assert client.get("/v1/models/light/fake-light").json()["id"] == "light/fake-light"
    assert client.get("/v1/models/small").json()["id"] == "light/fake-light"
    assert_error(client.get("/v1/models/nope"), 404, "model_not_found")


def test_health_reports_tier_states_without_loading(client: TestClient, fake_registry: FakeRegistry) -> None:
    data = client.get("/health").json()
    assert data["status"] == "ok"
    assert data["tiers"]["light"]["state"] == "unloaded"
    assert fake_registry.loads == {}
    chat(client)
    assert client.get("/health").json()["tiers"]["light"]["state"] == "ready"
    assert fake_registry.loads == {"light": 1}


def test_fallback_to_nearest_tier_is_announced(client: TestClient) -> None:
    response = client.post(
        "/v1/chat/completions", json={"model": "heavy", "messages": [{"role": "user", "content": "q"}]}
    )
    assert response.status_code == 200
    assert response.headers["x-tier"] == "medium"
    assert response.headers["x-tier-fallback"] == "heavy->medium"


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": "light", "messages": []}, "messages"),
        ({"model": "light"}, "messages"),
        ({"model": "light", "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"model": "light", "messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
        ({"model": "light", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
        ({"model": "light", "messages": [{"role": "user", "content": "x"}], "n": 99}, "n"),
        ({"model": "light", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 40}, "stop"),
        ({"model": "", "messages": [{"role": "user", "content": "x"}]}, "model"),
    ],
)
def test_validation_errors_are_400_with_param(client: TestClient, body: dict[str, Any], param: str) -> None:
    error = assert_error(client.post("/v1/chat/completions", json=body), 400, "invalid_request")
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].startswith(param)


def test_malformed_json_is_400(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert_error(response, 400, "invalid_request")


def test_unsupported_options_are_refused_not_ignored(client: TestClient) -> None:
    assert_error(chat(client, logprobs=True), 400, "invalid_request")
    assert_error(chat(client, n=2, stream=True), 400, "invalid_request")
    assert_error(chat(client, logit_bias={"not-a-token": 5}), 400, "invalid_request")
    response = client.post("/v1/completions", json={"model": "light", "prompt": "a", "suffix": "b"})
    assert_error(response, 400, "invalid_request")


def test_unknown_model_and_wrong_kind(client: TestClient) -> None:
    error = assert_error(chat(client, model="gpt-5-ultra"), 404, "model_not_found")
    assert "light" in error["message"]
    body = {"model": "text-embedding-3-small", "messages": [{"role": "user", "content": "x"}]}
    error = assert_error(client.post("/v1/chat/completions", json=body), 400, "model_not_supported")
    assert "embedding" in error["message"]


def test_prompt_longer_than_context_is_400_naming_both_counts(client: TestClient) -> None:
    error = assert_error(chat(client, "y" * 2100), 400, "context_length_exceeded")
    assert "2048" in error["message"] and str(len("<user>" + "y" * 2100 + "<assistant>")) in error["message"]


def test_body_over_the_limit_is_413(make_client: Any) -> None:
    from tests.conftest import FAKE_ENV

    client = make_client({**FAKE_ENV, "MAX_BODY_BYTES": "2048"})
    assert_error(chat(client, "z" * 4000), 413, "payload_too_large")
    assert chat(client, "small").status_code == 200


def test_unknown_route_and_method(client: TestClient) -> None:
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.get("/v1/chat/completions"), 405, "method_not_allowed")


def test_missing_model_file_fails_the_tier_only(make_client: Any, tmp_path: Any) -> None:
    from manager.factories import default_factories
    from tests.fakes import FakeRegistry

    registry = FakeRegistry()
    factories = {**registry.factories(), "chat:llamacpp": default_factories()["chat:llamacpp"]}
    env = {
        "LIGHT_MODEL_PATH": str(tmp_path / "missing.gguf"),
        "MEDIUM_MODEL_PATH": str(tmp_path / "folder"),
        "MEDIUM_BACKEND": "mlx",
        "EMBEDDING_MODEL_PATH": "",
        "RERANKER_MODEL_PATH": "",
    }

    class Registry:
        def factories(self) -> dict[str, Any]:
            return factories

    client = make_client(env, registry=Registry())  # type: ignore[arg-type]
    error = assert_error(chat(client), 503, "model_unavailable")
    assert str(tmp_path) not in error["message"]
    health = client.get("/health").json()
    assert health["status"] == "degraded"
    assert health["tiers"]["light"]["state"] == "failed" and health["tiers"]["light"]["reason"]
    ok = client.post("/v1/chat/completions", json={"model": "medium", "messages": [{"role": "user", "content": "m"}]})
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "echo: m"


def test_a_missing_backend_is_a_503_envelope(make_client: Any) -> None:
    """Over the fakes (which register no embedding or rerank loaders): the tier fails to load cleanly."""
    from tests.conftest import FAKE_ENV

    env = {**FAKE_ENV, "EMBEDDING_MODEL_PATH": "/models/fake-embedder", "RERANKER_BACKEND": "similarity"}
    client = make_client(env)
    embedding = client.post("/v1/embeddings", json={"model": "embedding", "input": "x"})
    rerank = client.post("/v1/rerank", json={"model": "reranker", "query": "q", "documents": ["d"]})
    for response, tier in ((embedding, "embedding"), (rerank, "reranker")):
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and isinstance(error["code"], str)
        assert tier in error["message"]
    assert embedding.json()["error"]["code"] == "model_unavailable"


@pytest.mark.real  # llama.cpp itself reads the file and refuses it
def test_corrupt_gguf_fails_cleanly(make_client: Any, tmp_path: Any) -> None:
    from manager.factories import default_factories

    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)

    class Registry:
        def factories(self) -> dict[str, Any]:
            return default_factories()

    client = make_client(
        {"LIGHT_MODEL_PATH": str(bad), "EMBEDDING_MODEL_PATH": "", "RERANKER_MODEL_PATH": ""}, Registry()
    )
    error = assert_error(chat(client), 503, "model_unavailable")
    assert "corrupt.gguf" not in error["message"]
    assert client.get("/health").json()["tiers"]["light"]["state"] == "failed"
