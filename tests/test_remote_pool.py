"""Remote pools beyond the basics: what passes through (logprobs, fields our schema does not know), what
is visible (X-Upstream, per-upstream metrics, /health degraded), weights, the per-upstream in-flight
cap and active health probes. Upstreams are the stand-ins of tests/upstreams.py and another llmservice
over fakes, on loopback; the front is our real app."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from config import ConfigError, load_settings
from remote.chat import RemoteChat, load_remote_chat
from remote.health import HealthProber, verdict
from remote.pool import Pool
from server import create_app
from tests import test_remote
from tests.conftest import FAKE_ENV, LiveServer
from tests.fakes import FakeRegistry
from tests.test_remote import Front, StartUpstream, chat, pool_status, sse_events
from tests.waiting import DEADLINE_S, wait_for

upstream, front, dead_url = test_remote.upstream, test_remote.front, test_remote.dead_url  # its fixtures

# ---------------------------------------------------------------- pass-through


def test_logprobs_come_back_streamed_and_whole(upstream: StartUpstream, front: Front) -> None:
    _, url = upstream("gpu")
    client = front([url])
    events = sse_events(chat(client, "SAY:abcdef", stream=True, logprobs=True, top_logprobs=2))
    pieces = [e["choices"][0] for e in events if isinstance(e, dict) and e.get("choices")]
    carried = [c["logprobs"]["content"][0]["token"] for c in pieces if c.get("logprobs")]
    assert carried == ["ab", "cd", "ef"]  # each chunk's own, as the upstream sent them
    whole = chat(client, "SAY:abcdef", logprobs=True).json()["choices"][0]
    assert [t["token"] for t in whole["logprobs"]["content"]] == ["ab", "cd", "ef"]  # joined in order
    assert chat(client, "SAY:abc").json()["choices"][0]["logprobs"] is None  # not asked: none


def test_completion_logprobs_are_joined_per_field(upstream: StartUpstream, front: Front) -> None:
    _, url = upstream("gpu")
    client = front([url])
    body = {"model": "medium", "prompt": "SAY:xyz", "logprobs": 1}
    (choice,) = client.post("/v1/completions", json=body).json()["choices"]
    assert choice["logprobs"] == {
        "tokens": ["x", "y", "z"],
        "token_logprobs": [-0.25, -0.25, -0.25],
        "top_logprobs": [None, None, None],
    }


def test_an_answer_with_logprobs_is_not_cached(upstream: StartUpstream, front: Front) -> None:
    gpu, url = upstream("gpu")
    client = front([url])
    for _ in range(2):
        response = chat(client, "SAY:abc", temperature=0, logprobs=True)
        assert response.json()["choices"][0]["logprobs"] is not None
        assert "x-cache" not in response.headers  # a replay could not bring the logprobs back
    assert len(gpu.requests) == 2
    completion = {"model": "medium", "prompt": "SAY:abc", "temperature": 0, "logprobs": 0}  # 0: still asked
    for _ in range(2):
        assert "x-cache" not in client.post("/v1/completions", json=completion).headers
    assert len(gpu.requests) == 4


def test_fields_our_schema_does_not_know_reach_the_upstream(upstream: StartUpstream, front: Front) -> None:
    gpu, url = upstream("gpu")
    client = front([url])
    extras = {"min_tokens": 4, "guided_json": {"type": "object"}, "chat_template_kwargs": {"enable_thinking": False}}
    assert chat(client, "hi", **extras).status_code == 200
    sent = gpu.requests[0]
    assert {k: sent[k] for k in extras} == extras
    completion = {"model": "medium", "prompt": "SAY:x", "ignore_eos": True}
    assert client.post("/v1/completions", json=completion).status_code == 200
    assert gpu.requests[1]["ignore_eos"] is True


def test_unknown_fields_are_part_of_the_cache_key(upstream: StartUpstream, front: Front) -> None:
    gpu, url = upstream("gpu")
    client = front([url])
    assert chat(client, "SAY:a", temperature=0, min_tokens=2).headers["x-cache"] == "MISS"
    assert chat(client, "SAY:a", temperature=0, min_tokens=3).headers["x-cache"] == "MISS"  # another answer
    assert chat(client, "SAY:a", temperature=0, min_tokens=2).headers["x-cache"] == "HIT"
    assert len(gpu.requests) == 2


def test_a_local_tier_ignores_unknown_fields(client: Any) -> None:
    body = {"model": "light", "messages": [{"role": "user", "content": "SAY:ok"}], "guided_json": {"x": 1}}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "ok"
    assert "x-upstream" not in response.headers


# ---------------------------------------------------------------- a whole answer fails over until it is complete


@pytest.mark.parametrize("fault", ["die_after_first", "stall_after_first", "error_after_first"])
def test_a_whole_answer_that_breaks_midway_moves_to_another_upstream(
    upstream: StartUpstream, front: Front, fault: str
) -> None:
    broken, broken_url = upstream("broken")
    spare, spare_url = upstream("spare")
    setattr(broken, fault, True)
    client = front([broken_url, spare_url], MEDIUM_STREAM_IDLE_TIMEOUT="0.5")
    response = chat(client, "SAY:abcdef")  # our client has no byte until the answer is whole
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "abcdef"  # the spare's, not "ab" + the rest
    assert response.headers["x-upstream"] == spare_url
    assert len(broken.requests) == 1 and len(spare.requests) == 1
    broken_status = pool_status(client)[0]
    assert broken_status["failures"] == 1 and broken_status["in_flight"] == 0


def test_a_stream_that_breaks_midway_is_not_retried(upstream: StartUpstream, front: Front) -> None:
    broken, broken_url = upstream("broken")
    spare, spare_url = upstream("spare")
    broken.die_after_first = True
    events = sse_events(chat(front([broken_url, spare_url]), "SAY:abcdef", stream=True))
    assert "[DONE]" not in events and events[-1]["error"]["code"] == "upstream_error"
    assert spare.requests == []  # our client had bytes already


# ---------------------------------------------------------------- visible


def test_x_upstream_names_the_upstream_that_served(upstream: StartUpstream, front: Front, dead_url: str) -> None:
    _, url = upstream("alive")
    secret_url = url.replace("http://", "http://user:secret@")
    client = front([dead_url, secret_url])
    for stream in (False, True):
        response = chat(client, "SAY:hi", stream=stream)
        assert response.status_code == 200
        assert response.headers["x-upstream"] == url  # after failover; credentials never shown
    first = chat(client, "SAY:cached", temperature=0)
    assert first.headers["x-cache"] == "MISS" and first.headers["x-upstream"] == url
    hit = chat(client, "SAY:cached", temperature=0)
    assert hit.headers["x-cache"] == "HIT" and "x-upstream" not in hit.headers  # no upstream served it


def metric(text: str, name: str, upstream_url: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and f'upstream="{upstream_url}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} for {upstream_url} not in /metrics")


def test_prometheus_series_per_upstream(upstream: StartUpstream, front: Front) -> None:
    busy, busy_url = upstream("busy")
    _, spare_url = upstream("spare")
    busy.status = 503
    client = front([busy_url, spare_url], MEDIUM_LB_POLICY="round_robin", MEDIUM_BREAKER_FAILURES="10")
    for _ in range(4):
        assert chat(client, "hi").status_code == 200
    text = client.get("/metrics").text
    assert metric(text, "llmservice_upstream_requests_total", busy_url) == 2  # round robin: every other first pick
    assert metric(text, "llmservice_upstream_failures_total", busy_url) == 2
    assert metric(text, "llmservice_upstream_requests_total", spare_url) == 4
    assert metric(text, "llmservice_upstream_retries_total", spare_url) == 2  # the two moved over from busy
    assert metric(text, "llmservice_upstream_in_flight", spare_url) == 0
    assert metric(text, "llmservice_upstream_attempt_seconds_count", spare_url) == 4
    assert metric(text, "llmservice_upstream_breaker_open", busy_url) == 0


def test_health_is_degraded_while_every_breaker_is_open(upstream: StartUpstream, front: Front) -> None:
    one, one_url = upstream("one")
    two, two_url = upstream("two")
    one.status = two.status = 503
    now = [0.0]
    client = front(
        [one_url, two_url],
        remote=lambda tier, settings: RemoteChat(tier, clock=lambda: now[0]),
        MEDIUM_BREAKER_FAILURES="1",
        MEDIUM_BREAKER_COOLDOWN="30",
    )
    assert chat(client, "hi").status_code == 503
    health = client.get("/health").json()
    assert health["status"] == "degraded" and health["tiers"]["medium"]["pool"] == "degraded"
    assert [u["breaker"] for u in health["tiers"]["medium"]["upstreams"]] == ["open", "open"]
    one.status = None
    now[0] = 31.0  # a probe request may go, and it succeeds
    assert chat(client, "hi").status_code == 200
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["tiers"]["medium"]["pool"] == "ok"


# ---------------------------------------------------------------- weights


def test_least_outstanding_divides_in_flight_by_weight() -> None:
    pool = Pool(["http://a/v1|3", "http://b/v1"])
    picks = [pool.pick() for _ in range(20)]
    counts = {u: sum(1 for p in picks if p and p.upstream.url == u) for u in ("http://a/v1", "http://b/v1")}
    assert counts == {"http://a/v1": 15, "http://b/v1": 5}


def test_weighted_round_robin_is_smooth() -> None:
    pool = Pool(["http://a/v1|2", "http://b/v1"], policy="round_robin")
    order = []
    for _ in range(6):
        attempt = pool.pick()
        assert attempt is not None
        order.append(attempt.upstream.url[7])
        attempt.finish("ok")
    assert order == ["a", "b", "a", "a", "b", "a"]  # 2:1, never both b's together


def test_weighted_rendezvous_gives_a_heavier_upstream_more_sessions() -> None:
    pool = Pool(["http://a/v1|3", "http://b/v1"], policy="session")
    homes = []
    for i in range(2000):
        attempt = pool.pick(key=f"session-{i}")
        assert attempt is not None
        homes.append(attempt.upstream.url)
        attempt.finish("ok")
    share = homes.count("http://a/v1") / len(homes)
    assert 0.70 < share < 0.80  # 3:1 expects 0.75; the hash is fixed, so this never flakes


@pytest.mark.parametrize("weight", ["0", "-1", "x", "inf"])
def test_a_bad_weight_names_the_variable(weight: str) -> None:
    with pytest.raises(ConfigError, match=r"MEDIUM_UPSTREAMS has value .*weight after '\|' must be a positive"):
        load_settings({**FAKE_ENV, "MEDIUM_MODEL_PATH": "", "MEDIUM_UPSTREAMS": f"http://a/v1|{weight}"})


def test_a_weighted_upstream_keeps_its_url(upstream: StartUpstream, front: Front) -> None:
    gpu, url = upstream("gpu")
    client = front([f"{url}|2"])
    assert chat(client, "hi").json()["choices"][0]["message"]["content"] == "gpu: hi"
    assert pool_status(client)[0]["url"] == url and pool_status(client)[0]["weight"] == 2.0


# ---------------------------------------------------------------- in-flight cap


@pytest.fixture
def live_front() -> Iterator[Any]:
    servers: list[LiveServer] = []

    def start(urls: list[str], **extra: str) -> LiveServer:
        env = {**FAKE_ENV, "MEDIUM_MODEL_PATH": "", "MEDIUM_UPSTREAMS": ",".join(urls), "MEDIUM_UPSTREAM_MODEL": "m"}
        live = LiveServer(create_app(load_settings({**env, **extra}), {"turns:remote": load_remote_chat}))
        servers.append(live.__enter__())
        return live

    yield start
    for live in servers:
        live.__exit__()


def post_chat(live: LiveServer, content: str = "hi") -> httpx.Response:
    body = {"model": "medium", "messages": [{"role": "user", "content": content}]}
    return httpx.post(f"{live.url}/v1/chat/completions", json=body, timeout=DEADLINE_S)


def medium_health(live: LiveServer) -> dict[str, Any]:
    return httpx.get(f"{live.url}/health").json()["tiers"]["medium"]


def test_beyond_the_cap_requests_wait_then_go(upstream: StartUpstream, live_front: Any) -> None:
    gpu, url = upstream("gpu")
    gpu.gate = threading.Event()
    live = live_front([url], MEDIUM_UPSTREAM_MAX_IN_FLIGHT="2")
    with ThreadPoolExecutor(5) as threads:
        futures = [threads.submit(post_chat, live) for _ in range(5)]
        wait_for(lambda: gpu.held == 2 and medium_health(live).get("queued") == 3, "2 upstream, 3 waiting")
        assert len(gpu.requests) == 2  # the cap held: the others wait here, not upstream
        gpu.gate.set()
        assert [f.result().status_code for f in futures] == [200] * 5
    assert len(gpu.requests) == 5


def test_beyond_the_cap_and_the_queue_the_answer_is_503(upstream: StartUpstream, live_front: Any) -> None:
    gpu, url = upstream("gpu")
    gpu.gate = threading.Event()
    live = live_front([url], MEDIUM_UPSTREAM_MAX_IN_FLIGHT="1", MEDIUM_MAX_QUEUE="1")
    with ThreadPoolExecutor(2) as threads:
        futures = [threads.submit(post_chat, live) for _ in range(2)]
        wait_for(lambda: gpu.held == 1 and medium_health(live).get("queued") == 1, "1 upstream, 1 waiting")
        refused = post_chat(live)
        gpu.gate.set()
        assert [f.result().status_code for f in futures] == [200, 200]
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
    assert "retry-after" in refused.headers


# ---------------------------------------------------------------- active health probes


def test_probes_skip_an_upstream_while_its_health_route_fails(upstream: StartUpstream, live_front: Any) -> None:
    loading, loading_url = upstream("loading")
    ready, ready_url = upstream("ready")
    loading.health, ready.health = 503, 200  # llama-server answers 503 while it loads its model
    live = live_front([loading_url, ready_url], MEDIUM_UPSTREAM_HEALTH_INTERVAL="0.2")
    assert post_chat(live).status_code == 200  # the tier loads on its first request; probes start then

    def healthy() -> list[bool]:
        return [u["healthy"] for u in medium_health(live)["upstreams"]]

    wait_for(lambda: healthy() == [False, True], "the loading upstream marked unhealthy")
    before = len(loading.requests)
    for _ in range(4):
        assert post_chat(live).json()["choices"][0]["message"]["content"] == "ready: hi"
    assert len(loading.requests) == before  # skipped, not tried and failed over
    assert "503" in medium_health(live)["upstreams"][0]["health_error"]
    loading.health = 200  # loaded
    wait_for(lambda: healthy() == [True, True], "the upstream healthy again")
    answers = {post_chat(live).json()["choices"][0]["message"]["content"] for _ in range(4)}
    assert "loading: hi" in answers


def test_a_probe_finds_an_llmservice_upstream_whose_tier_failed() -> None:
    def refuse(tier: Any, settings: Any) -> Any:
        raise RuntimeError("the model file is corrupt")

    upstream_app = create_app(load_settings(FAKE_ENV), {**FakeRegistry().factories(), "chat:llamacpp": refuse})
    with LiveServer(upstream_app) as live:
        body = {"model": "light", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{live.url}/v1/chat/completions", json=body).status_code >= 500  # its light tier failed
        pool = Pool([f"{live.url}/v1", "http://127.0.0.1:9/v1"])
        prober = HealthProber(pool, 60.0, "/health", {}, lambda: "light", "medium")
        prober.probe_all()
        prober.stop()
        served, dead = pool.upstreams
        assert not served.healthy and "light tier failed" in served.health_error
        assert not dead.healthy and "health probe failed" in dead.health_error
        prober = HealthProber(pool, 60.0, "/health", {}, lambda: "medium", "medium")
        prober.probe_all()  # another of its tiers: healthy
        prober.stop()
        assert served.healthy


def test_a_health_route_it_does_not_have_is_no_verdict() -> None:
    assert verdict(httpx.Response(404), "m") == ""
    assert verdict(httpx.Response(503), "m") == "health route answered 503"
    assert verdict(httpx.Response(200, json={"status": "ok"}), "m") == ""
