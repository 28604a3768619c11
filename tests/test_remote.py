"""Remote chat tiers: a tier served by a pool of upstream servers on loopback (fault-injecting stand-ins
from tests/upstreams.py, and another llmservice built over fakes), through the real routes."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from config import load_settings
from remote.chat import RemoteChat, load_remote_chat
from server import create_app
from tests.conftest import FAKE_ENV, LiveServer
from tests.fakes import FakeRegistry
from tests.upstreams import StandIn, build
from tests.waiting import DEADLINE_S, wait_for

StartUpstream = Callable[[str], tuple[StandIn, str]]
Front = Callable[..., TestClient]


@pytest.fixture
def upstream() -> Iterator[StartUpstream]:
    """Start a stand-in upstream on 127.0.0.1: returns it and its base URL (…/v1)."""
    servers: list[LiveServer] = []

    def start(name: str) -> tuple[StandIn, str]:
        stand_in = StandIn(name)
        live = LiveServer(build(stand_in)).__enter__()
        servers.append(live)
        return stand_in, f"{live.url}/v1"

    yield start
    for live in servers:
        live.__exit__()


@pytest.fixture
def dead_url() -> Iterator[str]:
    """A loopback port that refuses connections (bound, never listening, so nobody else takes it)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    sock.close()


@pytest.fixture
def front() -> Iterator[Front]:
    """Our server with MEDIUM served by the given upstreams (extra keys override)."""
    clients: list[TestClient] = []

    def build_front(urls: list[str], remote: Callable[..., Any] = load_remote_chat, **extra: str) -> TestClient:
        env = {**FAKE_ENV, "MEDIUM_MODEL_PATH": "", "MEDIUM_UPSTREAMS": ",".join(urls), **extra}
        env.setdefault("MEDIUM_UPSTREAM_MODEL", "upstream-model")
        factories = {**FakeRegistry().factories(), "turns:remote": remote}
        client = TestClient(create_app(load_settings(env), factories), base_url="http://localhost")
        client.__enter__()
        clients.append(client)
        return client

    yield build_front
    for client in clients:
        client.__exit__(None, None, None)


def chat(client: TestClient, content: str, **extra: Any) -> httpx.Response:
    body = {"model": "medium", "messages": [{"role": "user", "content": content}], **extra}
    return client.post("/v1/chat/completions", json=body)


def sse_events(response: httpx.Response) -> list[Any]:
    lines = [line[len("data: ") :] for line in response.text.splitlines() if line.startswith("data: ")]
    return [line if line == "[DONE]" else json.loads(line) for line in lines]


def streamed_text(events: list[Any]) -> list[str]:
    return [
        e["choices"][0]["delta"]["content"]
        for e in events
        if isinstance(e, dict) and e.get("choices") and e["choices"][0]["delta"].get("content")
    ]


def pool_status(client: TestClient) -> list[dict[str, Any]]:
    return client.get("/health").json()["tiers"]["medium"]["upstreams"]


# ---------------------------------------------------------------- pass-through


def test_a_stream_passes_through_piece_by_piece_in_order(upstream: StartUpstream, front: Front) -> None:
    gpu, url = upstream("gpu")
    client = front([url])
    response = chat(client, "SAY:abcdefghi", stream=True, user="u7", stream_options={"include_usage": True})
    assert response.status_code == 200, response.text
    assert response.headers["x-tier"] == "medium"
    events = sse_events(response)
    assert streamed_text(events) == ["abc", "def", "ghi"]  # the upstream's chunk boundaries
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    (sent,) = gpu.requests
    assert sent["model"] == "upstream-model" and sent["stream"] is True and sent["user"] == "u7"
    assert sent["messages"] == [{"role": "user", "content": "SAY:abcdefghi"}]


def test_a_whole_answer_and_its_usage_come_from_the_upstream(upstream: StartUpstream, front: Front) -> None:
    _, url = upstream("gpu")
    client = front([url])
    body = chat(client, "hello", max_tokens=9).json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "gpu: hello"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert body["model"] == "medium"


