"""Rerank: one handler for every client format, over the default similarity reranker (MiniLM); and the
model rerankers (CrossEncoder, FlagReranker, GGUF rank pooling) on a tiny random cross-encoder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from config import load_settings
from server import create_app
from tests.test_embeddings import assert_error

pytestmark = pytest.mark.real

# No quick start: a test compares rerank scores with embeddings at 1e-5, and until torch is in the
# llama.cpp copy differs by ~1e-4 (tests/test_quick_start.py covers that copy).
ENV = {
    "LIGHT_MODEL_PATH": "",
    "ENABLE_CACHE": "false",
    "RERANKER_MAX_DOCUMENTS": "5",
    "QUICK_START_EMBEDDINGS": "false",
}
QUERY = "What is the capital of France?"
DOCS = ["Bananas are yellow and sweet.", "Paris is the capital of France.", "Berlin is a city in Germany."]


@pytest.fixture(scope="module")
def api() -> Iterator[TestClient]:
    with TestClient(
        create_app(load_settings(ENV)), raise_server_exceptions=False, base_url="http://localhost"
    ) as client:
        yield client


def post(api: TestClient, path: str, body: dict[str, Any]) -> Any:
    response = api.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_seed_and_cohere_shapes_sorted_by_score(api: TestClient) -> None:
    body = post(api, "/v1/rerank", {"model": "reranker", "query": QUERY, "documents": DOCS})
    indices = [r["index"] for r in body["results"]]
    assert indices[0] == 1 and sorted(indices) == [0, 1, 2]
    scores = [r["relevance_score"] for r in body["results"]]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)
    assert body["results"][0]["document"] == {"text": DOCS[1]}
    assert [d["index"] for d in body["data"]] == indices
    assert [d["score"] for d in body["data"]] == scores and body["data"][0]["document"] == DOCS[1]
    assert body["object"] == "rerank" and body["model"] == "reranker" and body["id"]
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0


def test_top_n_top_k_return_documents_and_cohere_extras(api: TestClient) -> None:
    cohere = {
        "model": "rerank-english-v3.0",
        "query": QUERY,
        "documents": [{"text": d} for d in DOCS],
        "top_n": 2,
        "return_documents": False,
        "max_tokens_per_doc": None,
        "rank_fields": ["text"],
        "max_chunks_per_doc": 10,
        "priority": 0,
    }
    body = post(api, "/v1/rerank", cohere)
    assert len(body["results"]) == 2 and "document" not in body["results"][0]
    jina = post(api, "/rerank", {"model": "jina-reranker-v2", "query": QUERY, "documents": DOCS, "top_k": 1})
    assert [r["index"] for r in jina["results"]] == [1]
    none_limit = post(api, "/v2/rerank", {"model": "reranker", "query": QUERY, "documents": DOCS, "top_n": None})
    assert len(none_limit["results"]) == 3


def test_raw_scores_are_cosine_similarities(api: TestClient) -> None:
    raw = post(api, "/v1/rerank", {"query": QUERY, "documents": DOCS, "raw_scores": True})
    unit = post(api, "/v1/rerank", {"query": QUERY, "documents": DOCS})
    for r, u in zip(raw["results"], unit["results"], strict=True):
        assert u["relevance_score"] == pytest.approx((r["relevance_score"] + 1) / 2)
    embedded = post(api, "/v1/embeddings", {"model": "embedding", "input": [QUERY, DOCS[1]]})
    q, d = (np.array(item["embedding"]) for item in embedded["data"])
    assert raw["results"][0]["relevance_score"] == pytest.approx(float(q @ d), abs=1e-5)


def test_tei_rerank_with_texts_is_a_bare_list(api: TestClient) -> None:
    body = post(api, "/rerank", {"query": QUERY, "texts": DOCS, "return_text": True})
    assert isinstance(body, list) and body[0] == {"index": 1, "score": body[0]["score"], "text": DOCS[1]}
    plain = post(api, "/rerank", {"query": QUERY, "texts": DOCS})
    assert set(plain[0]) == {"index", "score"}


def test_rerank_limits(api: TestClient) -> None:
    assert_error(api.post("/v1/rerank", json={"query": QUERY, "documents": []}), 400, "at least one")
    too_many = api.post("/v1/rerank", json={"query": QUERY, "documents": ["d"] * 6})
    assert_error(too_many, 400, "RERANKER_MAX_DOCUMENTS")
    long_query = api.post("/v1/rerank", json={"query": "word " * 600, "documents": DOCS})
    error = assert_error(long_query, 400, "limit")
    assert error["param"] == "query"
    assert_error(api.post("/v1/rerank", json={"documents": DOCS}), 400, "query")
    assert_error(api.post("/v1/rerank", json={"model": "embedding", "query": "q", "documents": DOCS}), 400, "rerank")


def test_models_list_says_the_reranker_kind(api: TestClient) -> None:
    owners = {card["id"]: card["owned_by"] for card in api.get("/v1/models").json()["data"]}
    assert "similarity" in owners["reranker/similarity"]


# ---------------------------------------------------------------- model rerankers


PAIRS = [("what is a fox", "the quick brown fox jumps"), ("what is a fox", "paris is in france"), ("hello", "")]


def hf_logits(folder: Path, pairs: list[tuple[str, str]], token_types: bool = True) -> list[float]:
    """The cross-encoder's logits straight from transformers."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    batch = tokenizer([p[0] for p in pairs], [p[1] for p in pairs], padding=True, return_tensors="pt")
    if not token_types:
        batch["token_type_ids"] = torch.zeros_like(batch["token_type_ids"])
    with torch.no_grad():
        return model(**batch).logits.view(-1).tolist()


