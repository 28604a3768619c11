"""The Ollama API over fakes: the `ollama` client and LangChain's ChatOllama against a live server, the
NDJSON wire itself, and proof that it rides the same chat turns as /v1 (one cache entry for both)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import ollama
import pytest
from fastapi.testclient import TestClient

from api.ollama import OLLAMA_VERSION
from config import load_settings
from server import create_app
from tests.conftest import LiveServer
from tests.test_cache_rag import ENV, RagRegistry
from tests.test_tools import CALL, WEATHER
from tests.waiting import DEADLINE_S

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def rag() -> RagRegistry:
    return RagRegistry()


@pytest.fixture
def client(make_client: Any, rag: RagRegistry) -> TestClient:
    return make_client(ENV, registry=rag)


@pytest.fixture
def live(rag: RagRegistry) -> Iterator[LiveServer]:
    with LiveServer(create_app(load_settings(ENV), factories=rag.factories())) as server:
        yield server


@pytest.fixture
def sdk(live: LiveServer) -> ollama.Client:
    return ollama.Client(host=live.url, timeout=DEADLINE_S)


def lines(response: Any) -> list[dict[str, Any]]:
    assert response.headers["content-type"].startswith("application/x-ndjson")
    assert response.text.endswith("\n")
    return [json.loads(line) for line in response.text.splitlines()]


# ---------------------------------------------------------------- the ollama client


def test_client_chat_streamed(sdk: ollama.Client) -> None:
    parts = list(sdk.chat(model="light", messages=HI, stream=True))
    assert "".join(p.message.content or "" for p in parts) == "echo: hi"
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    last = parts[-1]
    assert last.done_reason == "stop" and last.eval_count == len("echo: hi")
    assert last.prompt_eval_count and last.prompt_eval_count > 0
    assert last.total_duration and last.total_duration > 0
    assert last.model == "light" and last.created_at


def test_client_chat_whole_with_options_and_a_tag(sdk: ollama.Client) -> None:
    reply = sdk.chat(model="light:latest", messages=HI, options={"num_predict": 3, "temperature": 0})
    assert reply.message.role == "assistant" and reply.message.content == "ech"
    assert reply.done and reply.done_reason == "length" and reply.eval_count == 3


def test_client_chat_with_tools(sdk: ollama.Client) -> None:
    messages = [{"role": "user", "content": "SAY:" + CALL}]
    room = {"num_predict": 200}  # the fake writes the call one character a token
    reply = sdk.chat(model="light", messages=messages, tools=[WEATHER], stream=False, options=room)
    calls = reply.message.tool_calls
    assert calls is not None and len(calls) == 1
    assert calls[0].function.name == "get_weather" and calls[0].function.arguments == {"city": "Paris"}
    # The call goes back as history with its result, the way Ollama clients send it.
    history = [
        *messages,
        {"role": "assistant", "content": "", "tool_calls": [{"function": calls[0].function.model_dump()}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"},
    ]
    assert sdk.chat(model="light", messages=history, tools=[WEATHER], options=room).message.content == "echo: sunny"


def test_client_generate(sdk: ollama.Client) -> None:
    assert sdk.generate(model="light", prompt="hello").response == "echo: hello"
    parts = list(sdk.generate(model="light", prompt="hello", system="be brief", stream=True))
    assert "".join(p.response for p in parts) == "echo: hello" and parts[-1].done_reason == "stop"
    assert sdk.generate(model="light", prompt="raw text", raw=True).response == "echo: raw text"


def test_client_embed_matches_the_openai_route(sdk: ollama.Client, live: LiveServer) -> None:
    result = sdk.embed(model="embedding:latest", input=["alpha", "beta"])
    assert len(result.embeddings) == 2 and result.prompt_eval_count == 4
    body = {"model": "embedding", "input": ["alpha", "beta"]}
    openai = httpx.post(live.url + "/v1/embeddings", json=body, timeout=DEADLINE_S).json()
    assert [list(v) for v in result.embeddings] == [item["embedding"] for item in openai["data"]]
    assert list(sdk.embeddings(model="embedding", prompt="alpha").embedding) == openai["data"][0]["embedding"]


def test_client_list_ps_show_version(sdk: ollama.Client, live: LiveServer) -> None:
    assert [m.model for m in sdk.list().models] == ["light:latest", "medium:latest", "embedding:latest"]
    assert [m.model for m in sdk.ps().models] == []
    sdk.chat(model="light", messages=HI)
    running = sdk.ps().models
    assert [m.model for m in running] == ["light:latest"] and running[0].context_length == 4096
    shown = sdk.show("light")
    assert shown.capabilities == ["completion", "tools"] and shown.modelinfo is not None
    assert shown.modelinfo["llmservice.context_length"] == 4096
    assert sdk.show("embedding").capabilities == ["embedding"]
    assert httpx.get(live.url + "/api/version", timeout=DEADLINE_S).json() == {"version": OLLAMA_VERSION}


def test_client_errors_carry_ollamas_error_string(sdk: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as info:
        sdk.chat(model="nope", messages=HI)
    assert info.value.status_code == 404 and "does not exist" in str(info.value.error)
    with pytest.raises(ollama.ResponseError) as info:
        sdk.generate(model="light", prompt="x", images=[b"\x89PNG"])
    assert info.value.status_code == 400 and "The light tier does not accept images" in info.value.error


def test_client_load_and_unload_with_keep_alive(sdk: ollama.Client, rag: RagRegistry) -> None:
    loaded = sdk.generate(model="medium", prompt="")
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""
    assert [m.model for m in sdk.ps().models] == ["medium:latest"]
    unloaded = sdk.chat(model="medium", messages=[], keep_alive=0)
    assert unloaded.done_reason == "unload" and sdk.ps().models == []


def test_langchain_chat_ollama_and_embeddings(live: LiveServer) -> None:
    from langchain_ollama import ChatOllama, OllamaEmbeddings

    llm = ChatOllama(model="light", base_url=live.url, num_predict=32)
    assert llm.invoke("hi").content == "echo: hi"
    assert "".join(str(chunk.content) for chunk in llm.stream("hi")) == "echo: hi"
    embeddings = OllamaEmbeddings(model="embedding", base_url=live.url)
    vector = embeddings.embed_query("alpha")
    assert len(vector) == 4 and embeddings.embed_documents(["alpha"]) == [vector]


# ---------------------------------------------------------------- the wire


def test_chat_streams_ndjson_by_default(client: TestClient) -> None:
    body = lines(client.post("/api/chat", json={"model": "light", "messages": HI}))
    assert all(set(line) >= {"model", "created_at", "message", "done"} for line in body)
    assert "".join(line["message"]["content"] for line in body) == "echo: hi"
    final = body[-1]
    assert final["done"] is True and final["done_reason"] == "stop"
    assert {"total_duration", "load_duration", "prompt_eval_count", "eval_count", "eval_duration"} <= set(final)


def test_curl_style_bodies_without_json_content_type_are_read(client: TestClient) -> None:
    # Ollama's own docs use `curl -d '{...}'`, which sends application/x-www-form-urlencoded.
    raw = json.dumps({"model": "light", "prompt": "hello", "stream": False})
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    response = client.post("/api/generate", content=raw, headers=headers)
    assert response.status_code == 200 and response.json()["response"] == "echo: hello"
    bad = client.post("/api/generate", content=b"{not json", headers=headers)
    assert bad.status_code == 400 and bad.json() == {"error": "The request body is not valid JSON"}


def test_options_and_format_reach_the_model(client: TestClient, rag: RagRegistry) -> None:
    options = {"temperature": 0.2, "top_k": 7, "top_p": 0.5, "seed": 3, "stop": ["zz"], "num_ctx": 999}
    body = {"model": "light", "messages": HI, "stream": False, "options": options, "format": "json"}
    assert client.post("/api/chat", json=body).status_code == 200
    params = rag.models["light"].inserted[-1].params
    assert (params.temperature, params.top_k, params.top_p, params.seed, params.stop) == (0.2, 7, 0.5, 3, ("zz",))
    assert json.loads(params.json_schema) == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    assert client.post("/api/chat", json={**body, "format": schema}).status_code == 200
    assert json.loads(rag.models["light"].inserted[-1].params.json_schema) == schema
    bad = client.post("/api/chat", json={**body, "options": {"temperature": 9}})
    assert bad.status_code == 400 and "options.temperature" in bad.json()["error"]


def test_an_error_mid_stream_is_one_error_line(client: TestClient) -> None:
    body = lines(client.post("/api/chat", json={"model": "light", "messages": [{"role": "user", "content": "BOOM"}]}))
    assert "error" in body[-1] and set(body[-1]) == {"error"}
    assert all(line.get("done") is False for line in body[:-1])


def test_ollama_and_openai_requests_share_the_turn_and_its_cache_entry(client: TestClient) -> None:
    openai = client.post("/v1/chat/completions", json={"model": "light", "messages": HI, "temperature": 0})
    assert openai.headers["x-cache"] == "MISS"
    body = {"model": "light", "messages": HI, "stream": False, "options": {"temperature": 0}}
    replayed = client.post("/api/chat", json=body)
    assert replayed.headers["x-cache"] == "HIT" and replayed.headers["x-tier"] == "light"
    assert replayed.json()["message"]["content"] == openai.json()["choices"][0]["message"]["content"]
