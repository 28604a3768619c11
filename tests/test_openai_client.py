"""The real `openai` Python package against a live server: the packaged Gemma model, and the fakes for
the errors (they load no model)."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import LiveServer
from tests.waiting import DEADLINE_S


def sdk(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=DEADLINE_S)


@pytest.fixture
def client(real_server: LiveServer) -> openai.OpenAI:
    return sdk(real_server)


@pytest.fixture
def fake_client(live_fake_server: LiveServer) -> openai.OpenAI:
    return sdk(live_fake_server)


@pytest.mark.real
def test_chat_non_streaming(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="light", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    assert completion.object == "chat.completion"
    assert isinstance(completion.choices[0].message.content, str)  # not None: no tool call was offered
    assert completion.usage is not None and completion.usage.completion_tokens <= 8
    used_up = completion.usage.completion_tokens == 8
    assert completion.choices[0].finish_reason == ("length" if used_up else "stop")


@pytest.mark.real
def test_chat_streaming_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="light",
        messages=[{"role": "user", "content": "Count to five."}],
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    usage = chunks[-1].usage
    assert all(c.usage is None for c in chunks[:-1])  # usage comes once, last
    assert usage.completion_tokens <= 10
    texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(texts) <= usage.completion_tokens  # at most one text delta per token
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == ["length" if usage.completion_tokens == 10 else "stop"]


@pytest.mark.real
def test_completions_and_models(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="light", prompt="The sky is", max_tokens=5, temperature=0)
    assert completion.object == "text_completion"
    assert completion.usage is not None and completion.usage.completion_tokens <= 5
    used_up = completion.usage.completion_tokens == 5
    assert completion.choices[0].finish_reason == ("length" if used_up else "stop")
    ids = [model.id for model in client.models.list()]
    assert "light/gemma-3-270m-q4_k_m" in ids
    assert client.models.retrieve("light/gemma-3-270m-q4_k_m").id == "light/gemma-3-270m-q4_k_m"


def test_unknown_model_raises_not_found(fake_client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        fake_client.chat.completions.create(model="gpt-nonexistent", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"


def test_bad_parameter_raises_bad_request_with_param(fake_client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        fake_client.chat.completions.create(model="light", messages=[{"role": "user", "content": "x"}], temperature=9)
    assert caught.value.status_code == 400
    assert caught.value.param == "temperature"
