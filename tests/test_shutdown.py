"""Drain and exit of a real server process: SIGTERM, Ctrl-C and inactivity auto-shutdown.

Streams are held open by the fake model's HOLD gate (a file the test creates to let them finish), so
"the stream is still open" is a fact the test controls, not a race against the clock. Every wait is on
an event (a process exiting, a stream ending, a status changing), never on time passing.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.processes import ServerProcess
from tests.waiting import DEADLINE_S, wait_for

CHAT = {"model": "light", "messages": [{"role": "user", "content": "hi"}]}


class HeldStream:
    """A streamed chat request whose generation waits until `release()`; read on a thread."""

    def __init__(self, url: str, workdir: Path) -> None:
        self.gate = workdir / "release-stream"
        self.events: list[Any] = []
        self.started = threading.Event()
        self.finished = threading.Event()
        body = {
            "model": "light",
            "messages": [{"role": "user", "content": f"HOLD:{self.gate}"}],
            "stream": True,
        }
        self.thread = threading.Thread(target=self._read, args=(url, body), daemon=True)
        self.thread.start()
        assert self.started.wait(DEADLINE_S), "the stream did not start"

    def _read(self, url: str, body: dict[str, Any]) -> None:
        try:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=DEADLINE_S) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        data = line.removeprefix("data: ")
                        self.events.append(data if data == "[DONE]" else json.loads(data))
                        self.started.set()
        except httpx.HTTPError as exc:
            self.events.append({"transport_error": repr(exc)})
        finally:
            self.started.set()
            self.finished.set()

    def release(self) -> None:
        self.gate.write_text("go")

    @property
    def text(self) -> str:
        return "".join(
            e["choices"][0]["delta"].get("content", "") for e in self.events if isinstance(e, dict) and e.get("choices")
        )


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    return tmp_path


def start(processes: list[ServerProcess], workdir: Path, **env: str) -> ServerProcess:
    process = ServerProcess(workdir, **env)
    processes.append(process)
    process.wait_port()
    return process


def shutting_down(url: str) -> bool:
    try:
        response = httpx.get(f"{url}/health", timeout=5)
    except httpx.TransportError:
        return False
    if response.status_code != 503:
        return False
    assert response.json()["error"]["code"] == "shutting_down"
    assert response.headers["retry-after"]
    return True


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_drains_then_exits_cleanly(processes: list[ServerProcess], workdir: Path, sig: int) -> None:
    server = start(processes, workdir, CACHE_PERSIST_TO_DISK="true", DRAIN_TIMEOUT="60")
    url = server.url
    stream = HeldStream(url, workdir)
    server.signal(sig)
    wait_for(lambda: shutting_down(url), "503 for new requests")
    assert not stream.finished.is_set()
    stream.release()
    assert stream.finished.wait(DEADLINE_S)
    assert stream.events[-1] == "[DONE]" and stream.text.startswith("echo: HOLD:")
    assert server.wait() == 0
    assert not server.port_file.exists()
    assert "disk cache closed" in server.log


def test_the_drain_deadline_cancels_what_is_left(processes: list[ServerProcess], workdir: Path) -> None:
    server = start(processes, workdir, DRAIN_TIMEOUT="1")
    stream = HeldStream(server.url, workdir)
    server.signal(signal.SIGTERM)
    assert server.wait() == 0
    assert stream.finished.wait(DEADLINE_S)
    assert stream.events[-1]["error"]["code"] == "request_cancelled"
    assert "[DONE]" not in stream.events
    assert "cancelling 1 request" in server.log
    assert not server.port_file.exists()


def test_inactivity_shutdown_waits_for_an_open_stream(processes: list[ServerProcess], workdir: Path) -> None:
    # The stream must open before the idle clock runs out; a loaded machine may be slower than a short
    # timeout, so a server that exited before the stream opened is tried again with a longer one.
    for timeout in ("0.2", "1", "5", "25"):
        attempt = workdir / f"idle-{timeout}"
        attempt.mkdir()
        server = start(processes, attempt, SHUTDOWN_TIMEOUT=timeout)
        port = server.read_port()
        url = f"http://127.0.0.1:{port}"
        stream = HeldStream(url, attempt) if port is not None else None
        if stream is not None and stream.events and "transport_error" not in stream.events[0]:
            break
        server.wait()
    else:
        pytest.fail("no stream opened before the idle timeout, even at 25 s")
    # The clock: a second server with the same timeout, started after the stream opened, exits for
    # inactivity. By then the first one's idle timeout has passed too, while its stream was open.
    (attempt / "control").mkdir()
    control = start(processes, attempt / "control", SHUTDOWN_TIMEOUT=timeout)
    assert control.wait() == 0 and "no requests for" in control.log
    assert httpx.get(f"{url}/health", timeout=DEADLINE_S).status_code == 200
    assert server.proc.poll() is None
    assert "no requests for" not in server.log  # not even draining
    stream.release()
    assert stream.finished.wait(DEADLINE_S)
    assert stream.events[-1] == "[DONE]"
    assert server.wait() == 0
    assert "no requests for" in server.log
    assert not server.port_file.exists()


def test_an_idle_server_exits_although_monitors_keep_polling(processes: list[ServerProcess], workdir: Path) -> None:
    server = start(processes, workdir, SHUTDOWN_TIMEOUT="0.5")
    url = server.url
    assert httpx.post(f"{url}/v1/chat/completions", json=CHAT, timeout=DEADLINE_S).status_code == 200
    polls = 0

    def exited_while_polling() -> bool:
        nonlocal polls
        if server.proc.poll() is not None:
            return True
        for path in ("/health", "/metrics", "/admin/status"):
            try:
                httpx.get(f"{url}{path}", timeout=5)
                polls += 1
            except httpx.TransportError:
                pass  # it is going away
        return server.proc.poll() is not None

    wait_for(exited_while_polling, "exit despite monitoring polls")
    assert server.wait() == 0 and polls > 0
    assert not server.port_file.exists()
