"""The response cache on the embeddings and rerank endpoints, over fake models that record their work."""

from __future__ import annotations

import math
from typing import Any

import pytest

from config import Settings, TierConfig
from tests.conftest import FAKE_ENV
from tests.fakes import FakeEmbedder, FakeRegistry, FakeReranker

ENV = {**FAKE_ENV, "EMBEDDING_MODEL_PATH": "/models/fake-embedder", "RERANKER_BACKEND": "similarity"}


class RagRegistry(FakeRegistry):
    def __init__(self) -> None:
        super().__init__()
        self.embedder = FakeEmbedder()
        self.reranker = FakeReranker()

    def factories(self) -> dict[str, Any]:
        def embedder(tier: TierConfig, settings: Settings) -> FakeEmbedder:
            return self.embedder

        def reranker(tier: TierConfig, settings: Settings) -> FakeReranker:
            return self.reranker

        return {**super().factories(), "embedding:sentence_transformers": embedder, "rerank:similarity": reranker}


@pytest.fixture
def rag() -> RagRegistry:
    return RagRegistry()


@pytest.fixture
def client(make_client: Any, rag: RagRegistry) -> Any:
    return make_client(ENV, registry=rag)


def embed(client: Any, inputs: list[str], headers: dict[str, str] | None = None, **extra: Any) -> Any:
    response = client.post("/v1/embeddings", json={"model": "embedding", "input": inputs, **extra}, headers=headers)
    assert response.status_code == 200, response.text
    return response


def vectors(response: Any) -> list[list[float]]:
    return [item["embedding"] for item in response.json()["data"]]


def test_a_batch_with_known_texts_embeds_only_the_new_ones(client: Any, rag: RagRegistry) -> None:
    first = embed(client, ["alpha", "beta"])
    assert first.headers["x-cache"] == "MISS"
    second = embed(client, ["beta", "gamma", "alpha", "gamma"])
    assert second.headers["x-cache"] == "MISS"  # gamma was new
    assert rag.embedder.batches == [["alpha", "beta"], ["gamma"]]
    by_text = dict(zip(["alpha", "beta"], vectors(first), strict=True))
    got = vectors(second)
    assert got[0] == by_text["beta"] and got[2] == by_text["alpha"] and got[1] == got[3]
    assert [item["index"] for item in second.json()["data"]] == [0, 1, 2, 3]
    third = embed(client, ["gamma", "alpha"])
    assert third.headers["x-cache"] == "HIT"
    assert len(rag.embedder.batches) == 2


def test_dimensions_and_encoding_are_applied_to_cached_rows(client: Any, rag: RagRegistry) -> None:
    embed(client, ["banana"])
    cut = embed(client, ["banana"], dimensions=2)
    assert cut.headers["x-cache"] == "HIT"
    (vector,) = vectors(cut)
    assert len(vector) == 2 and math.isclose(math.hypot(*vector), 1.0, rel_tol=1e-6)
    too_wide = client.post("/v1/embeddings", json={"model": "embedding", "input": ["banana"], "dimensions": 9})
    assert too_wide.status_code == 400 and too_wide.json()["error"]["param"] == "dimensions"
    assert len(rag.embedder.batches) == 1


def test_sparse_weights_keep_their_token_ids_through_the_cache(client: Any, rag: RagRegistry) -> None:
    live = client.post("/embed_sparse", json={"inputs": ["kiwi"]})
    cached = client.post("/embed_sparse", json={"inputs": ["kiwi"]})
    assert (live.headers["x-cache"], cached.headers["x-cache"]) == ("MISS", "HIT")
    assert cached.json() == live.json() == [[{"index": 7, "value": 4.0}, {"index": ord("k"), "value": 0.5}]]


def test_embedding_errors_are_not_cached_and_no_cache_recomputes(client: Any, rag: RagRegistry) -> None:
    failed = client.post("/v1/embeddings", json={"model": "embedding", "input": ["ok", "BOOM"]})
    assert failed.status_code >= 500 and "error" in failed.json()
    assert client.get("/admin/cache").json()["entries"] == 0
    embed(client, ["ok"])
    again = embed(client, ["ok"], headers={"Cache-Control": "no-cache"})
    assert again.headers["x-cache"] == "MISS"
    assert rag.embedder.batches == [["ok"], ["ok"]]


def test_rerank_is_cached_per_request(client: Any, rag: RagRegistry) -> None:
    body = {"model": "reranker", "query": "red fruit", "documents": ["a red apple", "blue sky", "red fruit salad"]}
    first = client.post("/v1/rerank", json=body)
    second = client.post("/v1/rerank", json=body)
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert second.json()["results"] == first.json()["results"]
    assert [r["index"] for r in first.json()["results"]] == [2, 0, 1]
    other = client.post("/v1/rerank", json={**body, "top_n": 1})
    assert other.headers["x-cache"] == "MISS" and len(other.json()["results"]) == 1
    assert len(rag.reranker.batches) == 2


def test_cache_off_means_no_header_and_no_reuse(make_client: Any, rag: RagRegistry) -> None:
    client = make_client({**ENV, "ENABLE_CACHE": "false"}, registry=rag)
    for _ in range(2):
        assert "x-cache" not in embed(client, ["same"]).headers
    assert rag.embedder.batches == [["same"], ["same"]]
