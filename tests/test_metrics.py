"""GET /metrics, request ids, the access log, and the hooks routes and the cache call."""

from __future__ import annotations

import json
import logging
import re
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client.parser import text_string_to_metric_families

from config import load_settings
from middleware import request_context
from server import create_app
from tests.conftest import FAKE_ENV, LiveServer
from tests.fakes import FakeRegistry
from tests.waiting import DEADLINE_S, wait_for

CHAT = {"model": "light", "messages": [{"role": "user", "content": "hi"}]}


def scrape(client: Any, headers: dict[str, str] | None = None) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = client.get("/metrics", headers=headers or {})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


# ---------------------------------------------------------------- request metrics


def test_chat_request_is_counted_with_tokens_latency_and_ttft(client: Any) -> None:
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200
    usage = response.json()["usage"]
    samples = scrape(client)
    route = "/v1/chat/completions"
    assert value(samples, "llmservice_requests_total", tier="light", endpoint=route, status="200") == 1
    assert value(samples, "llmservice_generated_tokens_total", tier="light") == usage["completion_tokens"]
    assert value(samples, "llmservice_prompt_tokens_total", tier="light") == usage["prompt_tokens"]
    assert value(samples, "llmservice_request_duration_seconds_count", tier="light", endpoint=route) == 1
    assert value(samples, "llmservice_time_to_first_token_seconds_count", tier="light", endpoint=route) == 1
    assert value(samples, "llmservice_tokens_per_second_count", tier="light") == 1


def test_streamed_tokens_are_counted_after_the_stream_ends(client: Any) -> None:
    pieces = []
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                pieces.append(delta.get("content") or "")
    text = "".join(pieces)
    assert text == "echo: hi"
    samples = scrape(client)
    assert value(samples, "llmservice_generated_tokens_total", tier="light") == len(text)  # fake: a token per char
    ttft = "llmservice_time_to_first_token_seconds_count"
    assert value(samples, ttft, tier="light", endpoint="/v1/chat/completions") == 1


def test_errors_and_prefixless_routes_have_their_own_labels(client: Any) -> None:
    assert client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}).status_code == 404
    assert client.post("/chat/completions", json=CHAT).status_code == 200
    assert client.get("/no/such/route").status_code == 404
    samples = scrape(client)
    assert value(samples, "llmservice_requests_total", tier="", endpoint="/v1/chat/completions", status="404") == 1
    assert value(samples, "llmservice_requests_total", tier="light", endpoint="/chat/completions", status="200") == 1
    assert value(samples, "llmservice_requests_total", tier="", endpoint="unmatched", status="404") == 1


def test_each_app_has_its_own_registry(make_client: Any) -> None:
    first, second = make_client(), make_client()
    first.post("/v1/chat/completions", json=CHAT)
    labels = {"tier": "light", "endpoint": "/v1/chat/completions", "status": "200"}
    assert value(scrape(first), "llmservice_requests_total", **labels) == 1
    assert value(scrape(second), "llmservice_requests_total", **labels) is None


# ---------------------------------------------------------------- tier state, in flight and queue


def test_loaded_models_gauge_follows_the_tier(client: Any) -> None:
    loaded = "llmservice_model_loaded"
    before = scrape(client)
    assert value(before, loaded, tier="light", backend="llamacpp", model="light/fake-light") == 0
    assert value(before, "llmservice_tier_state", tier="light", state="unloaded") == 1
    client.post("/v1/chat/completions", json=CHAT)
    after = scrape(client)
    assert value(after, loaded, tier="light", backend="llamacpp", model="light/fake-light") == 1
    assert value(after, loaded, tier="medium", backend="llamacpp", model="light/fake-7b") is None
    assert value(after, loaded, tier="medium", backend="llamacpp", model="medium/fake-7b") == 0
    assert (value(after, "process_resident_memory_bytes") or 0) > 0


