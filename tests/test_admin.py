"""Admin API: status, load, unload (409 while busy, force cancels cleanly), cache stats and clear."""

from __future__ import annotations

import json
import threading
from typing import Any

import httpx

from tests.conftest import LiveServer
from tests.fakes import FakeRegistry
from tests.waiting import DEADLINE_S, wait_for

CHAT = {"model": "light", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


class StreamReader:
    """Reads an SSE stream on a thread; `started` is set once the first event arrived."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        self.events: list[Any] = []
        self.started = threading.Event()
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._read, args=(url, body), daemon=True)
        self.thread.start()

    def _read(self, url: str, body: dict[str, Any]) -> None:
        try:
            with httpx.stream("POST", url, json={**body, "stream": True}, timeout=DEADLINE_S) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        data = line.removeprefix("data: ")
                        self.events.append(data if data == "[DONE]" else json.loads(data))
                        self.started.set()
        finally:
            self.started.set()
            self.finished.set()


def test_status_lists_every_tier_with_its_lifecycle_fields(make_client: Any) -> None:
    client = make_client()
    client.post("/v1/chat/completions", json=CHAT)
    status = client.get("/admin/status").json()
    assert set(status["tiers"]) == {"light", "medium"}
    light = status["tiers"]["light"]
    for field in ("state", "backend", "model", "memory", "in_flight", "queued", "active", "last_use", "load_seconds"):
        assert field in light, field
    assert light["state"] == "ready" and light["last_use"] is not None
    assert status["tiers"]["medium"]["state"] == "unloaded"
    assert status["cache"]["entries"] == 1 and status["draining"] is False


def test_load_and_unload_a_tier_on_demand(make_client: Any, fake_registry: FakeRegistry) -> None:
    client = make_client()
    loaded = client.post("/admin/tiers/medium/load")
    assert loaded.status_code == 200 and loaded.json()["state"] == "ready"
    assert fake_registry.loads == {"medium": 1}
    unloaded = client.post("/admin/tiers/medium/unload")
    assert unloaded.status_code == 200 and unloaded.json()["state"] == "unloaded"
    assert fake_registry.models["medium"].closed


def test_an_unknown_tier_is_a_404_envelope(make_client: Any) -> None:
    response = make_client().post("/admin/tiers/heavy/load")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found" and "light" in response.json()["error"]["message"]


def test_unload_refuses_while_busy_and_force_cancels_the_stream(fake_registry: FakeRegistry) -> None:
    from config import load_settings
    from server import create_app
    from tests.conftest import FAKE_ENV

    app = create_app(load_settings(FAKE_ENV), factories=fake_registry.factories())
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=DEADLINE_S) as http:
        assert http.post("/admin/tiers/light/load").status_code == 200
        fake_registry.models["light"].hold_gate = threading.Event()  # every decode step blocks
        stream = StreamReader(f"{live.url}/v1/chat/completions", {**CHAT, "temperature": 0.5})
        assert stream.started.wait(DEADLINE_S)
        busy = http.post("/admin/tiers/light/unload")
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "conflict"
        forced = http.post("/admin/tiers/light/unload", params={"force": "true"})
        assert forced.status_code == 200 and forced.json()["cancelled"] == 1
        assert stream.finished.wait(DEADLINE_S)
        assert stream.events[-1]["error"]["code"] == "request_cancelled"
        assert "[DONE]" not in stream.events
        wait_for(lambda: http.get("/admin/status").json()["tiers"]["light"]["in_flight"] == 0, "nothing in flight")
        again = http.post("/v1/chat/completions", json=CHAT)  # the tier reloads on the next request
        assert again.status_code == 200
    assert fake_registry.loads == {"light": 2}


def test_cache_stats_and_clear(make_client: Any, fake_registry: FakeRegistry) -> None:
    client = make_client()
    client.post("/v1/chat/completions", json=CHAT)
    client.post("/v1/chat/completions", json=CHAT)
    stats = client.get("/admin/cache").json()
    assert (stats["entries"], stats["hits"], stats["misses"]) == (1, 1, 1) and stats["bytes"] > 0
    cleared = client.delete("/admin/cache").json()
    assert cleared["removed"] == 1 and cleared["entries"] == 0
    assert client.post("/v1/chat/completions", json=CHAT).headers["x-cache"] == "MISS"


def test_loading_a_broken_tier_is_a_503_envelope(make_client: Any) -> None:
    from core.errors import ModelUnavailable

    class Broken(FakeRegistry):
        def _load_chat(self, tier: Any, settings: Any) -> Any:
            raise ModelUnavailable(f"The {tier.name} tier's model file does not exist")

    client = make_client(registry=Broken())
    response = client.post("/admin/tiers/light/load")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "model_unavailable"
    assert client.get("/admin/status").json()["tiers"]["light"]["state"] == "failed"
