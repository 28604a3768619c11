"""Shared fixtures: apps over fakes, real models loaded once per session, live servers on port 0."""

from __future__ import annotations

import os

pytest_plugins = ["tests.rag_fixtures"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import asyncio  # noqa: E402
import socket  # noqa: E402
import threading  # noqa: E402
from collections.abc import Iterator, Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import pytest  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from config import Settings, load_settings  # noqa: E402
from server import create_app  # noqa: E402
from tests.fakes import FakeRegistry  # noqa: E402
from tests.waiting import wait_for  # noqa: E402

FAKE_ENV = {
    "LIGHT_MODEL_PATH": "/models/fake-light.gguf",
    "MEDIUM_MODEL_PATH": "/models/fake-7b.gguf",
    "EMBEDDING_MODEL_PATH": "",
    "RERANKER_MODEL_PATH": "",
    "SPEECH_MODEL_PATH": "",
    "LIGHT_ALIASES": "gpt-3.5-turbo,small",
    "LIGHT_MAX_TOKENS": "64",
}


@pytest.fixture
def fake_registry() -> FakeRegistry:
    return FakeRegistry()


@pytest.fixture
def make_client(fake_registry: FakeRegistry) -> Iterator[Any]:
    """Build a TestClient over fakes for an environment mapping (defaults: FAKE_ENV)."""
    clients: list[TestClient] = []

    def build(env: Mapping[str, str] | None = None, registry: FakeRegistry | None = None) -> TestClient:
        settings = load_settings(FAKE_ENV if env is None else env)
        app = create_app(settings, factories=(registry or fake_registry).factories())
        # A loopback Host: the Host allowlist (security.py) refuses TestClient's default "testserver".
        client = TestClient(app, base_url="http://localhost", raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield build
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client: Any) -> TestClient:
    return make_client()


@pytest.fixture
def processes() -> Iterator[list[Any]]:
    """Server subprocesses a test starts (tests/processes.py); each is stopped when the test ends."""
    started: list[Any] = []
    yield started
    for process in started:
        process.stop()


# ---------------------------------------------------------------- live servers


class LiveServer:
    """A real uvicorn on 127.0.0.1:<free port>, in a background thread with its own event loop."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP_NODELAY
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.sock])), daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        wait_for(lambda: self.server.started or not self.thread.is_alive(), "the live server starting")
        assert self.server.started, "the live server's thread ended before it started"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)


@pytest.fixture
def live_fake_server(fake_registry: FakeRegistry) -> Iterator[LiveServer]:
    app = create_app(load_settings(FAKE_ENV), factories=fake_registry.factories())
    with LiveServer(app) as live:
        yield live


# ---------------------------------------------------------------- real models (loaded once per session)


@pytest.fixture(scope="session")
def gemma_path() -> str:
    from config import PACKAGED_GEMMA
    from core.model_paths import resolve_model_path

    return resolve_model_path(PACKAGED_GEMMA)


def real_settings(extra: Mapping[str, str] | None = None) -> Settings:
    # No quick start: the real-model tests compare vectors across requests at 1e-6, and the quick-start copy
    # (cosine >= 0.999, tests/test_quick_start.py) hands over to sentence-transformers whenever torch is in.
    env = {
        "LIGHT_N_CTX": "1024",
        "LIGHT_PARALLEL": "4",
        "LIGHT_N_THREADS": "2",
        "QUICK_START_EMBEDDINGS": "false",
        **(extra or {}),
    }
    return load_settings(env)


@pytest.fixture(scope="session")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The embedded default models behind a live server, shared by every real-model API test."""
    cache_dir = tmp_path_factory.mktemp("cache")
    app = create_app(real_settings({"ENABLE_CACHE": "false", "CACHE_DIR": str(cache_dir)}))
    with LiveServer(app) as live:
        yield live


@pytest.fixture(scope="session")
def tiny_mlx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama (transformers) with a small BPE tokenizer, saved as an HF folder for mlx-lm."""
    from tests.model_builders import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
