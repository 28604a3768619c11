"""Named API keys (API_KEYS_FILE): tiers, admin routes, rate limits, usage per key, reloads.

Time in the limits is a fake clock handed to the limiter, so nothing here waits for a minute to pass.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from config import ConfigError, load_settings
from middleware.keys import KeyStore, read_keys_file
from middleware.limits import LocalLimiter, duration
from server import create_app
from tests.conftest import FAKE_ENV, LiveServer
from tests.fakes import FakeRegistry
from tests.test_api import assert_error
from tests.test_metrics import scrape, value
from tests.waiting import DEADLINE_S, wait_for

REPO = Path(__file__).resolve().parent.parent
CHAT = {"model": "light", "messages": [{"role": "user", "content": "hi"}]}
KEYS = f"""
[[keys]]
name = "n8n"
key = "sk-n8n-secret"
tiers = ["light"]
rpm = 3

[[keys]]
name = "ops"
key_sha256 = "{hashlib.sha256(b"sk-ops-secret").hexdigest()}"
admin = true

[[keys]]
name = "batch"
key = "sk-batch-secret"
tpm = 20

[[keys]]
name = "webui"
key = "sk-webui-secret"
tiers = ["light", "embedding"]

[[keys]]
name = "svc"
key = "sk-svc-secret"
max_parallel = 3
"""


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def key_file(folder: Path, text: str = KEYS, mode: int = 0o600) -> Path:
    path = folder / "keys.toml"
    path.write_text(text)
    path.chmod(mode)
    return path


def rewrite(path: Path, text: str) -> None:
    """New content with a new mtime (some filesystems keep whole-second mtimes)."""
    before = path.stat().st_mtime_ns
    path.write_text(text)
    os.utime(path, ns=(before + 2_000_000_000, before + 2_000_000_000))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def keyed(tmp_path: Path, fake_registry: FakeRegistry, clock: FakeClock) -> Iterator[Any]:
    """Build a TestClient over a key file (and optional extra env), with the fake clock in the limiter."""
    clients: list[TestClient] = []

    def build(text: str = KEYS, **env: str) -> TestClient:
        settings = load_settings({**FAKE_ENV, "API_KEYS_FILE": str(key_file(tmp_path, text)), **env})
        app = create_app(settings, fake_registry.factories(), limiter=LocalLimiter(clock))
        client = TestClient(app, base_url="http://localhost", raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


# ---------------------------------------------------------------- the key file


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[keys]]\nname = "a"\n', "set exactly one of key and key_sha256"),
        ('[[keys]]\nname = "a"\nkey = "k"\nkey_sha256 = "' + "0" * 64 + '"\n', "exactly one"),
        ('[[keys]]\nname = "a b"\nkey = "k"\n', "name 'a b'"),
        ('[[keys]]\nname = "anonymous"\nkey = "k"\n', "name 'anonymous'"),
        ('[[keys]]\nname = "a"\nkey = "k"\nrpn = 5\n', "unknown fields ['rpn']"),
        ('[[keys]]\nname = "a"\nkey = "k"\nrpm = -1\n', "rpm has value -1"),
        ('[[keys]]\nname = "a"\nkey = "k"\ntpm = true\n', "tpm has value True"),
        ('[[keys]]\nname = "a"\nkey = "k"\ntiers = ["lite"]\n', "tiers names ['lite']"),
        ('[[keys]]\nname = "a"\nkey = "k"\ntiers = []\n', "non-empty list"),
        ('[[keys]]\nname = "a"\nkey = "k"\nadmin = "yes"\n', "admin has value 'yes'"),
        ('[[keys]]\nname = "a"\nkey_sha256 = "abc"\n', "64 hex digits"),
        ('[[keys]]\nname = "a"\nkey = "k"\n[[keys]]\nname = "a"\nkey = "j"\n', "name 'a' is used twice"),
        ('[[keys]]\nname = "a"\nkey = "k"\n[[keys]]\nname = "b"\nkey = "k"\n', "'b' has the same key as 'a'"),
        ("[server]\nport = 1\n", "unknown top-level entries ['server']"),
        ("[[keys]\n", "not valid TOML"),
    ],
)
def test_bad_key_files_are_refused_naming_the_entry(tmp_path: Path, text: str, message: str) -> None:
    path = key_file(tmp_path, text)
    with pytest.raises(ConfigError, match="API_KEYS_FILE") as info:
        read_keys_file(str(path))
    assert message in str(info.value)


def test_a_key_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = key_file(tmp_path, mode=0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        KeyStore((), str(path))
    with pytest.raises(ConfigError, match="readable or writable by other users"):
        create_app(load_settings({**FAKE_ENV, "API_KEYS_FILE": str(path)}), FakeRegistry().factories())
    path.chmod(0o640)  # the group may read it (a service group)
    assert [key.name for key in KeyStore((), str(path)).keys] == ["n8n", "ops", "batch", "webui", "svc"]


def test_the_server_refuses_to_start_with_a_world_readable_key_file(tmp_path: Path) -> None:
    path = key_file(tmp_path, mode=0o604)
    env = {k: v for k, v in os.environ.items() if not k.startswith("API_KEYS")}
    env.update({"API_KEYS_FILE": str(path), "PORT_FILE": str(tmp_path / ".port"), "PORT": "0"})
    result = subprocess.run(
        [sys.executable, str(REPO / "server.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert "API_KEYS_FILE" in result.stderr and "chmod 600" in result.stderr
    assert not (tmp_path / ".port").exists()


def test_a_key_file_alone_is_enough_to_listen_beyond_loopback(tmp_path: Path) -> None:
    settings = load_settings({"HOST": "0.0.0.0", "API_KEYS_FILE": str(key_file(tmp_path))})
    assert settings.keys_configured and settings.api_keys == ()


# ---------------------------------------------------------------- names, tiers, admin


def test_a_named_key_is_named_in_the_access_log_and_metrics(keyed: Any, caplog: pytest.LogCaptureFixture) -> None:
    client = keyed()
    with caplog.at_level(logging.INFO, logger="llmservice.access"):
        response = client.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-n8n-secret"))
    assert response.status_code == 200
    lines = [r.getMessage() for r in caplog.records if r.name == "llmservice.access"]
    assert any("/v1/chat/completions" in line and "key=n8n" in line for line in lines), lines
    usage = response.json()["usage"]
    metrics = client.get("/metrics", headers=bearer("sk-ops-secret"))
    assert "sk-n8n-secret" not in metrics.text and "sk-ops-secret" not in metrics.text
    samples = scrape(client, bearer("sk-ops-secret"))
    assert value(samples, "llmservice_key_requests_total", key="n8n", status="200") == 1
    assert value(samples, "llmservice_key_tokens_total", key="n8n", kind="prompt") == usage["prompt_tokens"]
    assert value(samples, "llmservice_key_tokens_total", key="n8n", kind="completion") == usage["completion_tokens"]
    assert value(samples, "llmservice_key_request_duration_seconds_count", key="n8n") == 1


def test_plain_api_keys_still_work_beside_the_file_as_anonymous_admins(keyed: Any) -> None:
    client = keyed(API_KEYS="sk-plain")
    assert client.post("/v1/chat/completions", json={**CHAT, "model": "medium"}, headers=bearer("sk-plain")).is_success
    assert client.get("/admin/status", headers=bearer("sk-plain")).status_code == 200
    samples = scrape(client, bearer("sk-plain"))
    assert value(samples, "llmservice_key_requests_total", key="anonymous", status="200") == 2  # chat, status
    assert_error(client.post("/v1/chat/completions", json=CHAT), 401, "invalid_api_key")
    assert_error(client.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-n8n")), 401, "invalid_api_key")


@pytest.mark.parametrize("path", ["/admin/status", "/api/admin/status", "/admin/cache", "/metrics"])
def test_admin_routes_need_an_admin_key(keyed: Any, path: str) -> None:
    client = keyed()
    error = assert_error(client.get(path, headers=bearer("sk-n8n-secret")), 403, "permission_denied")
    assert "admin = true" in error["message"]
    assert client.get(path, headers=bearer("sk-ops-secret")).status_code == 200
    assert client.get("/admin").status_code == 200  # the page itself is public; its calls need the key


def test_a_key_restricted_to_tiers_gets_403_elsewhere_and_sees_only_its_tiers(keyed: Any) -> None:
    client = keyed()
    webui = bearer("sk-webui-secret")
    error = assert_error(
        client.post("/v1/chat/completions", json={**CHAT, "model": "medium"}, headers=webui), 403, "model_not_allowed"
    )
    assert error["param"] == "model" and "embedding, light" in error["message"]
    assert client.post("/v1/chat/completions", json=CHAT, headers=webui).status_code == 200
    assert_error(client.get("/v1/models/medium", headers=webui), 403, "model_not_allowed")
    assert [m["id"] for m in client.get("/v1/models", headers=webui).json()["data"]] == ["light/fake-light"]
    assert [m["name"] for m in client.get("/api/tags", headers=webui).json()["models"]] == ["light:latest"]
    refused = client.post("/api/chat", json={**CHAT, "model": "medium:latest"}, headers=webui)
    assert refused.status_code == 403 and "medium" in refused.json()["error"]
    everything = client.get("/v1/models", headers=bearer("sk-ops-secret")).json()["data"]
    assert [m["id"] for m in everything] == ["light/fake-light", "medium/fake-7b"]


# ---------------------------------------------------------------- rate limits


def test_the_request_after_rpm_is_429_until_the_window_rolls_over(keyed: Any, clock: FakeClock) -> None:
    client = keyed()
    n8n = bearer("sk-n8n-secret")
    for remaining in ("2", "1", "0"):
        response = client.post("/v1/chat/completions", json=CHAT, headers=n8n)
        assert response.status_code == 200
        assert response.headers["x-ratelimit-limit-requests"] == "3"
        assert response.headers["x-ratelimit-remaining-requests"] == remaining
    refused = client.post("/v1/chat/completions", json=CHAT, headers=n8n)
    error = assert_error(refused, 429, "rate_limit_exceeded")
    assert error["type"] == "requests" and "n8n" in error["message"]
    assert refused.headers["retry-after"] == "20"  # one request frees every 60 / 3 seconds
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"] == "1m0s"
    clock.advance(19.5)
    assert client.post("/v1/chat/completions", json=CHAT, headers=n8n).status_code == 429
    clock.advance(0.5)
    assert client.post("/v1/chat/completions", json=CHAT, headers=n8n).status_code == 200
    clock.advance(60)  # a whole minute: the full allowance again
    statuses = [client.post("/v1/chat/completions", json=CHAT, headers=n8n).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    assert "x-ratelimit-limit-requests" not in client.get("/v1/models", headers=bearer("sk-ops-secret")).headers


def test_every_response_of_a_limited_key_carries_the_headers(keyed: Any) -> None:
    client = keyed()
    n8n = bearer("sk-n8n-secret")
    missing = client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers=n8n)
    assert missing.status_code == 404 and missing.headers["x-ratelimit-remaining-requests"] == "2"
    listing = client.get("/v1/models", headers=n8n)
    assert listing.headers["x-ratelimit-remaining-requests"] == "1"


def test_token_limits_count_streamed_tokens(keyed: Any, clock: FakeClock) -> None:
    client = keyed()
    batch = bearer("sk-batch-secret")
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    first = client.post("/v1/chat/completions", json=body, headers=batch)
    assert first.status_code == 200 and first.headers["x-ratelimit-remaining-tokens"] == "20"
    usage = [line for line in first.text.splitlines() if '"usage":{' in line][-1]
    counts = json.loads(usage.removeprefix("data: "))["usage"]
    used = counts["prompt_tokens"] + counts["completion_tokens"]
    assert used > 20  # the stream went over: the next request waits until the bucket is positive
    refused = client.post("/v1/chat/completions", json=CHAT, headers=batch)
    error = assert_error(refused, 429, "rate_limit_exceeded")
    assert error["type"] == "tokens"
    wait = (1 - (20 - used)) * 60 / 20
    assert refused.headers["retry-after"] == str(math.ceil(wait))
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    clock.advance(wait - 0.1)
    assert client.post("/v1/chat/completions", json=CHAT, headers=batch).status_code == 429
    clock.advance(0.1)
    assert client.post("/v1/chat/completions", json=CHAT, headers=batch).status_code == 200


def test_max_parallel_holds_under_20_parallel_requests(tmp_path: Path, fake_registry: FakeRegistry) -> None:
    settings = load_settings({**FAKE_ENV, "API_KEYS_FILE": str(key_file(tmp_path))})
    with LiveServer(create_app(settings, fake_registry.factories())) as live:
        url, svc = live.url + "/v1/chat/completions", bearer("sk-svc-secret")
        assert httpx.post(url, json=CHAT, headers=svc, timeout=DEADLINE_S).status_code == 200  # loads the tier
        gate = threading.Event()
        fake_registry.models["light"].hold_gate = gate  # admitted requests stay in flight until it opens
        statuses: list[int] = []
        bodies: list[dict[str, Any]] = []

        def one() -> None:
            response = httpx.post(url, json=CHAT, headers=svc, timeout=DEADLINE_S)
            statuses.append(response.status_code)
            bodies.append(response.json())

        threads = [threading.Thread(target=one) for _ in range(20)]
        for thread in threads:
            thread.start()
        wait_for(lambda: statuses.count(429) == 17, "17 of 20 requests refused")
        assert 200 not in statuses
        gate.set()
        for thread in threads:
            thread.join(DEADLINE_S)
        assert sorted(statuses) == [200] * 3 + [429] * 17
        refused = next(b for b in bodies if "error" in b)["error"]
        assert refused["code"] == "rate_limit_exceeded" and "at once" in refused["message"]
        assert httpx.post(url, json=CHAT, headers=svc, timeout=DEADLINE_S).status_code == 200  # slots freed


def test_openai_sdk_retries_a_429_after_its_retry_after(
    tmp_path: Path, fake_registry: FakeRegistry, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = '[[keys]]\nname = "sdk"\nkey = "sk-sdk-secret"\nrpm = 1\n'
    settings = load_settings({**FAKE_ENV, "API_KEYS_FILE": str(key_file(tmp_path, text))})
    slept: list[float] = []

    def sleep(seconds: float) -> None:  # the SDK's wait, on the limiter's clock instead of the wall's
        slept.append(seconds)
        clock.advance(seconds)

    import openai._base_client as base_client

    monkeypatch.setattr(base_client, "time", SimpleNamespace(sleep=sleep, time=time.time))
    with LiveServer(create_app(settings, fake_registry.factories(), limiter=LocalLimiter(clock))) as live:
        client = openai.OpenAI(base_url=live.url + "/v1", api_key="sk-sdk-secret", max_retries=2, timeout=DEADLINE_S)
        messages: Any = CHAT["messages"]
        raw = client.chat.completions.with_raw_response.create(model="light", messages=messages)
        assert raw.headers["x-ratelimit-limit-requests"] == "1"
        assert raw.headers["x-ratelimit-remaining-requests"] == "0"
        assert raw.headers["x-ratelimit-reset-requests"] == "1m0s"
        retried = client.chat.completions.create(model="light", messages=messages)
        assert slept == [60.0]  # exactly Retry-After: no backoff of its own, no jitter
        assert retried.choices[0].message.content == "echo: hi"
        with pytest.raises(openai.RateLimitError) as info:
            client.with_options(max_retries=0).chat.completions.create(model="light", messages=messages)
        assert info.value.code == "rate_limit_exceeded"
        assert info.value.response.headers["retry-after"] == "60"


def test_duration_uses_openais_format() -> None:
    assert [duration(s) for s in (0.02, 1, 59.5, 60, 90.25, 360)] == ["20ms", "1s", "59.5s", "1m0s", "1m30.25s", "6m0s"]


# ---------------------------------------------------------------- reloads


def test_the_key_file_is_reloaded_without_a_restart(
    keyed: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client = keyed()
    assert client.get("/v1/models", headers=bearer("sk-n8n-secret")).status_code == 200
    path = tmp_path / "keys.toml"
    rewrite(path, '[[keys]]\nname = "fresh"\nkey = "sk-fresh-secret"\n')
    assert client.get("/v1/models", headers=bearer("sk-fresh-secret")).status_code == 200
    assert_error(client.get("/v1/models", headers=bearer("sk-n8n-secret")), 401, "invalid_api_key")
    with caplog.at_level(logging.ERROR, logger="llmservice.keys"):
        rewrite(path, "[[keys]\nbroken")
        assert client.get("/v1/models", headers=bearer("sk-fresh-secret")).status_code == 200  # kept
    assert any("not reloaded" in r.getMessage() for r in caplog.records)
    path.chmod(0o644)
    rewrite(path, '[[keys]]\nname = "leaked"\nkey = "sk-leaked-secret"\n')
    assert_error(client.get("/v1/models", headers=bearer("sk-leaked-secret")), 401, "invalid_api_key")
    assert client.get("/v1/models", headers=bearer("sk-fresh-secret")).status_code == 200


def test_sighup_rereads_an_unchanged_looking_file(tmp_path: Path) -> None:
    path = key_file(tmp_path, '[[keys]]\nname = "a"\nkey = "sk-aaaa1"\n')
    store = KeyStore((), str(path))
    before = path.stat()
    path.write_text('[[keys]]\nname = "b"\nkey = "sk-bbbb1"\n')  # same size, same inode
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert store.lookup("sk-bbbb1") is None  # nothing on disk looks changed
    previous = signal.getsignal(signal.SIGHUP)
    with store.reload_on_sighup():
        os.kill(os.getpid(), signal.SIGHUP)
        key = wait_for(lambda: store.lookup("sk-bbbb1"), "the reload after SIGHUP")
    assert key.name == "b" and store.lookup("sk-aaaa1") is None
    assert signal.getsignal(signal.SIGHUP) == previous