@pytest.fixture
def gated_server() -> Iterator[tuple[LiveServer, FakeRegistry]]:
    registry = FakeRegistry(max_parallel=1)
    app = create_app(load_settings(FAKE_ENV), factories=registry.factories())
    with LiveServer(app) as live:
        yield live, registry


def test_in_flight_and_queue_depth_are_live(gated_server: tuple[LiveServer, FakeRegistry]) -> None:
    live, registry = gated_server
    with httpx.Client(base_url=live.url, timeout=DEADLINE_S) as http:
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200  # loads the tier
        gate = threading.Event()
        registry.models["light"].step_gate = gate  # every decode step now waits for the gate
        results: list[int] = []

        def call() -> None:
            with httpx.Client(base_url=live.url, timeout=DEADLINE_S) as own:
                results.append(own.post("/v1/chat/completions", json=CHAT).status_code)

        threads = [threading.Thread(target=call) for _ in range(2)]
        for thread in threads:
            thread.start()
        try:
            busy = wait_for(
                lambda: (
                    (s := scrape(http))
                    and value(s, "llmservice_in_flight_requests", tier="light") == 2
                    and value(s, "llmservice_queue_depth", tier="light") == 1
                    and s
                ),
                "two requests in flight, one of them queued (max_parallel=1)",
            )
            assert value(busy, "llmservice_active_sequences", tier="light") == 1
        finally:
            gate.set()
            for thread in threads:
                thread.join(DEADLINE_S)
        assert results == [200, 200]
        idle = scrape(http)
        assert value(idle, "llmservice_in_flight_requests", tier="light") == 0
        assert value(idle, "llmservice_queue_depth", tier="light") == 0


# ---------------------------------------------------------------- cache hooks


def add_cache_routes(app: FastAPI) -> None:
    @app.get("/test/cached")
    async def cached() -> JSONResponse:
        return JSONResponse({}, headers={"X-Cache": "HIT", "X-Tier": "embedding"})

    @app.get("/test/uncached")
    async def uncached() -> JSONResponse:
        return JSONResponse({}, headers={"X-Cache": "MISS", "X-Tier": "embedding"})

    @app.get("/test/per-text")
    async def per_text() -> JSONResponse:
        request_context.note_tier("embedding")
        request_context.note_cache(hits=2, misses=1)
        return JSONResponse({}, headers={"X-Cache": "MISS"})


def test_cache_hits_and_misses_from_header_and_hook(client: Any) -> None:
    add_cache_routes(client.app)
    client.get("/test/cached")
    client.get("/test/cached")
    client.get("/test/uncached")
    client.get("/test/per-text")
    client.app.state.llm.metrics.cache_hit("light", "/v1/chat/completions")
    samples = scrape(client)
    assert value(samples, "llmservice_cache_hits_total", tier="embedding", endpoint="/test/cached") == 2
    assert value(samples, "llmservice_cache_misses_total", tier="embedding", endpoint="/test/uncached") == 1
    # An explicit note wins over the header: 2 hits, 1 miss for one request.
    assert value(samples, "llmservice_cache_hits_total", tier="embedding", endpoint="/test/per-text") == 2
    assert value(samples, "llmservice_cache_misses_total", tier="embedding", endpoint="/test/per-text") == 1
    assert value(samples, "llmservice_cache_hits_total", tier="light", endpoint="/v1/chat/completions") == 1


# ---------------------------------------------------------------- request ids and logs


def test_every_response_carries_a_request_id(make_client: Any) -> None:
    client = make_client({**FAKE_ENV, "API_KEYS": "sk-1"})
    auth = {"Authorization": "Bearer sk-1"}
    responses = [
        client.post("/v1/chat/completions", json=CHAT, headers=auth),
        client.post("/v1/chat/completions", json=CHAT),  # 401
        client.get("/nope", headers=auth),  # 404
        client.get("/health", headers={"Host": "evil.example"}),  # 400 from the Host allowlist
        client.get("/health"),
    ]
    ids = [r.headers["x-request-id"] for r in responses]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_client_request_id_is_kept_when_sane(client: Any) -> None:
    assert client.get("/health", headers={"x-request-id": "trace-42.a:b"}).headers["x-request-id"] == "trace-42.a:b"
    for bad in ("has space", "x" * 200, "inject\tline"):
        replaced = client.get("/health", headers={"x-request-id": bad}).headers["x-request-id"]
        assert re.fullmatch(r"[0-9a-f]{32}", replaced)


