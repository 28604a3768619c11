"""The replaced servers' prefixes: every /v1 route under /api/v1, the admin API under /api/admin, and
/api/v1/health; Ollama keeps the rest of /api."""

from __future__ import annotations

from typing import Any

import openai
from fastapi.testclient import TestClient

from tests.conftest import FAKE_ENV, LiveServer
from tests.test_cache_rag import ENV, RagRegistry
from tests.test_metrics import scrape, value
from tests.waiting import DEADLINE_S

CHAT = {"model": "light", "messages": [{"role": "user", "content": "hi"}]}


def test_v1_routes_answer_under_api_v1(make_client: Any) -> None:
    client = make_client(ENV, registry=RagRegistry())
    for path in ("/v1", "/api/v1"):
        chat = client.post(f"{path}/chat/completions", json=CHAT)
        assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == "echo: hi"
        assert client.post(f"{path}/completions", json={"model": "light", "prompt": "x"}).status_code == 200
        assert client.get(f"{path}/models").json()["data"][0]["id"] == "light/fake-light"
        assert client.get(f"{path}/models/light").json()["id"] == "light/fake-light"
        assert len(client.post(f"{path}/embeddings", json={"model": "embedding", "input": "a"}).json()["data"]) == 1
        rerank = client.post(f"{path}/rerank", json={"query": "a b", "documents": ["a", "c"]})
        assert rerank.json()["results"][0]["index"] == 0
    samples = scrape(client)
    assert value(samples, "llmservice_requests_total", tier="light", endpoint="/api/v1/chat/completions", status="200")


def test_admin_routes_answer_under_api_admin(client: TestClient) -> None:
    status = client.get("/api/admin/status")
    assert status.status_code == 200 and set(status.json()["tiers"]) == {"light", "medium"}
    loaded = client.post("/api/admin/tiers/medium/load")
    assert loaded.status_code == 200 and loaded.json()["state"] == "ready"
    assert client.post("/api/admin/tiers/medium/unload").json()["state"] == "unloaded"
    assert client.get("/api/admin/cache").status_code == 200


def test_api_v1_health_is_public_like_health(make_client: Any) -> None:
    client = make_client({**FAKE_ENV, "API_KEYS": "sk-1"})
    assert client.get("/api/v1/health").json() == {"status": "ok"}
    detailed = client.get("/api/v1/health", headers={"Authorization": "Bearer sk-1"}).json()
    assert set(detailed["tiers"]) == {"light", "medium"}
    assert client.get("/api/v1/models").status_code == 401
    assert client.get("/api/admin/status").status_code == 401


def test_openai_sdk_works_with_the_api_v1_base_url(live_fake_server: LiveServer) -> None:
    sdk = openai.OpenAI(base_url=live_fake_server.url + "/api/v1", api_key="x", max_retries=0, timeout=DEADLINE_S)
    reply = sdk.chat.completions.create(model="light", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "echo: hi"
    assert [m.id for m in sdk.models.list()] == ["light/fake-light", "medium/fake-7b"]


def test_ollama_keeps_the_rest_of_api(client: TestClient) -> None:
    assert client.post("/api/chat", json={**CHAT, "stream": False}).json()["message"]["content"] == "echo: hi"
    assert client.get("/api/v1/chat").status_code == 404
    assert client.post("/api/models").status_code == 404
