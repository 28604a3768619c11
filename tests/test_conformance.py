"""Real client packages against live servers: what users of each ecosystem do, unchanged."""

from __future__ import annotations

import gzip
import hashlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from config import load_settings
from server import create_app
from tests.conftest import FAKE_ENV, LiveServer, wait_until
from tests.fakes import FakeRegistry

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


class Person(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)


@pytest.fixture
def offline_tiktoken(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Seed tiktoken's cache from bpe-openai's copy of cl100k, so LangChain never downloads it."""
    import bpe_openai

    data = gzip.decompress((Path(bpe_openai.__file__).parent / "data" / "cl100k_base.tiktoken.gz").read_bytes())
    (tmp_path / hashlib.sha1(CL100K_URL.encode()).hexdigest()).write_bytes(data)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))


def recording_client(sent: list[dict[str, Any]]) -> httpx.Client:
    def record(request: httpx.Request) -> None:
        sent.append(json.loads(request.read() or b"{}"))

    return httpx.Client(event_hooks={"request": [record]}, timeout=300)


# ---------------------------------------------------------------- openai SDK: errors and retries


@pytest.fixture
def gated_server() -> Iterator[tuple[LiveServer, FakeRegistry]]:
    registry = FakeRegistry()
    env = {**FAKE_ENV, "LIGHT_MAX_QUEUE": "0"}
    with LiveServer(create_app(load_settings(env), factories=registry.factories())) as live:
        assert httpx.post(live.url + "/v1/completions", json={"model": "light", "prompt": "warm"}).status_code == 200
        registry.models["light"].step_gate = threading.Event()
        try:
            yield live, registry
        finally:
            registry.models["light"].step_gate.set()


def test_openai_retries_503_honouring_retry_after(gated_server: tuple[LiveServer, FakeRegistry]) -> None:
    live, registry = gated_server
    scheduler = live.app.state.llm.manager.tiers["light"].worker
    busy = [
        threading.Thread(
            target=httpx.post,
            args=(live.url + "/v1/completions",),
            kwargs={"json": {"model": "light", "prompt": "ENDLESS", "max_tokens": 3}, "timeout": 60},
        )
        for _ in range(2)
    ]
    for thread in busy:
        thread.start()
    assert wait_until(lambda: scheduler.active == 2)
    attempts: list[dict[str, Any]] = []
    client = openai.OpenAI(
        base_url=live.url + "/v1", api_key="x", max_retries=2, http_client=recording_client(attempts)
    )
    with pytest.raises(openai.InternalServerError) as caught:
        client.completions.create(model="light", prompt="hello")
    registry.models["light"].step_gate.set()
    for thread in busy:
        thread.join(30)
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"] == "1"
    assert len(attempts) == 3  # the first try and two retries


def test_openai_authentication_error_after_one_attempt() -> None:
    registry = FakeRegistry()
    app = create_app(load_settings({**FAKE_ENV, "API_KEYS": "right-key"}), factories=registry.factories())
    with LiveServer(app) as live:
        attempts: list[dict[str, Any]] = []
        client = openai.OpenAI(
            base_url=live.url + "/v1", api_key="wrong", max_retries=3, http_client=recording_client(attempts)
        )
        with pytest.raises(openai.AuthenticationError) as caught:
            client.chat.completions.create(model="light", messages=[{"role": "user", "content": "x"}])
        assert caught.value.status_code == 401 and len(attempts) == 1
        good = openai.OpenAI(base_url=live.url + "/v1", api_key="right-key", max_retries=0)
        assert good.chat.completions.create(model="light", messages=[{"role": "user", "content": "x"}]).choices


def test_error_after_stream_started_surfaces_as_api_error(live_fake_server: LiveServer) -> None:
    client = openai.OpenAI(base_url=live_fake_server.url + "/v1", api_key="x", max_retries=0)
    stream = client.chat.completions.create(model="light", messages=[{"role": "user", "content": "BOOM"}], stream=True)
    received = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            received.append(chunk)
    assert "The model failed while generating" in str(caught.value)
    assert received  # the stream had started


# ---------------------------------------------------------------- LangChain


def chat_model(server: LiveServer, **kwargs: Any) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(model="light", base_url=server.url + "/v1", api_key="x", max_retries=0, **kwargs)


@pytest.mark.real
def test_langchain_invoke_stream_and_max_tokens(real_server: LiveServer) -> None:
    sent: list[dict[str, Any]] = []
    llm = chat_model(real_server, max_tokens=6, temperature=0, http_client=recording_client(sent), stream_usage=True)
    message = llm.invoke("Say hello.")
    assert isinstance(message.content, str)
    assert sent[-1]["max_completion_tokens"] == 6 and "max_tokens" not in sent[-1]
    assert message.usage_metadata is not None and message.usage_metadata["output_tokens"] <= 6
    chunks = list(llm.stream("Count to three."))
    assert sent[-1]["stream"] is True and sent[-1]["stream_options"] == {"include_usage": True}
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    assert total.usage_metadata is not None and 1 <= total.usage_metadata["output_tokens"] <= 6


@pytest.mark.real
def test_langchain_bind_tools_forced_call(real_server: LiveServer) -> None:
    def get_weather(city: str) -> str:
        """Weather for a city."""
        return city

    llm = chat_model(real_server, max_tokens=60).bind_tools([get_weather], tool_choice="get_weather")
    message = llm.invoke("What is the weather in Paris?")
    assert len(message.tool_calls) == 1
    assert message.tool_calls[0]["name"] == "get_weather"
    assert isinstance(message.tool_calls[0]["args"]["city"], str)


@pytest.mark.real
@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(real_server: LiveServer, method: str) -> None:
    structured = chat_model(real_server, max_tokens=80, temperature=0).with_structured_output(Person, method=method)
    person = structured.invoke("Invent a person.")
    assert isinstance(person, Person)


@pytest.mark.real
def test_langchain_json_mode(real_server: LiveServer) -> None:
    schema = {"title": "thing", "type": "object", "properties": {"a": {"type": "string"}}}
    structured = chat_model(real_server, max_tokens=60, temperature=0).with_structured_output(
        schema, method="json_mode"
    )
    assert isinstance(structured.invoke("Reply with a JSON object."), dict)


@pytest.mark.real
def test_langchain_context_overflow(real_server: LiveServer) -> None:
    from langchain_core.exceptions import ContextOverflowError

    with pytest.raises(ContextOverflowError):
        chat_model(real_server, max_tokens=4).invoke("word " * 1500)


@pytest.mark.real
def test_langchain_embeddings_without_token_ids(real_server: LiveServer, offline_tiktoken: None) -> None:
    from langchain_openai import OpenAIEmbeddings

    embeddings = OpenAIEmbeddings(
        model="embedding", base_url=real_server.url + "/v1", api_key="x", check_embedding_ctx_length=False
    )
    vectors = embeddings.embed_documents(["a cat sat", "a dog ran"])
    assert len(vectors) == 2 and len(vectors[0]) == 384


# ---------------------------------------------------------------- LlamaIndex


@pytest.mark.real
def test_llamaindex_openai_like_completion_and_chat_stream(real_server: LiveServer) -> None:
    from llama_index.core.llms import ChatMessage
    from llama_index.llms.openai_like import OpenAILike

    common = {"model": "light", "api_base": real_server.url + "/v1", "api_key": "x", "max_tokens": 8, "max_retries": 0}
    completion = OpenAILike(**common).complete("The sky is")  # is_chat_model=False: /v1/completions
    assert isinstance(completion.text, str)
    chat = OpenAILike(**common, is_chat_model=True)
    pieces = [r.delta for r in chat.stream_chat([ChatMessage(role="user", content="Hi")])]
    assert pieces and all(isinstance(p, str) for p in pieces if p is not None)


@pytest.mark.real
def test_llamaindex_openai_like_embedding_keeps_order(real_server: LiveServer) -> None:
    from llama_index.embeddings.openai_like import OpenAILikeEmbedding

    texts = [f"sentence number {i} about topic {i % 3}" for i in range(7)]
    batched = OpenAILikeEmbedding(
        model_name="embedding", api_base=real_server.url + "/v1", api_key="x", embed_batch_size=3
    )
    vectors = batched.get_text_embedding_batch(texts)
    singles = [batched.get_text_embedding(text) for text in texts]
    for vector, single in zip(vectors, singles, strict=True):
        assert sum(a * b for a, b in zip(vector, single, strict=True)) > 0.9999


# ---------------------------------------------------------------- rerank clients


@pytest.mark.real
def test_cohere_v1_rerank(real_server: LiveServer) -> None:
    import cohere

    client = cohere.Client(api_key="x", base_url=real_server.url)
    result = client.rerank(
        model="rerank-english-v3.0",
        query="What is the capital of France?",
        documents=["Paris is the capital of France.", "Bananas are yellow.", "France borders Spain."],
        top_n=2,
    )
    assert [r.index for r in result.results][0] == 0
    assert len(result.results) == 2
    assert result.results[0].relevance_score >= result.results[1].relevance_score


@pytest.mark.real
def test_llamaindex_jina_rerank(real_server: LiveServer) -> None:
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.postprocessor.jinaai_rerank import JinaRerank

    nodes = [NodeWithScore(node=TextNode(text=t)) for t in ["Bananas are yellow.", "Paris is in France.", "Cars."]]
    reranker = JinaRerank(api_key="x", base_url=real_server.url + "/v1", top_n=2, model="jina-reranker-v2")
    ranked = reranker.postprocess_nodes(nodes, query_bundle=QueryBundle("Where is Paris?"))
    assert len(ranked) == 2
    assert ranked[0].node.get_content() == "Paris is in France."
