"""Remote tiers over real upstream processes on loopback: other llmservice servers over fakes
(tests/processes.py), killed or frozen while requests are in flight, and the OpenAI SDK and LangChain
streaming, calling tools and getting structured output through a remote tier. The front is our app
on a real uvicorn."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from pydantic import BaseModel

from config import load_settings
from remote.chat import load_remote_chat
from server import create_app
from tests.conftest import FAKE_ENV, LiveServer
from tests.processes import ServerProcess
from tests.waiting import DEADLINE_S, wait_for

Upstreams = Callable[..., list[ServerProcess]]
Front = Callable[..., LiveServer]


@pytest.fixture
def upstreams(tmp_path: Path, processes: list[Any]) -> Upstreams:
    """Start `count` llmservice processes over fakes; each serves its light tier (the fake echo model)."""

    def start(count: int, **env: str) -> list[ServerProcess]:
        started = []
        for i in range(count):
            workdir = tmp_path / f"upstream-{len(processes)}-{i}"
            workdir.mkdir()
            process = ServerProcess(workdir, LIGHT_MAX_QUEUE="64", LIGHT_MAX_TOKENS="512", **env)
            processes.append(process)
            started.append(process)
        for process in started:
            process.wait_port()
        return started

    return start


@pytest.fixture
def front() -> Iterator[Front]:
    """Our server, its MEDIUM tier served by the given upstreams' light tier."""
    servers: list[LiveServer] = []

    def start(urls: list[str], **extra: str) -> LiveServer:
        env = {**FAKE_ENV, "MEDIUM_MODEL_PATH": "", "MEDIUM_UPSTREAMS": ",".join(urls)}
        env["MEDIUM_UPSTREAM_MODEL"] = "light"
        live = LiveServer(create_app(load_settings({**env, **extra}), {"turns:remote": load_remote_chat}))
        servers.append(live.__enter__())
        return live

    yield start
    for live in servers:
        live.__exit__()


def base(process: ServerProcess) -> str:
    return f"{process.url}/v1"


def post_chat(live: LiveServer, content: str, **extra: Any) -> httpx.Response:
    body = {"model": "medium", "messages": [{"role": "user", "content": content}], **extra}
    return httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=DEADLINE_S)


def medium(live: LiveServer) -> dict[str, Any]:
    return httpx.get(f"{live.url}/health").json()["tiers"]["medium"]


# ---------------------------------------------------------------- an upstream dies or freezes


def test_40_concurrent_requests_survive_an_upstream_killed_under_them(
    upstreams: Upstreams, front: Front, tmp_path: Path
) -> None:
    doomed, survivor = upstreams(2)
    live = front([base(doomed), base(survivor)], MEDIUM_RETRIES="2")
    release = tmp_path / "release"
    prompt = f"HOLD:{release} hi"  # the fake models hold every step until the file exists
    with ThreadPoolExecutor(40) as threads:
        futures = [threads.submit(post_chat, live, prompt) for _ in range(40)]
        wait_for(lambda: [u["in_flight"] for u in medium(live)["upstreams"]] == [20, 20], "20 in flight on each")
        doomed.proc.kill()  # SIGKILL: its 20 connections drop before any of their first events
        doomed.wait()
        release.touch()
        responses = [future.result() for future in futures]
    assert [r.status_code for r in responses] == [200] * 40  # zero failures
    assert {r.json()["choices"][0]["message"]["content"] for r in responses} == {f"echo: {prompt}"}
    assert {r.headers["x-upstream"] for r in responses} == {base(survivor)}
    dead, alive = medium(live)["upstreams"]
    assert dead["failures"] == 20 and dead["breaker"] == "open"
    assert alive["requests"] == 40 and alive["retries"] == 20 and alive["failures"] == 0