def test_an_empty_answer_is_an_answer(upstream: StartUpstream, front: Front) -> None:
    _, url = upstream("gpu")
    client = front([url])
    response = chat(client, "SAY:")  # the upstream's first event is its finish: not a stream that died
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == ""


def test_text_completions_with_several_choices(upstream: StartUpstream, front: Front) -> None:
    gpu, url = upstream("gpu")
    client = front([url])
    body = {"model": "medium", "prompt": "SAY:xyz", "n": 2, "echo": True}
    answer = client.post("/v1/completions", json=body).json()
    assert [c["text"] for c in answer["choices"]] == ["SAY:xyzxyz", "SAY:xyzxyz"]  # echoed here, not upstream
    assert [c["finish_reason"] for c in answer["choices"]] == ["length", "length"]
    assert answer["usage"]["completion_tokens"] == 6
    assert "echo" not in gpu.requests[0]


def test_tools_go_upstream_and_its_calls_come_back(upstream: StartUpstream, front: Front) -> None:
    gpu, url = upstream("gpu")
    client = front([url])
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    response = chat(client, "weather?", tools=tools, tool_choice="auto")
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["id"] == "call_up1" and call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    sent = gpu.requests[0]
    assert sent["tools"][0]["function"]["name"] == "get_weather" and sent["tool_choice"] == "auto"
    assert "You can call these functions" not in json.dumps(sent["messages"])  # no local tool prompt
    streamed = sse_events(chat(client, "weather?", tools=tools, stream=True))
    deltas = [e["choices"][0]["delta"] for e in streamed if isinstance(e, dict) and e.get("choices")]
    assert any("tool_calls" in d for d in deltas) and streamed[-1] == "[DONE]"


def test_logprobs_and_response_format_go_upstream(upstream: StartUpstream, front: Front) -> None:
    gpu, url = upstream("gpu")
    client = front([url])
    schema = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}
    assert chat(client, "hi", logprobs=True, response_format=schema).status_code == 200
    assert gpu.requests[0]["logprobs"] is True
    assert gpu.requests[0]["response_format"] == schema


def test_a_cache_hit_on_a_remote_tier_asks_no_upstream(upstream: StartUpstream, front: Front) -> None:
    gpu, url = upstream("gpu")
    client = front([url])
    first = chat(client, "SAY:cached words", temperature=0)
    assert first.headers["x-cache"] == "MISS"
    replay = chat(client, "SAY:cached words", temperature=0, stream=True)
    assert replay.headers["x-cache"] == "HIT"
    assert "".join(streamed_text(sse_events(replay))) == "cached words"
    assert len(gpu.requests) == 1
    again = chat(client, "SAY:cached words", temperature=0)
    assert again.headers["x-cache"] == "HIT"
    assert again.json()["usage"] == first.json()["usage"]  # the upstream's prompt count, recorded at its end
    assert first.json()["usage"]["prompt_tokens"] > 0


def test_the_upstreams_client_errors_pass_through_and_are_not_retried(upstream: StartUpstream, front: Front) -> None:
    first, first_url = upstream("first")
    second, second_url = upstream("second")
    first.status, first.error_code = 400, "context_length_exceeded"
    client = front([first_url, second_url])
    response = chat(client, "too long")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert response.json()["error"]["message"] == "first refuses"
    assert second.requests == []


# ---------------------------------------------------------------- failover before the first byte


def test_a_dead_port_fails_over(upstream: StartUpstream, front: Front, dead_url: str) -> None:
    _, url = upstream("alive")
    client = front([dead_url, url])
    for _ in range(4):
        response = chat(client, "hello")
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "alive: hello"
    dead = pool_status(client)[0]
    assert dead["failures"] >= 1 and "ConnectError" in dead["last_error"]


def test_a_503_before_the_first_byte_fails_over(upstream: StartUpstream, front: Front) -> None:
    busy, busy_url = upstream("busy")
    spare, spare_url = upstream("spare")
    busy.status = 503
    client = front([busy_url, spare_url])
    events = sse_events(chat(client, "SAY:abc", stream=True))
    assert streamed_text(events) == ["a", "b", "c"] and events[-1] == "[DONE]"
    assert len(busy.requests) == 1 and len(spare.requests) == 1


