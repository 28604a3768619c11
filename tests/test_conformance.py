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
from tests.budgets import schema_budget
from tests.conftest import FAKE_ENV, LiveServer
from tests.fakes import FakeRegistry
from tests.waiting import DEADLINE_S, wait_for

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
    """Two sequence slots, no queue beyond them; every decode step blocks until the test sets the gate."""
    registry = FakeRegistry()
    env = {**FAKE_ENV, "LIGHT_MAX_QUEUE": "0"}
    with LiveServer(create_app(load_settings(env), factories=registry.factories())) as live:
        warm = httpx.post(live.url + "/v1/completions", json={"model": "light", "prompt": "warm"}, timeout=DEADLINE_S)
        assert warm.status_code == 200
        registry.models["light"].hold_gate = threading.Event()
        try:
            yield live, registry
        finally:
            registry.models["light"].hold_gate.set()


def test_openai_retries_503_honouring_retry_after(gated_server: tuple[LiveServer, FakeRegistry]) -> None:
    live, registry = gated_server
    scheduler = live.app.state.llm.manager.tiers["light"].worker.scheduler
    busy = [
        threading.Thread(
            target=httpx.post,
            args=(live.url + "/v1/completions",),
            kwargs={"json": {"model": "light", "prompt": "ENDLESS", "max_tokens": 3}, "timeout": DEADLINE_S},
        )
        for _ in range(2)
    ]
    for thread in busy:
        thread.start()
    # Both slots are taken once both requests are with the scheduler. Not necessarily both active: if the
    # first is already in its (blocked) decode step, the owner thread cannot admit the second until the
    # gate opens, so it waits in the queue. Either way one more request is refused with 503.
    wait_for(lambda: scheduler.active + scheduler.queued == 2, "both requests with the scheduler")
    attempts: list[dict[str, Any]] = []
    client = openai.OpenAI(
        base_url=live.url + "/v1", api_key="x", max_retries=2, http_client=recording_client(attempts)
    )
    with pytest.raises(openai.InternalServerError) as caught:
        client.completions.create(model="light", prompt="hello")
    registry.models["light"].hold_gate.set()
    for thread in busy:
        thread.join(DEADLINE_S)
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
    used_up = message.usage_metadata["output_tokens"] == 6
    assert message.response_metadata["finish_reason"] == ("length" if used_up else "stop")
    chunks = list(llm.stream("Count to three."))
    assert sent[-1]["stream"] is True and sent[-1]["stream_options"] == {"include_usage": True}
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    assert total.usage_metadata is not None and total.usage_metadata["output_tokens"] <= 6
    used_up = total.usage_metadata["output_tokens"] == 6
    assert total.response_metadata["finish_reason"] == ("length" if used_up else "stop")


class GetWeather(BaseModel):
    """Weather for a city."""

    city: str = Field(max_length=20)


# The forced calls below always close within these budgets, whatever words this CPU's greedy pick.
WEATHER_BUDGET = schema_budget({"tool_calls": [{"name": "GetWeather", "arguments": {"city": ""}}]}, 20)
PERSON_BUDGET = schema_budget({"tool_calls": [{"name": "Person", "arguments": {"name": "", "age": 120}}]}, 12)


def strict_schema_of(request: dict[str, Any]) -> dict[str, Any]:
    """The schema LangChain sent: bounded only because it is strict (no properties beyond the listed)."""
    if "response_format" in request:
        schema = request["response_format"]["json_schema"]["schema"]
    else:
        schema = request["tools"][0]["function"]["parameters"]
    assert schema["additionalProperties"] is False, schema
    return schema


@pytest.mark.real
def test_langchain_bind_tools_forced_call(real_server: LiveServer) -> None:
    sent: list[dict[str, Any]] = []
    llm = chat_model(real_server, max_tokens=WEATHER_BUDGET, http_client=recording_client(sent))
    forced = llm.bind_tools([GetWeather], tool_choice="GetWeather", strict=True)
    message = forced.invoke("What is the weather in Paris?")
    assert strict_schema_of(sent[-1])["properties"]["city"]["maxLength"] == 20
    assert len(message.tool_calls) == 1
    assert message.tool_calls[0]["name"] == "GetWeather"
    GetWeather.model_validate(message.tool_calls[0]["args"])


@pytest.mark.real
@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_langchain_structured_output(real_server: LiveServer, method: str) -> None:
    sent: list[dict[str, Any]] = []
    llm = chat_model(real_server, max_tokens=PERSON_BUDGET, temperature=0, http_client=recording_client(sent))
    person = llm.with_structured_output(Person, method=method, strict=True).invoke("Invent a person.")
    assert strict_schema_of(sent[-1])["properties"]["name"]["maxLength"] == 12
    assert isinstance(person, Person)


@pytest.mark.real
def test_langchain_json_mode(real_server: LiveServer) -> None:
    """JSON mode constrains the syntax, not the length, and whether this CPU's greedy words close the
    object within the budget is not for a test to know: the reply parses when it stops, and when the
    budget runs out first the client says so and holds the start of a JSON object."""
    sent: list[dict[str, Any]] = []
    schema = {"title": "thing", "type": "object", "properties": {"a": {"type": "string"}}}
    llm = chat_model(real_server, max_tokens=60, temperature=0, http_client=recording_client(sent))
    structured = llm.with_structured_output(schema, method="json_mode", include_raw=True)
    try:
        result = structured.invoke("Reply with a JSON object.")
    except openai.LengthFinishReasonError as cut:
        (choice,) = cut.completion.choices
        assert choice.finish_reason == "length" and cut.completion.usage.completion_tokens == 60
        assert choice.message.content.lstrip().startswith("{")
    else:
        assert result["raw"].response_metadata["finish_reason"] == "stop"
        assert result["parsing_error"] is None
        assert result["parsed"] == json.loads(result["raw"].content) and isinstance(result["parsed"], dict)
    assert sent[-1]["response_format"] == {"type": "json_object"}


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
    assert completion.raw.object == "text_completion"
    assert completion.additional_kwargs["completion_tokens"] <= 8
    chat = OpenAILike(**common, is_chat_model=True)
    responses = list(chat.stream_chat([ChatMessage(role="user", content="Hi")]))
    chunks = [r.raw for r in responses]
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["stop"], ["length"])  # the stream ran to its end, once
    assert len([r for r in responses if r.delta]) <= 8  # at most one text delta per token


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