def test_a_frozen_upstream_costs_one_request_its_first_byte_timeout(upstreams: Upstreams, front: Front) -> None:
    frozen, healthy = upstreams(2)
    live = front(
        [base(frozen), base(healthy)],
        MEDIUM_FIRST_BYTE_TIMEOUT="2",
        MEDIUM_BREAKER_FAILURES="1",
        MEDIUM_BREAKER_COOLDOWN="3600",
    )
    frozen.signal(signal.SIGSTOP)  # its socket still accepts (the kernel's backlog); it never answers
    try:
        responses = [post_chat(live, f"SAY:answer {i}") for i in range(10)]
        stuck, fine = medium(live)["upstreams"]
    finally:
        frozen.signal(signal.SIGCONT)
    assert [r.status_code for r in responses] == [200] * 10
    assert [r.json()["choices"][0]["message"]["content"] for r in responses] == [f"answer {i}" for i in range(10)]
    assert stuck["requests"] == 1 and stuck["failures"] == 1  # one request waited for it, once
    assert stuck["breaker"] == "open" and "no first event within 2s" in stuck["last_error"]
    assert fine["requests"] == 10 and fine["retries"] == 1  # then it was skipped: nobody else waited


# ---------------------------------------------------------------- clients through a remote tier

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CALL = '{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}'


class Person(BaseModel):
    name: str
    age: int


class GetWeather(BaseModel):
    """Weather for a city."""

    city: str


@pytest.fixture
def remote_tier(upstreams: Upstreams, front: Front) -> LiveServer:
    (upstream,) = upstreams(1)
    return front([base(upstream)])


def test_openai_sdk_streams_calls_tools_and_parses_through_a_remote_tier(remote_tier: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{remote_tier.url}/v1", api_key="x", max_retries=0)
    user = "user"  # the SDK's typed message dicts
    stream = client.chat.completions.create(
        model="medium",
        messages=[{"role": user, "content": "SAY:streamed from afar"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "streamed from afar" and chunks[-1].usage is not None

    called = client.chat.completions.create(
        model="medium", messages=[{"role": user, "content": "SAY:" + CALL}], tools=[WEATHER]
    )
    (call,) = called.choices[0].message.tool_calls or []
    assert called.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}

    deltas = client.chat.completions.create(
        model="medium", messages=[{"role": user, "content": "SAY:" + CALL}], tools=[WEATHER], stream=True
    )
    fragments = [tc for c in deltas if c.choices for tc in c.choices[0].delta.tool_calls or []]
    assert fragments[0].function is not None and fragments[0].function.name == "get_weather"
    arguments = "".join(f.function.arguments or "" for f in fragments if f.function)
    assert json.loads(arguments) == {"city": "Paris"}

    parsed = client.chat.completions.parse(
        model="medium", messages=[{"role": user, "content": 'SAY:{"name": "Ann", "age": 30}'}], response_format=Person
    )
    assert parsed.choices[0].message.parsed == Person(name="Ann", age=30)


def test_langchain_streams_calls_tools_and_structures_through_a_remote_tier(remote_tier: LiveServer) -> None:
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(model="medium", base_url=f"{remote_tier.url}/v1", api_key="x", max_retries=0)
    pieces = [chunk.content for chunk in llm.stream("SAY:hello from langchain")]
    assert "".join(str(p) for p in pieces) == "hello from langchain" and len(pieces) > 1

    call = '{"tool_calls": [{"name": "GetWeather", "arguments": {"city": "Oslo"}}]}'
    message = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke("SAY:" + call)
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("GetWeather", {"city": "Oslo"})]

    person = llm.with_structured_output(Person, method="json_schema").invoke('SAY:{"name": "Bo", "age": 41}')
    assert person == Person(name="Bo", age=41)
    as_call = '{"tool_calls": [{"name": "Person", "arguments": {"name": "Cy", "age": 7}}]}'
    assert llm.with_structured_output(Person, method="function_calling").invoke("SAY:" + as_call) == Person(
        name="Cy", age=7
    )
