"""The replaced servers' model routes: /api/v1/models/{id}/load|unload, /api/v1/models/memory/usage,
/api/admin/models and /api/admin/models/{id}/load, over fakes; and Ollama's "/" answer."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from config import load_settings
from server import create_app
from tests.conftest import FAKE_ENV, LiveServer
from tests.fakes import FakeRegistry
from tests.test_admin import StreamReader
from tests.test_api import assert_error
from tests.test_keys import bearer, key_file
from tests.waiting import DEADLINE_S, wait_for

CHAT = {"model": "light", "messages": [{"role": "user", "content": "hi"}]}
KEYS = """
[[keys]]
name = "app"
key = "sk-app"
tiers = ["light"]

[[keys]]
name = "ops"
key = "sk-ops"
admin = true
"""


def test_load_and_unload_by_tier_alias_and_model_id(client: TestClient, fake_registry: FakeRegistry) -> None:
    loaded = client.post("/api/v1/models/small/load")  # an alias of the light tier
    assert loaded.status_code == 200
    body = loaded.json()
    assert (body["id"], body["tier"], body["loaded"], body["state"]) == ("small", "light", True, "ready")
    assert fake_registry.loads == {"light": 1}
    assert client.post("/api/v1/models/light/load").json()["loaded"] is True  # already resident: no new load
    assert fake_registry.loads == {"light": 1}
    unloaded = client.post("/api/v1/models/light/fake-light/unload")  # the tier's model id, slash and all
    assert unloaded.status_code == 200
    assert (
        unloaded.json().items()
        >= {"id": "light/fake-light", "tier": "light", "loaded": False, "pending": False}.items()
    )
    assert unloaded.json()["state"] == "unloaded" and fake_registry.models["light"].closed
    assert client.post("/api/v1/models/medium/load").json()["tier"] == "medium"
    assert client.get("/health").json()["tiers"]["medium"]["state"] == "ready"


def test_unknown_and_unconfigured_models_are_404_envelopes(client: TestClient) -> None:
    missing = client.post("/api/v1/models/nope/load")
    assert_error(missing, 404, "model_not_found")
    assert "light" in missing.json()["error"]["message"]
    heavy = client.post("/api/v1/models/heavy/load")  # would fall back to medium for a chat request
    assert_error(heavy, 404, "model_not_found")
    assert "not configured" in heavy.json()["error"]["message"]
    assert client.get("/health").json()["tiers"]["medium"]["state"] == "unloaded"


def test_unload_of_a_busy_tier_waits_for_its_last_request(fake_registry: FakeRegistry) -> None:
    app = create_app(load_settings(FAKE_ENV), factories=fake_registry.factories())
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=DEADLINE_S) as http:
        assert http.post("/api/v1/models/light/load").status_code == 200
        gate = fake_registry.models["light"].hold_gate = threading.Event()  # decode steps wait for it
        stream = StreamReader(f"{live.url}/v1/chat/completions", {**CHAT, "temperature": 0.5})
        assert stream.started.wait(DEADLINE_S)
        pending = http.post("/api/v1/models/light/unload").json()
        assert (pending["pending"], pending["loaded"], pending["state"]) == (True, True, "ready")
        gate.set()
        assert stream.finished.wait(DEADLINE_S)
        assert stream.events[-1] == "[DONE]"  # the request in flight finished normally
        wait_for(lambda: http.get("/health").json()["tiers"]["light"]["state"] == "unloaded", "the idle unload")
        assert http.post("/v1/chat/completions", json=CHAT).status_code == 200  # and it loads again on use
    assert fake_registry.loads == {"light": 2}


def test_memory_usage_per_tier_and_the_budget(tmp_path: Path, make_client: Any) -> None:
    model = tmp_path / "light.gguf"
    model.write_bytes(b"\0" * 12345)
    client = make_client({**FAKE_ENV, "LIGHT_MODEL_PATH": str(model), "MAX_MEMORY_GB": "1"})
    before = client.get("/api/v1/models/memory/usage").json()
    assert before["budget"] == {"max_bytes": 1024**3, "used_bytes": 0, "free_bytes": 1024**3}
    light = before["tiers"]["light"]
    assert (light["loaded"], light["state"], light["estimated_bytes"], light["reserved_bytes"]) == (
        False,
        "unloaded",
        12345,
        0,
    )
    assert before["tiers"]["medium"]["estimated_bytes"] is None  # no such file: unknown
    client.post("/v1/chat/completions", json=CHAT)
    after = client.get("/api/v1/models/memory/usage").json()
    assert after["tiers"]["light"].items() >= {"loaded": True, "state": "ready", "reserved_bytes": 12345}.items()
    assert after["budget"]["used_bytes"] == 12345 and after["budget"]["free_bytes"] == 1024**3 - 12345
    assert isinstance(after["process"]["rss_bytes"], int) and after["process"]["rss_bytes"] > 0


def test_admin_models_lists_tier_models_and_loads_them(client: TestClient, fake_registry: FakeRegistry) -> None:
    listed = client.get("/api/admin/models").json()
    assert "data" in listed  # the MODELS_DIR list is still there
    assert [(t["tier"], t["id"], t["loaded"]) for t in listed["tiers"]] == [
        ("light", "light/fake-light", False),
        ("medium", "medium/fake-7b", False),
    ]
    assert listed["tiers"][0]["aliases"] == ["gpt-3.5-turbo", "small"] and listed["tiers"][0]["kind"] == "chat"
    loaded = client.post("/api/admin/models/medium/fake-7b/load")
    assert loaded.status_code == 200 and loaded.json()["state"] == "ready"
    assert [t["loaded"] for t in client.get("/admin/models").json()["tiers"]] == [False, True]
    assert client.post("/api/admin/models/medium/unload").json()["state"] == "unloaded"
    assert_error(client.post("/api/admin/models/nope/load"), 404, "model_not_found")


def test_keys_admin_only_unload_and_tier_restrictions(tmp_path: Path, fake_registry: FakeRegistry) -> None:
    settings = load_settings({**FAKE_ENV, "API_KEYS_FILE": str(key_file(tmp_path, KEYS))})
    app = create_app(settings, factories=fake_registry.factories())
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as client:
        assert_error(client.post("/api/v1/models/light/load"), 401, "invalid_api_key")
        assert client.post("/api/v1/models/light/load", headers=bearer("sk-app")).status_code == 200
        assert_error(client.post("/api/v1/models/medium/load", headers=bearer("sk-app")), 403, "model_not_allowed")
        assert_error(client.post("/api/v1/models/light/unload", headers=bearer("sk-app")), 403, "permission_denied")
        assert client.post("/api/v1/models/light/unload", headers=bearer("sk-ops")).json()["state"] == "unloaded"
        usage = client.get("/api/v1/models/memory/usage", headers=bearer("sk-app")).json()
        assert list(usage["tiers"]) == ["light"]  # a restricted key sees only its tiers
        assert_error(client.post("/api/admin/models/light/load", headers=bearer("sk-app")), 403, "permission_denied")
        assert client.post("/api/admin/models/light/load", headers=bearer("sk-ops")).status_code == 200
        assert client.get("/api/admin/models", headers=bearer("sk-ops")).status_code == 200


@pytest.mark.parametrize("env", [FAKE_ENV, {**FAKE_ENV, "API_KEYS": "sk-1"}])
def test_root_answers_like_ollama_without_a_key(make_client: Any, env: dict[str, str]) -> None:
    client = make_client(env)
    root = client.get("/")
    assert root.status_code == 200 and root.text == "Ollama is running"
    assert root.headers["content-type"].startswith("text/plain")
    head = client.head("/")
    assert head.status_code == 200 and head.content == b""
    assert client.get("/admin").status_code == 200  # the dashboard page is where it was
