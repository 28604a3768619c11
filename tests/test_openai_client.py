"""The real `openai` Python package against a live server with the packaged Gemma model."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import LiveServer

pytestmark = pytest.mark.real


@pytest.fixture
def client(real_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=real_server.url + "/v1", api_key="not-needed", max_retries=0, timeout=120)


def test_chat_non_streaming(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(
        model="light", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0
    )
    assert completion.object == "chat.completion"
    assert isinstance(completion.choices[0].message.content, str)
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None and completion.usage.completion_tokens <= 8


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
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens >= 1
    assert isinstance(text, str)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])


def test_completions_and_models(client: openai.OpenAI) -> None:
    completion = client.completions.create(model="light", prompt="The sky is", max_tokens=5, temperature=0)
    assert completion.object == "text_completion" and isinstance(completion.choices[0].text, str)
    assert completion.usage is not None and 1 <= completion.usage.completion_tokens <= 5
    ids = [model.id for model in client.models.list()]
    assert "light/gemma-3-270m-q4_k_m" in ids
    assert client.models.retrieve("light/gemma-3-270m-q4_k_m").id == "light/gemma-3-270m-q4_k_m"


def test_unknown_model_raises_not_found(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-nonexistent", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"


def test_bad_parameter_raises_bad_request_with_param(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="light", messages=[{"role": "user", "content": "x"}], temperature=9)
    assert caught.value.status_code == 400
    assert caught.value.param == "temperature"