def test_a_429_keeps_the_upstream_out_until_its_retry_after(upstream: StartUpstream, front: Front) -> None:
    limited, limited_url = upstream("limited")
    _, spare_url = upstream("spare")
    limited.status, limited.retry_after = 429, "3600"
    client = front([limited_url, spare_url])
    for _ in range(4):
        assert chat(client, "hi").status_code == 200
    assert len(limited.requests) == 1


def test_a_stream_that_stalls_before_its_first_event_fails_over(upstream: StartUpstream, front: Front) -> None:
    stalled, stalled_url = upstream("stalled")
    spare, spare_url = upstream("spare")
    stalled.stall_before_first = True
    client = front([stalled_url, spare_url], MEDIUM_FIRST_BYTE_TIMEOUT="1")
    events = sse_events(chat(client, "SAY:abc", stream=True))
    assert streamed_text(events) == ["a", "b", "c"] and events[-1] == "[DONE]"
    assert "no first event" in pool_status(client)[0]["last_error"]


def test_an_error_event_before_the_first_piece_fails_over(upstream: StartUpstream, front: Front) -> None:
    snag, snag_url = upstream("snag")
    _, spare_url = upstream("spare")
    snag.error_event_first = True
    client = front([snag_url, spare_url])
    assert chat(client, "hi").json()["choices"][0]["message"]["content"] == "spare: hi"


def test_when_every_upstream_fails_the_answer_is_503_with_retry_after(
    upstream: StartUpstream, front: Front, dead_url: str
) -> None:
    busy, busy_url = upstream("busy")
    busy.status = 503
    client = front([dead_url, busy_url])
    response = chat(client, "hi", stream=True)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "upstream_unavailable"
    assert int(response.headers["retry-after"]) >= 1
    assert "HTTP 503" in response.json()["error"]["message"]


# ---------------------------------------------------------------- after the first byte: no retry


