"""Remote embedding and rerank tiers: OpenAI/Cohere-style and TEI upstreams on loopback, another
llmservice as upstream, failover, the per-text cache, and the pool in /health."""

from __future__ import annotations

import math
import socket
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from config import load_settings
from remote.embeddings import load_remote_worker
from server import create_app
from tests.conftest import FAKE_ENV, LiveServer
from tests.fakes import FakeEmbedder
from tests.upstreams import StandIn, build

StartUpstream = Callable[[str], tuple[StandIn, str]]
Front = Callable[..., TestClient]


@pytest.fixture
def upstream() -> Iterator[StartUpstream]:
    """Start a stand-in upstream on 127.0.0.1: returns it and its root URL (no /v1)."""
    servers: list[LiveServer] = []

    def start(name: str) -> tuple[StandIn, str]:
        stand_in = StandIn(name)
        live = LiveServer(build(stand_in)).__enter__()
        servers.append(live)
        return stand_in, live.url

    yield start
    for live in servers:
        live.__exit__()


@pytest.fixture
def front() -> Iterator[Front]:
    clients: list[TestClient] = []

    def build_front(**env: str) -> TestClient:
        settings = load_settings({**FAKE_ENV, **env})
        client = TestClient(create_app(settings, {"workers:remote": load_remote_worker}), base_url="http://localhost")
        client.__enter__()
        clients.append(client)
        return client

    yield build_front
    for client in clients:
        client.__exit__(None, None, None)


def unit(vector: list[float]) -> list[float]:
    array = np.asarray(vector, dtype=np.float64)
    return (array / np.linalg.norm(array)).tolist()


def close(rows: list[list[float]], expected: list[list[float]]) -> bool:
    return len(rows) == len(expected) and all(np.allclose(a, b, atol=1e-6) for a, b in zip(rows, expected, strict=True))


def test_openai_embeddings_upstream(upstream: StartUpstream, front: Front) -> None:
    gpu, url = upstream("gpu")
    client = front(EMBEDDING_UPSTREAMS=f"{url}/v1", EMBEDDING_UPSTREAM_MODEL="bge")
    response = client.post("/v1/embeddings", json={"model": "embedding", "input": ["banana", "kiwi"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert close([d["embedding"] for d in body["data"]], [unit([6, 3, 1]), unit([4, 0, 1])])
    assert body["usage"]["prompt_tokens"] == 4  # the upstream's count
    assert gpu.paths == ["/v1/embeddings"] and gpu.requests[0]["model"] == "bge"
    again = client.post("/v1/embeddings", json={"model": "embedding", "input": ["kiwi", "fig"]})
    assert again.headers["x-cache"] == "MISS" and gpu.requests[1]["input"] == ["fig"]  # kiwi came from the cache


def test_tei_embed_upstream(upstream: StartUpstream, front: Front) -> None:
    tei, url = upstream("tei")
    client = front(EMBEDDING_UPSTREAMS=url, EMBEDDING_UPSTREAM_API="tei")
    response = client.post("/embed", json={"inputs": ["aaa"]})
    assert close(response.json(), [unit([3, 3, 1])])
    assert tei.paths == ["/embed"] and tei.requests[0]["inputs"] == ["aaa"]


def test_cohere_style_rerank_upstream_keeps_its_relevance(upstream: StartUpstream, front: Front) -> None:
    gpu, url = upstream("gpu")
    client = front(RERANKER_UPSTREAMS=f"{url}/v1", RERANKER_UPSTREAM_MODEL="rr")
    documents = ["red apples", "green apples and red wine", "blue sky"]
    body = {"model": "reranker", "query": "red apples", "documents": documents}
    results = client.post("/v1/rerank", json=body).json()["results"]
    assert [r["index"] for r in results] == [0, 1, 2]
    assert [r["relevance_score"] for r in results] == pytest.approx([1.0, 1.0, 0.0], abs=1e-6)
    assert gpu.requests[0]["documents"] == documents and gpu.requests[0]["model"] == "rr"


def test_tei_rerank_upstream_scores_are_logits(upstream: StartUpstream, front: Front) -> None:
    tei, url = upstream("tei")
    client = front(RERANKER_UPSTREAMS=url, RERANKER_UPSTREAM_API="tei")
    body = {"model": "reranker", "query": "red apples", "documents": ["red wine", "blue sky"]}
    results = client.post("/v1/rerank", json=body).json()["results"]
    assert [r["index"] for r in results] == [0, 1]
    assert results[0]["relevance_score"] == pytest.approx(1 / (1 + math.exp(-0.5)))
    assert tei.paths == ["/rerank"] and tei.requests[0]["texts"] == ["red wine", "blue sky"]


def test_embeddings_fail_over_and_the_pool_shows_in_health(upstream: StartUpstream, front: Front) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    busy, busy_url = upstream("busy")
    _, spare_url = upstream("spare")
    busy.status = 503
    dead = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    client = front(EMBEDDING_UPSTREAMS=f"{dead},{busy_url}/v1,{spare_url}/v1", EMBEDDING_UPSTREAM_MODEL="m")
    response = client.post("/v1/embeddings", json={"model": "embedding", "input": "fig"})
    sock.close()
    assert response.status_code == 200, response.text
    pool = client.get("/health").json()["tiers"]["embedding"]["upstreams"]
    assert [u["failures"] for u in pool] == [1, 1, 0] and pool[2]["requests"] == 1


def test_an_upstream_client_error_passes_through(upstream: StartUpstream, front: Front) -> None:
    gpu, url = upstream("gpu")
    gpu.status, gpu.error_code = 413, "too_big"
    client = front(RERANKER_UPSTREAMS=f"{url}/v1", RERANKER_UPSTREAM_MODEL="rr")
    response = client.post("/v1/rerank", json={"model": "reranker", "query": "q", "documents": ["d"]})
    assert response.status_code == 413 and response.json()["error"]["code"] == "too_big"


def test_another_llmservice_serves_embeddings(front: Front) -> None:
    embedder = FakeEmbedder()
    env = {**FAKE_ENV, "EMBEDDING_MODEL_PATH": "/models/fake-embedder", "EMBEDDING_BACKEND": "sentence_transformers"}
    factories = {"embedding:sentence_transformers": lambda tier, settings: embedder}
    with LiveServer(create_app(load_settings(env), factories)) as live:
        client = front(EMBEDDING_UPSTREAMS=f"{live.url}/v1", EMBEDDING_UPSTREAM_MODEL="embedding")
        response = client.post("/v1/embeddings", json={"model": "embedding", "input": ["a cat", "the sea"]})
        assert response.status_code == 200, response.text
        expected = [unit([5, 2, 0, 1]), unit([7, 1, 2, 1])]
        assert close([d["embedding"] for d in response.json()["data"]], expected)
        assert embedder.batches == [["a cat", "the sea"]]


def test_a_remote_tier_refuses_sparse_embeddings(upstream: StartUpstream, front: Front) -> None:
    _, url = upstream("gpu")
    client = front(EMBEDDING_UPSTREAMS=f"{url}/v1", EMBEDDING_UPSTREAM_MODEL="m")
    body: dict[str, Any] = {"model": "embedding", "input": "x", "return_sparse": True}
    assert client.post("/v1/embeddings", json=body).status_code == 400