def test_unexpected_error_is_500_envelope_with_request_id(client: Any) -> None:
    @client.app.get("/test/crash")
    async def crash() -> None:
        raise RuntimeError("secret /path/in/trace")

    response = client.get("/test/crash")
    assert response.status_code == 500
    assert response.json() == {
        "error": {
            "message": "The server hit an internal error",
            "type": "server_error",
            "param": None,
            "code": "internal_error",
        }
    }
    assert "secret" not in response.text
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])


class Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.addFilter(request_context.RequestIdFilter())
        self.setFormatter(logging.Formatter(request_context.LOG_FORMAT))
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)
        self.records.append(record)


@pytest.fixture
def captured() -> Iterator[Capture]:
    handler = Capture()
    logger = logging.getLogger("llmservice")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(old_level)


def test_log_lines_carry_the_request_id_and_the_access_log_has_tokens(client: Any, captured: Capture) -> None:
    # "heavy" is not configured in FAKE_ENV: the route logs the fallback to medium, inside the request.
    response = client.post("/v1/chat/completions", json={**CHAT, "model": "heavy"}, headers={"x-request-id": "req-7"})
    assert response.status_code == 200
    usage = response.json()["usage"]
    mine = [r for r in captured.records if r.request_id == "req-7"]
    fallback = [r for r in mine if r.name == "llmservice.chat"]
    assert fallback and "not configured" in fallback[0].getMessage()
    access = [r for r in mine if r.name == "llmservice.access"]
    assert len(access) == 1
    line = access[0].getMessage()
    assert '"POST /v1/chat/completions" 200' in line
    assert f"prompt_tokens={usage['prompt_tokens']} completion_tokens={usage['completion_tokens']}" in line
    assert "tier=medium" in line and "duration_ms=" in line and "ttft_ms=" in line
    assert "[req-7]" in captured.format(access[0])
    # Outside any request the filter writes "-".
    logging.getLogger("llmservice.test").info("no request here")
    assert captured.records[-1].request_id == "-"


def test_streamed_request_logs_once_after_the_last_byte(client: Any, captured: Capture) -> None:
    with client.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as response:
        request_id = response.headers["x-request-id"]
        body = b"".join(response.iter_bytes())
    assert body.endswith(b"data: [DONE]\n\n")
    access = [r for r in captured.records if r.name == "llmservice.access" and r.request_id == request_id]
    assert len(access) == 1
    assert f"completion_tokens={len('echo: hi')}" in access[0].getMessage()


def test_model_memory_of_a_loaded_tier(make_client: Any, tmp_path: Any) -> None:
    model_file = tmp_path / "light.gguf"
    model_file.write_bytes(b"\0" * 4096)
    client = make_client({**FAKE_ENV, "LIGHT_MODEL_PATH": str(model_file)})

    def light_memory() -> list[float]:
        # The source is "file_size", or "estimate" where the manager estimates from the same file.
        samples = scrape(client)
        return [
            v
            for (n, labels), v in samples.items()
            if n == "llmservice_model_memory_bytes" and ("tier", "light") in labels
        ]

    assert light_memory() == []
    client.post("/v1/chat/completions", json=CHAT)
    assert light_memory() == [4096]


def test_memory_reported_by_the_manager_wins() -> None:
    from ops.metrics import _memory

    nested = {"memory": {"estimated_bytes": 2048, "rss_delta_bytes": 1000}}
    assert _memory(nested, "") == (2048.0, "estimate")
    assert _memory({"memory": {"estimated_bytes": None, "rss_delta_bytes": 1000}}, "") == (1000.0, "rss_delta")
    assert _memory({}, "/no/such/file") is None