def test_death_mid_stream_is_one_error_event_and_no_done(upstream: StartUpstream, front: Front) -> None:
    dying, dying_url = upstream("dying")
    spare, spare_url = upstream("spare")
    dying.die_after_first = True
    client = front([dying_url, spare_url])  # the first pick is the first upstream
    events = sse_events(chat(client, "SAY:abcdef", stream=True))
    assert streamed_text(events) == ["ab"]
    assert "[DONE]" not in events
    errors = [e for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "upstream_error"
    assert spare.requests == []  # never retried once our client had bytes


def test_a_stream_that_stalls_after_its_first_event_ends_with_one_error(upstream: StartUpstream, front: Front) -> None:
    stalled, url = upstream("stalled")
    stalled.stall_after_first = True
    client = front([url], MEDIUM_STREAM_IDLE_TIMEOUT="0.5")
    events = sse_events(chat(client, "SAY:abcdef", stream=True))
    assert streamed_text(events) == ["ab"]
    assert "[DONE]" not in events and "silent" in events[-1]["error"]["message"]


def test_a_whole_answer_that_breaks_midway_is_an_error_response(upstream: StartUpstream, front: Front) -> None:
    dying, url = upstream("dying")
    dying.die_after_first = True
    response = chat(front([url]), "SAY:abcdef")
    assert response.status_code == 502 and response.json()["error"]["code"] == "upstream_error"


# ---------------------------------------------------------------- balancing and breakers


def test_concurrent_requests_spread_by_least_in_flight(upstream: StartUpstream) -> None:
    gate = threading.Event()
    stand_ins = [upstream(name) for name in ("one", "two")]
    for stand_in, _ in stand_ins:
        stand_in.gate = gate
    urls = ",".join(url for _, url in stand_ins)
    env = {**FAKE_ENV, "MEDIUM_MODEL_PATH": "", "MEDIUM_UPSTREAMS": urls, "MEDIUM_UPSTREAM_MODEL": "m"}
    app = create_app(load_settings(env), {"turns:remote": load_remote_chat})
    with LiveServer(app) as live, ThreadPoolExecutor(20) as pool:
        body = {"model": "medium", "messages": [{"role": "user", "content": "hi"}]}
        futures = [
            pool.submit(httpx.post, f"{live.url}/v1/chat/completions", json=body, timeout=DEADLINE_S) for _ in range(20)
        ]
        wait_for(lambda: sum(s.held for s, _ in stand_ins) == 20, "20 requests held by the upstreams")
        counts = [len(s.requests) for s, _ in stand_ins]
        gate.set()
        assert all(f.result().status_code == 200 for f in futures)
    assert counts == [10, 10]  # counted at pick time: each request saw the ones before it


def test_the_breaker_opens_then_one_probe_closes_it(upstream: StartUpstream, front: Front) -> None:
    flaky, flaky_url = upstream("flaky")
    steady, steady_url = upstream("steady")
    flaky.status = 503
    now = [0.0]
    client = front(
        [flaky_url, steady_url],
        remote=lambda tier, settings: RemoteChat(tier, clock=lambda: now[0]),
        MEDIUM_BREAKER_FAILURES="2",
        MEDIUM_BREAKER_COOLDOWN="30",
    )
    for _ in range(8):
        assert chat(client, "hi").status_code == 200
    assert len(flaky.requests) == 2  # two faults opened it; then it was skipped
    assert pool_status(client)[0]["breaker"] == "open"
    flaky.status = None
    now[0] = 31.0  # the cooldown is over: one probe may go
    answers = [chat(client, "hi").json()["choices"][0]["message"]["content"] for _ in range(4)]
    assert "flaky: hi" in answers
    assert pool_status(client)[0]["breaker"] == "closed"


def test_a_failed_probe_reopens_the_breaker_for_twice_as_long(upstream: StartUpstream, front: Front) -> None:
    flaky, flaky_url = upstream("flaky")
    _, steady_url = upstream("steady")
    flaky.status = 503
    now = [0.0]
    client = front(
        [flaky_url, steady_url],
        remote=lambda tier, settings: RemoteChat(tier, clock=lambda: now[0]),
        MEDIUM_BREAKER_FAILURES="1",
        MEDIUM_BREAKER_COOLDOWN="10",
    )
    for _ in range(3):
        assert chat(client, "hi").status_code == 200
    assert len(flaky.requests) == 1
    now[0] = 10.0
    for _ in range(3):
        assert chat(client, "hi").status_code == 200
    assert len(flaky.requests) == 2  # one probe, which failed
    now[0] = 25.0  # 15 s after the probe: the cooldown is now 20 s
    assert chat(client, "hi").status_code == 200
    assert len(flaky.requests) == 2
    assert pool_status(client)[0]["retry_in_seconds"] == 5.0


# ---------------------------------------------------------------- an llmservice upstream, health, config


def test_another_llmservice_instance_is_an_upstream(front: Front) -> None:
    registry = FakeRegistry()
    upstream_app = create_app(load_settings(FAKE_ENV), registry.factories())
    with LiveServer(upstream_app) as live:
        client = front([f"{live.url}/v1"], MEDIUM_UPSTREAM_MODEL="light")
        events = sse_events(chat(client, "from afar", stream=True))
        assert "".join(streamed_text(events)) == "echo: from afar" and events[-1] == "[DONE]"
        body = chat(client, "again").json()
        assert body["choices"][0]["message"]["content"] == "echo: again"
        assert body["usage"]["prompt_tokens"] > 0
        models = client.get("/v1/models").json()["data"]
        assert "medium/light" in [m["id"] for m in models]


def test_the_upstream_model_is_discovered_when_it_serves_one(upstream: StartUpstream, front: Front) -> None:
    gpu, url = upstream("gpu")
    gpu.models = ("Qwen/Qwen2.5-7B-Instruct",)
    client = front([url], MEDIUM_UPSTREAM_MODEL="")
    assert chat(client, "hi").status_code == 200
    assert gpu.requests[0]["model"] == "Qwen/Qwen2.5-7B-Instruct"
    gpu.models = ("a", "b")
    other = front([url], MEDIUM_UPSTREAM_MODEL="")
    response = chat(other, "hi")
    assert response.status_code == 503 and "MEDIUM_UPSTREAM_MODEL" in response.json()["error"]["message"]


def test_health_and_admin_show_each_upstream(upstream: StartUpstream, front: Front, dead_url: str) -> None:
    _, url = upstream("gpu")
    client = front([dead_url, url])
    assert chat(client, "hi").status_code == 200
    dead, alive = pool_status(client)
    assert dead["url"] == dead_url and dead["failures"] == 1 and dead["breaker"] == "closed"
    assert alive["requests"] == 1 and alive["in_flight"] == 0 and alive["last_error"] is None
    admin = client.get("/admin/status").json()["tiers"]["medium"]
    assert [u["url"] for u in admin["upstreams"]] == [dead_url, url]


@pytest.mark.parametrize(
    ("env", "model_id", "urls"),
    [
        ({"LIGHT_MODEL_PATH": "http://127.0.0.1:9000/v1"}, "light/remote", ("http://127.0.0.1:9000/v1",)),
        (
            {"LIGHT_UPSTREAMS": "http://a:1/v1, http://b:2/v1/", "LIGHT_UPSTREAM_MODEL": "qwen"},
            "light/qwen",
            ("http://a:1/v1", "http://b:2/v1"),
        ),
        ({"LIGHT_BASE_URL": "https://x/v1", "LIGHT_BACKEND": "remote"}, "light/remote", ("https://x/v1",)),
    ],
)
def test_remote_tiers_in_the_config(env: Mapping[str, str], model_id: str, urls: tuple[str, ...]) -> None:
    light = load_settings(env).tiers["light"]
    assert (light.backend, light.model_id, light.upstream_urls) == ("remote", model_id, urls)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LIGHT_UPSTREAMS": "gpu1:8000"}, "LIGHT_UPSTREAMS has value 'gpu1:8000': an upstream is an http(s)://"),
        ({"LIGHT_MODEL_PATH": "/m/a.gguf", "LIGHT_UPSTREAMS": "http://a/v1"}, "set LIGHT_BACKEND=remote"),
        ({"LIGHT_BACKEND": "remote", "LIGHT_MODEL_PATH": ""}, "LIGHT_BACKEND is 'remote' but no upstream"),
        ({"EMBEDDING_UPSTREAMS": "http://a", "EMBEDDING_UPSTREAM_API": "grpc"}, "EMBEDDING_UPSTREAM_API has value"),
    ],
)
def test_bad_remote_settings_name_the_variable(env: Mapping[str, str], message: str) -> None:
    from config import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(env)


