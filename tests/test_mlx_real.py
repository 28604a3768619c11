"""A tiny random Llama generated with transformers, served by MlxChat (mlx-lm BatchGenerator) on CPU."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from config import load_settings
from server import create_app
from tests.budgets import schema_budget
from tests.conftest import LiveServer
from tests.waiting import DEADLINE_S, wait_for

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def mlx_server(tiny_mlx_model: Path) -> Iterator[LiveServer]:
    env = {
        "LIGHT_MODEL_PATH": "",
        "MEDIUM_MODEL_PATH": str(tiny_mlx_model),
        "MEDIUM_PARALLEL": "4",
        "EMBEDDING_MODEL_PATH": "",
        "RERANKER_MODEL_PATH": "",
    }
    with LiveServer(create_app(load_settings(env))) as live:
        yield live


def chat_body(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "medium", "messages": [{"role": "user", "content": content}], **extra}


def test_mlx_backend_is_inferred_and_chats(mlx_server: LiveServer) -> None:
    assert mlx_server.app.state.llm.settings.tiers["medium"].backend == "mlx"
    response = httpx.post(
        mlx_server.url + "/v1/chat/completions",
        json=chat_body("hello world", max_tokens=8, temperature=0),
        timeout=DEADLINE_S,
    )
    assert response.status_code == 200, response.text
    data = response.json()
    assert isinstance(data["choices"][0]["message"]["content"], str)  # not null: no tool call was offered
    assert data["usage"]["completion_tokens"] <= 8
    assert data["choices"][0]["finish_reason"] == ("length" if data["usage"]["completion_tokens"] == 8 else "stop")
    model = mlx_server.app.state.llm.manager.tiers["medium"].worker.scheduler.model
    prompt = model.render_chat([{"role": "user", "content": "hello world"}])
    assert prompt == "<s><|user|>hello world</s><|assistant|>"
    assert data["usage"]["prompt_tokens"] == len(model.chat_tokens([{"role": "user", "content": "hello world"}]))


def test_mlx_streaming_matches_non_streaming(mlx_server: LiveServer) -> None:
    body = chat_body("the quick brown fox", max_tokens=10, temperature=0)
    url = mlx_server.url + "/v1/chat/completions"
    plain = httpx.post(url, json=body, timeout=DEADLINE_S).json()
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=DEADLINE_S) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == plain["choices"][0]["finish_reason"]


def test_mlx_concurrent_streams_each_get_their_budget(mlx_server: LiveServer) -> None:
    async def run() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(base_url=mlx_server.url, timeout=DEADLINE_S) as client:
            bodies = [chat_body(f"hello {i}", max_tokens=3 + i, temperature=0) for i in range(4)]
            responses = await asyncio.gather(*(client.post("/v1/chat/completions", json=b) for b in bodies))
            return [r.json() for r in responses]

    results = asyncio.run(run())
    for i, data in enumerate(results):
        usage = data["usage"]["completion_tokens"]
        assert usage == 3 + i or data["choices"][0]["finish_reason"] == "stop"


def test_mlx_disconnect_frees_the_sequence(mlx_server: LiveServer) -> None:
    worker = mlx_server.app.state.llm.manager.tiers["medium"].worker.scheduler
    model = worker.model
    original_step, released, texted = model.step, threading.Event(), threading.Event()

    def held_step() -> Any:
        # After the first text, the next decode step waits until the test has disconnected: a tiny model
        # on a loaded machine could otherwise finish all its tokens before the client reads the first.
        if texted.is_set():
            released.wait(DEADLINE_S)
        outputs = original_step()
        if any(output.text for output in outputs):
            texted.set()
        return outputs

    def disconnect_after_the_first_text() -> list[Any]:
        body = chat_body("hello", max_tokens=400, stream=True)
        with httpx.stream("POST", mlx_server.url + "/v1/chat/completions", json=body, timeout=DEADLINE_S) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    break  # text: the sequence is generating (the role chunk may come before it starts)
            return [job for job, _ in list(model._jobs.values())]

    original_insert, inserted = model.insert, []

    def recorded_insert(job: Any) -> None:
        inserted.append(job)
        original_insert(job)

    model.step, model.insert = held_step, recorded_insert
    try:
        # A random model may end its reply at once (an end token as its second token): then try again.
        for _ in range(5):
            texted.clear()
            jobs = disconnect_after_the_first_text()
            if jobs:
                break
        ended = [(j.completion_tokens, j.cancelled.is_set(), j.params.max_tokens) for j in inserted]
        assert len(jobs) == 1, f"every reply ended before the client could leave: {ended}"
        wait_for(jobs[0].cancelled.is_set, "the cancel after the disconnect")
    finally:
        released.set()
        model.step, model.insert = original_step, original_insert
    wait_for(lambda: worker.active == 0 and not model._jobs, "the sequence freed after the disconnect")
    assert jobs[0].completion_tokens < 400


def test_mlx_json_schema_is_enforced(mlx_server: LiveServer) -> None:
    """A random model knows no JSON; the llguidance mask alone makes its output valid."""
    import jsonschema

    schema = {
        "type": "object",
        "properties": {
            "word": {"type": "string", "maxLength": 5},
            "n": {"type": "integer", "minimum": 0, "maximum": 9},
        },
        "required": ["word", "n"],
        "additionalProperties": False,
    }
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    budget = schema_budget({"word": "", "n": 0}, 5)  # random sampling: any characters, any tokens
    for seed in range(3):
        body = chat_body("hello", max_tokens=budget, temperature=1.0, seed=seed, response_format=response_format)
        data = httpx.post(mlx_server.url + "/v1/chat/completions", json=body, timeout=DEADLINE_S).json()
        choice = data["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        jsonschema.validate(json.loads(choice["message"]["content"]), schema)
