"""The packaged Gemma 3 270M GGUF through LlamaCppChat, behind a live server (loaded once per session).

Greedy text differs between CPUs, so no test here knows the model's words or how soon it stops: where a
test needs a budget used up exactly, `no_end` bans the end-of-generation tokens (tests/budgets.py).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from tests.budgets import no_end_bias
from tests.conftest import LiveServer
from tests.waiting import DEADLINE_S

pytestmark = pytest.mark.real

COUNTING = "one, two, three, four, five, six, seven, eight, nine, ten, eleven,"


@pytest.fixture(scope="module")
def no_end(gemma_path: str) -> dict[str, float]:
    return no_end_bias(gemma_path)


def light_model(server: LiveServer) -> Any:
    worker = server.app.state.llm.manager.tiers["light"].worker.scheduler
    assert worker is not None, "the light tier is not loaded yet"
    return worker.model


def post(server: LiveServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=DEADLINE_S)


def complete(server: LiveServer, prompt: str, **extra: Any) -> dict[str, Any]:
    response = post(server, "/v1/completions", {"model": "light", "prompt": prompt, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def test_chat_answers_with_usage_from_the_real_tokenizer(real_server: LiveServer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    response = post(real_server, "/v1/chat/completions", {"model": "light", "messages": messages, "max_tokens": 12})
    assert response.status_code == 200, response.text
    data = response.json()
    assert isinstance(data["choices"][0]["message"]["content"], str)  # not null: no tool call was offered
    assert data["usage"]["completion_tokens"] <= 12
    assert data["choices"][0]["finish_reason"] == ("length" if data["usage"]["completion_tokens"] == 12 else "stop")
    model = light_model(real_server)
    prompt = model.render_chat(messages)
    assert prompt.startswith("<bos><start_of_turn>user\nBe brief.\n\nName a colour.<end_of_turn>")
    assert prompt.endswith("<start_of_turn>model\n")
    assert data["usage"]["prompt_tokens"] == len(model.chat_tokens(messages))
    assert model.chat_tokens(messages).count(2) == 1  # one BOS, not two
    assert model.chat_tokens(messages) == model.tokenize(prompt)  # plain messages: as the whole prompt tokenized


def test_max_tokens_is_honoured_exactly(real_server: LiveServer, no_end: dict[str, float]) -> None:
    data = complete(real_server, COUNTING, max_tokens=9, temperature=0, logit_bias=no_end)
    assert data["usage"]["completion_tokens"] == 9
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["prompt_tokens"] == len(light_model(real_server).tokenize(COUNTING))


def test_greedy_stream_equals_non_stream(real_server: LiveServer, no_end: dict[str, float]) -> None:
    body = {"model": "light", "prompt": COUNTING, "max_tokens": 16, "temperature": 0, "seed": 5, "logit_bias": no_end}
    plain = post(real_server, "/v1/completions", body).json()
    streamed_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", real_server.url + "/v1/completions", json=streamed_body, timeout=DEADLINE_S) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    streamed = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
    assert streamed == plain["choices"][0]["text"]
    assert plain["usage"]["completion_tokens"] == chunks[-1]["usage"]["completion_tokens"] == 16  # not both empty


def test_stop_sequence_cuts_the_output(real_server: LiveServer, no_end: dict[str, float]) -> None:
    baseline = complete(real_server, COUNTING, max_tokens=20, temperature=0, logit_bias=no_end)["choices"][0]["text"]
    middle = len(baseline) // 2
    stop = baseline[middle : middle + 3]  # whatever this CPU's greedy text is, cut it in the middle
    assert len(stop) == 3, baseline
    data = complete(real_server, COUNTING, max_tokens=20, temperature=0, logit_bias=no_end, stop=[stop])
    assert data["choices"][0]["text"] == baseline[: baseline.index(stop)]
    assert data["choices"][0]["finish_reason"] == "stop"


def test_seed_with_temperature_is_reproducible(real_server: LiveServer) -> None:
    texts = [
        complete(real_server, "Once upon a time", max_tokens=20, temperature=0.9, seed=42)["choices"][0]["text"]
        for _ in range(2)
    ]
    assert texts[0] == texts[1]
    greedy = [
        complete(real_server, "Once upon a time", max_tokens=20, temperature=0)["choices"][0]["text"] for _ in range(2)
    ]
    assert greedy[0] == greedy[1]


def test_prompt_over_the_context_is_400(real_server: LiveServer) -> None:
    response = post(real_server, "/v1/completions", {"model": "light", "prompt": "word " * 1500, "max_tokens": 4})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "1024" in error["message"]


def test_concurrent_requests_are_batched_and_isolated(real_server: LiveServer, no_end: dict[str, float]) -> None:
    """Four concurrent greedy streams: identical prompts give identical text, every budget is exact."""

    async def run() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=real_server.url, timeout=DEADLINE_S) as client:
            bodies = [
                {"model": "light", "prompt": prompt, "max_tokens": tokens, "temperature": 0, "logit_bias": no_end}
                for prompt, tokens in [(COUNTING, 12), (COUNTING, 12), ("Once upon a time", 7), ("def add(a, b):", 9)]
            ]
            responses = await asyncio.gather(*(client.post("/v1/completions", json=b) for b in bodies))
            return [r.json() for r in responses]

    results = asyncio.run(run())
    assert results[0]["choices"][0]["text"] == results[1]["choices"][0]["text"]
    assert [r["usage"]["completion_tokens"] for r in results] == [12, 12, 7, 9]
    assert all(r["choices"][0]["finish_reason"] == "length" for r in results)


def test_logit_bias_bans_a_token_and_unknown_ids_are_400(real_server: LiveServer, no_end: dict[str, float]) -> None:
    greedy = complete(real_server, COUNTING, max_tokens=1, temperature=0, logit_bias=no_end)["choices"][0]["text"]
    model = light_model(real_server)
    banned = model.tokenize(greedy)[-1]
    also_banned = {**no_end, str(banned): -100}
    biased = complete(real_server, COUNTING, max_tokens=1, temperature=0, logit_bias=also_banned)
    assert model.tokenize(biased["choices"][0]["text"])[-1] != banned
    body = {"model": "light", "prompt": COUNTING, "max_tokens": 3, "logit_bias": {"999999999": 5}}
    response = post(real_server, "/v1/completions", body)
    assert response.status_code == 400 and response.json()["error"]["param"] == "logit_bias"
    after = complete(real_server, COUNTING, max_tokens=3, temperature=0, logit_bias=no_end)
    assert after["usage"]["completion_tokens"] == 3  # the refused request left the model serving