def test_the_readme_example_configures_remote_tiers() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = readme.split("## Remote tiers", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    env = dict(line.split("#", 1)[0].strip().split("=", 1) for line in block.splitlines() if "=" in line.split("#")[0])
    tiers = load_settings(env).tiers
    assert {name: tiers[name].backend for name in ("heavy", "embedding", "reranker")} == dict.fromkeys(
        ("heavy", "embedding", "reranker"), "remote"
    )
    assert tiers["heavy"].model_id == "heavy/Qwen/Qwen2.5-72B-Instruct"
    assert tiers["heavy"].upstream_urls == ("http://gpu1:8000/v1", "http://gpu2:8000/v1")
    assert tiers["light"].backend == "llamacpp"  # untouched tiers keep their defaults


def test_unloading_the_tier_ends_a_stream_in_flight_with_one_error(upstream: StartUpstream) -> None:
    stalled, url = upstream("stalled")
    stalled.stall_after_first = True
    env = {**FAKE_ENV, "MEDIUM_MODEL_PATH": "", "MEDIUM_UPSTREAMS": url, "MEDIUM_UPSTREAM_MODEL": "m"}
    app = create_app(load_settings(env), {"turns:remote": load_remote_chat})
    with LiveServer(app) as live, ThreadPoolExecutor(1) as pool:
        body = {"model": "medium", "messages": [{"role": "user", "content": "SAY:abcdef"}], "stream": True}
        streamed = pool.submit(httpx.post, f"{live.url}/v1/chat/completions", json=body, timeout=DEADLINE_S)
        health = lambda: httpx.get(f"{live.url}/health").json()["tiers"]["medium"]  # noqa: E731
        wait_for(lambda: health().get("active") == 1, "the stream in flight")
        assert httpx.post(f"{live.url}/admin/tiers/medium/unload?force=true").status_code == 200
        events = sse_events(streamed.result())
    assert streamed_text(events) == ["ab"] and "[DONE]" not in events
    assert events[-1]["error"]["code"] == "request_cancelled"


# ---------------------------------------------------------------- session affinity


def test_the_same_user_reaches_the_same_upstream(upstream: StartUpstream, front: Front) -> None:
    stand_ins = [upstream(name) for name in ("a", "b", "c")]
    client = front([url for _, url in stand_ins], MEDIUM_LB_POLICY="session")
    answers = {chat(client, "hi", user="alice").json()["choices"][0]["message"]["content"] for _ in range(20)}
    assert len(answers) == 1  # one upstream, 20 times in a row
    served = {chat(client, "hi", user=f"user-{i}").json()["choices"][0]["message"]["content"] for i in range(12)}
    assert len(served) > 1  # different conversations spread
    home = next(s for s, _ in stand_ins if f"{s.name}: hi" in answers)
    home.status = 503  # its upstream is out: the next in rendezvous order, every time
    fallback = {chat(client, "hi", user="alice").json()["choices"][0]["message"]["content"] for _ in range(5)}
    assert len(fallback) == 1 and fallback != answers


def test_rendezvous_picks_agree_across_replicas() -> None:
    from remote.pool import Pool

    urls = [f"http://gpu{i}:8000/v1" for i in range(5)]
    one, other = Pool(urls, policy="session"), Pool(list(reversed(urls)), policy="session")
    for key in (f"session-{i}" for i in range(50)):
        first, second = one.pick(key=key), other.pick(key=key)
        assert first is not None and second is not None
        assert first.upstream.url == second.upstream.url  # no shared state needed
        first.finish("ok")
        second.finish("ok")


# ---------------------------------------------------------------- spill-over


def test_a_spillover_tier_answers_a_burst_beyond_its_queue(upstream: StartUpstream, tmp_path: Path) -> None:
    gpu, url = upstream("gpu")
    release = tmp_path / "release"
    env = {**FAKE_ENV, "LIGHT_MAX_QUEUE": "0", "LIGHT_SPILLOVER_UPSTREAMS": url, "LIGHT_UPSTREAM_MODEL": "m"}
    app = create_app(load_settings(env), FakeRegistry().factories())
    with LiveServer(app) as live, ThreadPoolExecutor(8) as pool:
        body = {"model": "light", "messages": [{"role": "user", "content": f"HOLD:{release} hi"}]}
        futures = [
            pool.submit(httpx.post, f"{live.url}/v1/chat/completions", json=body, timeout=DEADLINE_S) for _ in range(8)
        ]
        wait_for(lambda: gpu.requests, "a request spilled over")
        release.touch()  # the local model may go on
        responses = [future.result() for future in futures]
        status = httpx.get(f"{live.url}/health").json()["tiers"]["light"]
    assert [r.status_code for r in responses] == [200] * 8  # zero 503s
    answers = [r.json()["choices"][0]["message"]["content"] for r in responses]
    spilled = [a for a in answers if a.startswith("gpu: ")]
    assert 1 <= len(spilled) < 8 and len(spilled) == len(gpu.requests) == status["spilled"]
    assert status["upstreams"][0]["requests"] == len(spilled)


def test_spillover_is_for_local_chat_tiers() -> None:
    from config import ConfigError

    with pytest.raises(ConfigError, match="EMBEDDING_SPILLOVER_UPSTREAMS has value 'http://a/v1': spill-over is for"):
        load_settings({"EMBEDDING_SPILLOVER_UPSTREAMS": "http://a/v1"})
