"""The admin API's JSON analytics (ops/analytics.py, api/admin_metrics.py): windows that roll over on an
injected clock, bounded memory, and per-tier and per-key numbers after real requests through fakes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from config import load_settings
from ops.analytics import MAX_KEY_SERIES, OTHER_KEY, SERIES_STEP, TOTAL, WINDOWS, Analytics, Sample, split
from server import create_app
from tests.conftest import FAKE_ENV
from tests.fakes import FakeRegistry
from tests.test_api import assert_error
from tests.test_keys import bearer, key_file

KEYS = """
[[keys]]
name = "n8n"
key = "sk-n8n-secret"
tiers = ["light"]

[[keys]]
name = "webui"
key = "sk-webui-secret"

[[keys]]
name = "ops"
key = "sk-ops-secret"
admin = true
"""
OPS = bearer("sk-ops-secret")


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def chat(text: str, model: str = "light") -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": text}]}


# ---------------------------------------------------------------- the rings, on an injected clock


def totals(analytics: Analytics, window: str) -> int:
    tally = analytics.window(window).get(TOTAL)
    return tally.requests if tally is not None else 0


def test_windows_roll_over_on_the_clock() -> None:
    clock = Clock()
    analytics = Analytics(clock)
    analytics.record("light", "n8n", Sample(200, 0.1, 5, 7, 0.5))
    assert [totals(analytics, w) for w in WINDOWS] == [1, 1, 1]
    clock.now += 59  # still within the last minute
    analytics.record("light", "", Sample(500, 0.2))
    assert [totals(analytics, w) for w in WINDOWS] == [2, 2, 2]
    clock.now += 2  # the first request is now more than a minute old
    assert [totals(analytics, w) for w in WINDOWS] == [1, 2, 2]
    clock.now += 3600
    assert [totals(analytics, w) for w in WINDOWS] == [0, 0, 2]
    clock.now += 86400
    assert [totals(analytics, w) for w in WINDOWS] == [0, 0, 0] and analytics.window("day") == {}


def test_a_window_sums_its_series() -> None:
    clock = Clock()
    analytics = Analytics(clock)
    analytics.record("light", "n8n", Sample(200, 0.1, prompt_tokens=5, completion_tokens=8, compute_seconds=0.5))
    clock.now += 30
    analytics.record("light", "webui", Sample(429, 0.01))
    analytics.record("medium", "n8n", Sample(200, 0.3, prompt_tokens=2, completion_tokens=2, compute_seconds=0.5))
    total, tiers, keys = split(analytics.window("minute"))
    assert (total.requests, total.errors, total.prompt_tokens, total.completion_tokens) == (3, 1, 7, 10)
    assert total.as_json(60)["tokens_per_second"] == 10.0  # completion tokens over generation time
    assert {name: t.requests for name, t in tiers.items()} == {"light": 2, "medium": 1}
    assert {name: (t.requests, t.errors) for name, t in keys.items()} == {"n8n": (2, 0), "webui": (1, 1)}
    steps = analytics.series("minute")
    assert all(start % SERIES_STEP["minute"] == 0 for start, _ in steps)
    assert sum(tallies[TOTAL].requests for _, tallies in steps) == 3


def test_percentiles_are_within_a_bin() -> None:
    analytics = Analytics(Clock())
    for ms in range(1, 101):  # 1 ms ... 100 ms, one each
        analytics.record("light", "", Sample(200, ms / 1000))
    latency = analytics.window("hour")[TOTAL].as_json(3600)["latency_ms"]
    assert isinstance(latency, dict)
    assert 50 / 1.13 <= latency["p50"] <= 50 * 1.13
    assert 95 / 1.13 <= latency["p95"] <= 95 * 1.13
    assert latency["mean"] == pytest.approx(50.5)


def test_memory_stays_bounded_over_days_of_traffic_and_many_keys() -> None:
    clock = Clock()
    analytics = Analytics(clock)
    tiers = ["light", "medium", "heavy", "embedding", "reranker"]
    for i in range(3 * 86400 // 20):  # a request every 20 s for three days, from 200 key names
        analytics.record(tiers[i % len(tiers)], f"key-{i % 200}", Sample(200, 0.05, 3, 4, 0.1))
        clock.now += 20
    assert len(analytics.seconds.buckets) <= 60 and len(analytics.minutes.buckets) <= 1440
    series = 1 + len(tiers) + MAX_KEY_SERIES + 1  # total, tiers, named keys, "(other)"
    assert analytics.stored_tallies() <= (60 + 1440) * series
    total, _, keys = split(analytics.window("day"))
    assert len(keys) == MAX_KEY_SERIES + 1 and OTHER_KEY in keys
    assert 0.99 * 86400 / 20 <= total.requests <= 86400 / 20  # the last day's, less the minute under way
    assert sum(t.requests for t in keys.values()) == total.requests  # nobody's requests are lost, only merged
    clock.now -= 5 * 86400  # a clock set back: the newest buckets go, the bound holds
    analytics.record("light", "key-1", Sample(200, 0.05))
    assert len(analytics.minutes.buckets) == 1 and len(analytics.seconds.buckets) == 1


# ---------------------------------------------------------------- through the app


@pytest.fixture
def keyed(tmp_path: Path, fake_registry: FakeRegistry) -> Iterator[tuple[TestClient, Clock]]:
    settings = load_settings({**FAKE_ENV, "API_KEYS_FILE": str(key_file(tmp_path, KEYS))})
    app = create_app(settings, factories=fake_registry.factories())
    clock = Clock()
    app.state.llm.metrics.analytics.clock = clock
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as client:
        yield client, clock


def test_per_key_and_per_tier_numbers_after_real_requests(keyed: tuple[TestClient, Clock]) -> None:
    client, _ = keyed
    usage = {"n8n": [0, 0], "webui": [0, 0]}
    for key, text, model in (("n8n", "hi", "light"), ("n8n", "hello", "light"), ("webui", "hey", "medium")):
        reply = client.post("/v1/chat/completions", json=chat(text, model), headers=bearer(f"sk-{key}-secret"))
        assert reply.status_code == 200
        usage[key][0] += reply.json()["usage"]["prompt_tokens"]
        usage[key][1] += reply.json()["usage"]["completion_tokens"]
    streamed = client.post(
        "/v1/chat/completions", json={**chat("stream"), "stream": True}, headers=bearer("sk-webui-secret")
    )
    assert streamed.status_code == 200 and "[DONE]" in streamed.text
    usage["webui"][1] += len("echo: stream")  # the fake writes one token per character
    refused = client.post("/v1/chat/completions", json=chat("x", "medium"), headers=bearer("sk-n8n-secret"))
    assert_error(refused, 403, "model_not_allowed")
    client.get("/admin/status", headers=OPS)  # the operator watching is not API traffic
    client.get("/metrics", headers=OPS)

    summary = client.get("/api/admin/metrics/summary", headers=OPS).json()
    assert summary["windows"] == {"minute": 60, "hour": 3600, "day": 86400}
    assert set(summary["keys"]) == {"n8n", "webui"}  # "ops" made no API requests
    n8n, webui = summary["keys"]["n8n"]["hour"], summary["keys"]["webui"]["hour"]
    assert (n8n["requests"], n8n["errors"], webui["requests"], webui["errors"]) == (3, 1, 2, 0)
    assert n8n["prompt_tokens"] == usage["n8n"][0] and n8n["completion_tokens"] == usage["n8n"][1]
    assert webui["completion_tokens"] == usage["webui"][1] and webui["prompt_tokens"] > usage["webui"][0]
    assert summary["tiers"]["light"]["minute"]["requests"] == 3 and summary["tiers"]["medium"]["day"]["requests"] == 1
    assert summary["total"]["day"]["requests"] == 5 and summary["total"]["day"]["errors"] == 1
    latency = summary["total"]["minute"]["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"]
    assert summary["total"]["hour"]["tokens_per_second"] > 0
    assert "secret" not in client.get("/admin/metrics/summary", headers=OPS).text  # names, never the keys


def test_each_route_shape(keyed: tuple[TestClient, Clock]) -> None:
    client, _ = keyed
    for text in ("one", "two"):
        client.post("/v1/chat/completions", json=chat(text), headers=bearer("sk-n8n-secret"))
    client.post("/api/chat", json={**chat("three"), "stream": False}, headers=bearer("sk-webui-secret"))  # Ollama's too
    fields = {
        "requests": {"requests", "errors", "requests_per_second"},
        "tokens": {"requests", "prompt_tokens", "completion_tokens", "total_tokens", "tokens_per_second"},
        "latency": {"requests", "latency_ms"},
    }
    for route, names in fields.items():
        for window, step in SERIES_STEP.items():
            body = client.get(f"/api/admin/metrics/{route}", params={"window": window}, headers=OPS).json()
            assert (body["window"], body["seconds"], body["step_seconds"]) == (window, WINDOWS[window], step)
            assert set(body["total"]) == names and body["total"]["requests"] == 3
            assert set(body["keys"]) == {"n8n", "webui"} and set(body["keys"]["n8n"]) == names
            assert body["keys"]["n8n"]["requests"] == 2 and body["tiers"]["light"]["requests"] == 3
            assert len(body["series"]) == 1 and body["series"][0]["start"] % step == 0
            assert set(body["series"][0]) == names | {"start"}
    tokens = client.get("/admin/metrics/tokens", headers=OPS).json()  # default window: the hour
    assert tokens["window"] == "hour"
    assert tokens["total"]["total_tokens"] == tokens["total"]["prompt_tokens"] + tokens["total"]["completion_tokens"]
    assert_error(client.get("/admin/metrics/latency", params={"window": "week"}, headers=OPS), 400, "invalid_request")


def test_analytics_need_an_admin_key(keyed: tuple[TestClient, Clock]) -> None:
    client, _ = keyed
    assert_error(client.get("/api/admin/metrics/summary", headers=bearer("sk-n8n-secret")), 403, "permission_denied")
    assert_error(client.get("/admin/metrics/requests"), 401, "invalid_api_key")


def test_the_app_windows_roll_over(keyed: tuple[TestClient, Clock]) -> None:
    client, clock = keyed
    client.post("/v1/chat/completions", json=chat("early"), headers=bearer("sk-n8n-secret"))
    clock.now += 120
    client.post("/v1/chat/completions", json=chat("later"), headers=bearer("sk-webui-secret"))

    def requests(window: str) -> dict[str, Any]:
        return client.get("/admin/metrics/requests", params={"window": window}, headers=OPS).json()

    minute, hour = requests("minute"), requests("hour")
    assert minute["total"]["requests"] == 1 and set(minute["keys"]) == {"webui"}
    assert hour["total"]["requests"] == 2 and set(hour["keys"]) == {"n8n", "webui"}
    assert [point["requests"] for point in hour["series"]] == [1, 1]  # two minutes, two points
    clock.now += 3600
    assert requests("hour")["total"]["requests"] == 0 and requests("hour")["series"] == []
    assert requests("day")["total"]["requests"] == 2
    clock.now += 86400
    assert client.get("/admin/metrics/summary", headers=OPS).json()["keys"] == {}
