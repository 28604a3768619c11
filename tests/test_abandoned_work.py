"""Abandoned work stops: a request's choices live and die together, and a non-streamed request
whose client leaves is cancelled at once (streams are covered in test_concurrency.py)."""

from __future__ import annotations

import gc
import json
import socket
import threading
from typing import Any

import pytest

from config import load_settings
from server import create_app
from tests.conftest import FAKE_ENV, LiveServer
from tests.fakes import FakeRegistry
from tests.waiting import wait_for

FOREVER = 100_000  # max_tokens no fake reply reaches before the test ends


def raw_post(port: int, path: str, body: dict[str, Any]) -> socket.socket:
    """Send a request and leave the response unread (the caller closes the socket to disconnect)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    head = f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    return sock


def test_a_non_streamed_request_whose_client_leaves_is_cancelled(caplog: pytest.LogCaptureFixture) -> None:
    registry = FakeRegistry()
    # Loaded at start-up and held: the fake writes its whole budget (the context's room) in tens of
    # milliseconds, which could end the request before the client leaves.
    settings = load_settings({**FAKE_ENV, "LIGHT_PRELOAD": "true"})
    with LiveServer(create_app(settings, factories=registry.factories())) as live:
        model = wait_for(lambda: registry.models.get("light"), "the light model loaded")
        model.hold_gate = threading.Event()  # a step lasts until its sequences are cancelled
        body = {"model": "light", "messages": [{"role": "user", "content": "ENDLESS"}], "max_tokens": FOREVER}
        sock = raw_post(live.port, "/v1/chat/completions", body)
        job = wait_for(lambda: model.inserted and model.inserted[-1], "the request's sequence started")
        sock.close()
        wait_for(job.cancelled.is_set, "the cancel after the client left")
        wait_for(lambda: job in model.removed, "the sequence removed")
        scheduler = live.app.state.llm.manager.tiers["light"].worker.scheduler
        wait_for(lambda: scheduler.active == 0, "no active sequence")
        assert job.completion_tokens < FOREVER
    gc.collect()  # an unread cancelled gather would log its stack now
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


def test_choices_queued_before_one_is_refused_are_cancelled(make_client: Any, fake_registry: FakeRegistry) -> None:
    # Two sequence slots and no queue: the third of four choices is refused with 503.
    client = make_client({**FAKE_ENV, "LIGHT_MAX_QUEUE": "0"})
    body = {"model": "light", "prompt": "ENDLESS", "n": 4, "max_tokens": FOREVER}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "overloaded"
    scheduler = client.app.state.llm.manager.tiers["light"].worker.scheduler
    wait_for(lambda: scheduler.active == 0 and scheduler.queued == 0, "the queued choices dropped")
    model = fake_registry.models["light"]
    assert all(job.cancelled.is_set() for job in model.inserted)
    assert all(job.completion_tokens < FOREVER for job in model.inserted)


def test_a_request_over_its_time_limit_is_stopped_with_504(make_client: Any, fake_registry: FakeRegistry) -> None:
    client = make_client({**FAKE_ENV, "LIGHT_REQUEST_TIMEOUT": "0.2"})
    body = {"model": "light", "messages": [{"role": "user", "content": "hello"}]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200  # loaded, and fast enough
    model = fake_registry.models["light"]
    model.hold_gate = threading.Event()  # from now on a decode step lasts until its sequences are cancelled
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "request_timeout"
    streamed = client.post("/v1/chat/completions", json={**body, "stream": True})
    events = [line for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert json.loads(events[-1][len("data: ") :])["error"]["code"] == "request_timeout"
    assert "data: [DONE]" not in events
    scheduler = client.app.state.llm.manager.tiers["light"].worker.scheduler
    wait_for(lambda: scheduler.active == 0, "the timed-out sequences stopped")
    assert all(job.cancelled.is_set() for job in model.inserted[1:])
