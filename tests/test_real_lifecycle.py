"""The real `server.py` process on the packaged Gemma GGUF: lazy load, cache hit, admin, clean exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.processes import REPO
from tests.waiting import DEADLINE_S, wait_for

pytestmark = pytest.mark.real


@pytest.fixture
def gemma_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    port_file = tmp_path / ".port"
    env = {
        **os.environ,
        "PORT": "0",
        "PORT_FILE": str(port_file),
        "EMBEDDING_MODEL_PATH": "",
        "RERANKER_MODEL_PATH": "",
        "LIGHT_N_CTX": "512",
        "LIGHT_N_THREADS": "2",
        "CACHE_PERSIST_TO_DISK": "true",
        "CACHE_DIR": str(tmp_path / "cache"),
    }
    env.pop("LIGHT_MODEL_PATH", None)  # the packaged Gemma 270M
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, str(REPO / "server.py")], cwd=tmp_path, env=env, stdout=log, stderr=log)
    try:
        wait_for(lambda: port_file.exists() or proc.poll() is not None, "the .port file")
        assert proc.poll() is None, (tmp_path / "server.log").read_text()
        yield proc, port_file
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(DEADLINE_S)
        log.close()


def test_gemma_loads_on_demand_caches_and_exits_cleanly(gemma_server: tuple[subprocess.Popen[bytes], Path]) -> None:
    proc, port_file = gemma_server
    url = f"http://127.0.0.1:{port_file.read_text().strip()}"
    body = {"model": "light", "messages": [{"role": "user", "content": "Say hi."}], "temperature": 0, "max_tokens": 8}
    with httpx.Client(base_url=url, timeout=300) as client:
        assert client.get("/admin/status").json()["tiers"]["light"]["state"] == "unloaded"
        miss = client.post("/v1/chat/completions", json=body)
        assert miss.status_code == 200 and miss.headers["x-cache"] == "MISS"
        status = client.get("/admin/status").json()["tiers"]["light"]
        assert status["state"] == "ready" and status["memory"]["estimated_bytes"] > 100_000_000
        hit = client.post("/v1/chat/completions", json={**body, "stream": True})
        assert hit.headers["x-cache"] == "HIT"
        replayed = "".join(
            json.loads(line[6:])["choices"][0]["delta"].get("content", "")
            for line in hit.text.splitlines()
            if line.startswith("data: {")
        )
        assert replayed == miss.json()["choices"][0]["message"]["content"]
        assert client.post("/admin/tiers/light/unload").json()["state"] == "unloaded"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(DEADLINE_S) == 0
    assert not port_file.exists()
