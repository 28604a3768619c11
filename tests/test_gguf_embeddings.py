"""GGUF embeddings through llama.cpp: the packaged MiniLM written as a GGUF by a fixture, served by the
embedding tier with `EMBEDDING_BACKEND` inferred from the file name, matching sentence-transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from config import load_settings
from server import create_app
from tests.test_embeddings import assert_error

pytestmark = pytest.mark.real

TEXTS = ["A man is playing a guitar.", "", "The new movie is awesome!"]


def test_gguf_embeddings_match_sentence_transformers(minilm_gguf: Path, minilm_path: Path) -> None:
    from sentence_transformers import SentenceTransformer

    env = {"LIGHT_MODEL_PATH": "", "EMBEDDING_MODEL_PATH": str(minilm_gguf), "EMBEDDING_N_THREADS": "2"}
    settings = load_settings(env)
    assert settings.tiers["embedding"].backend == "llamacpp"
    with TestClient(create_app(settings), raise_server_exceptions=False, base_url="http://localhost") as client:
        response = client.post("/v1/embeddings", json={"model": "embedding", "input": TEXTS})
        assert response.status_code == 200, response.text
        body = response.json()
        too_long = client.post("/v1/embeddings", json={"model": "embedding", "input": "word " * 600})
        truncated = client.post("/v1/embeddings", json={"model": "embedding", "input": "word " * 600, "truncate": True})
        health = client.get("/health").json()["tiers"]["embedding"]
    ours = np.array([item["embedding"] for item in body["data"]])
    reference = SentenceTransformer(str(minilm_path), device="cpu").encode(TEXTS)
    assert ours.shape == reference.shape
    assert (ours * reference).sum(axis=1).min() > 0.999
    assert body["usage"]["prompt_tokens"] == 9 + 2 + 8  # the same WordPiece counts as the HF tokenizer
    assert_error(too_long, 400, "512")
    assert truncated.status_code == 200
    assert health["backend"] == "llamacpp" and health["state"] == "ready"