def tier_for(path: Path, backend: str) -> Any:
    settings = load_settings({"LIGHT_MODEL_PATH": "", "RERANKER_MODEL_PATH": str(path), "RERANKER_BACKEND": backend})
    return settings.tiers["reranker"], settings


def test_cross_encoder_and_flag_reranker_give_the_model_logits(tiny_cross_encoder: Path) -> None:
    from rerankers import CrossEncoderReranker, FlagRerankerBackend, load_cross_encoder, load_flag_reranker

    expected = hf_logits(tiny_cross_encoder, PAIRS)
    cross = load_cross_encoder(*tier_for(tiny_cross_encoder, "cross_encoder"))
    flag = load_flag_reranker(*tier_for(tiny_cross_encoder, "flag_reranker"))
    np.testing.assert_allclose(cross.score(PAIRS), expected, atol=1e-4)
    np.testing.assert_allclose(flag.score(PAIRS), expected, atol=1e-4)
    assert isinstance(cross, CrossEncoderReranker) and isinstance(flag, FlagRerankerBackend)  # each loader its own
    assert cross.count_tokens(["hello world"]) == [4]


def test_gguf_rank_pooling_matches_the_classifier(cross_encoder_gguf: Path, tiny_cross_encoder: Path) -> None:
    from rerankers import load_llamacpp_reranker

    reranker = load_llamacpp_reranker(*tier_for(cross_encoder_gguf, "llamacpp"))
    try:
        # llama.cpp feeds token type 0 for both segments, so compare with that.
        expected = hf_logits(tiny_cross_encoder, PAIRS, token_types=False)
        np.testing.assert_allclose(reranker.score(PAIRS), expected, atol=1e-3)
    finally:
        reranker.close()


def test_cross_encoder_tier_through_the_api(tiny_cross_encoder: Path) -> None:
    env = {"LIGHT_MODEL_PATH": "", "RERANKER_MODEL_PATH": str(tiny_cross_encoder), "ENABLE_CACHE": "false"}
    settings = load_settings(env)
    assert settings.tiers["reranker"].backend == "cross_encoder"
    docs = [p[1] for p in PAIRS[:2]]
    with TestClient(create_app(settings), base_url="http://localhost") as client:
        body = post(client, "/v1/rerank", {"query": PAIRS[0][0], "documents": docs})
        raw = post(client, "/v1/rerank", {"query": PAIRS[0][0], "documents": docs, "raw_scores": True})
    logits = hf_logits(tiny_cross_encoder, PAIRS[:2])
    by_index = {r["index"]: r["relevance_score"] for r in body["results"]}
    raw_by_index = {r["index"]: r["relevance_score"] for r in raw["results"]}
    for i, logit in enumerate(logits):
        assert raw_by_index[i] == pytest.approx(logit, abs=1e-4)
        assert by_index[i] == pytest.approx(1 / (1 + np.exp(-logit)), abs=1e-4)


def test_flag_reranker_loads_llm_rerankers(tiny_mlx_model: Path) -> None:
    """A causal-LM folder goes to FlagLLMReranker (bge-reranker-v2-gemma style); batching keeps scores."""
    from rerankers import load_flag_reranker

    reranker = load_flag_reranker(*tier_for(tiny_mlx_model, "flag_reranker"))
    assert type(reranker.model).__name__ != "FlagReranker"
    together = reranker.score(PAIRS[:2])
    alone = [reranker.score([pair])[0] for pair in PAIRS[:2]]
    assert all(np.isfinite(together))
    np.testing.assert_allclose(together, alone, atol=1e-4)
