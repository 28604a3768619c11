"""No cold start for the packaged MiniLM (issue 17, item 5): until torch has loaded, a llama.cpp copy of the
model (a GGUF written once under the model cache) answers with the same vectors and token counts."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from config import load_settings
from core.bert_gguf import quick_start_eligible, quick_start_gguf
from embedders import QuickStartEmbedder, SentenceTransformerEmbedder, load_sentence_transformers
from server import create_app

pytestmark = pytest.mark.real

SENTENCES = [
    "A man is playing a guitar.",
    "",
    "The new movie is awesome!",
    "Café déjà vu — naïve résumé",
    "東京は日本の首都です。",
    "emoji 🎉 party",
    "  spaces   and\ttabs\n",
    "UPPER lower MiXeD",
    "don't won't can't",
    "e-mail: a.b@c.com, url https://x.y/z?q=1",
    "word " * 600,  # over MiniLM's 256 tokens: cut the way sentence-transformers cuts it
]


@pytest.fixture(scope="module")
def reference(minilm_path: Path) -> tuple[np.ndarray, list[int]]:
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_path), device="cpu")
    vectors = model.encode(SENTENCES, normalize_embeddings=True)
    counts = [min(len(ids), 256) for ids in model.tokenizer(SENTENCES)["input_ids"]]
    return vectors, counts


def _unit(rows: list[list[float]]) -> np.ndarray:
    array = np.array(rows)
    return array / np.linalg.norm(array, axis=1, keepdims=True)


def test_llama_cpp_answers_until_torch_is_in_with_the_same_vectors(
    minilm_path: Path, reference: tuple[np.ndarray, list[int]]
) -> None:
    tier = load_settings({"EMBEDDING_N_THREADS": "1"}).tiers["embedding"]
    release = threading.Event()
    built: list[SentenceTransformerEmbedder] = []

    def full() -> SentenceTransformerEmbedder:
        assert release.wait(300)
        built.append(SentenceTransformerEmbedder(tier, str(minilm_path)))
        return built[0]

    embedder = QuickStartEmbedder(tier, str(minilm_path), full_loader=full)
    try:
        assert embedder.max_input_tokens == 256 and embedder.dimension == 384
        quick = embedder.embed(SENTENCES, ("dense",), truncate=True)
        assert embedder.full is None and embedder.quick is not None  # torch not in yet: llama.cpp answered
        vectors, counts = reference
        assert (_unit(quick.dense or []) * vectors).sum(axis=1).min() >= 0.999
        assert quick.token_counts == counts
        release.set()
        assert embedder.loaded.wait(300)
        late = embedder.embed(SENTENCES[:3], ("dense",), truncate=True)
        assert embedder.quick is None and embedder.full is built[0]  # switched, llama.cpp's copy freed
        assert (_unit(late.dense or []) * vectors[:3]).sum(axis=1).min() >= 0.9999
    finally:
        release.set()
        embedder.close()


def test_the_gguf_copy_is_written_once(tmp_path: Path, minilm_path: Path) -> None:
    first = quick_start_gguf(minilm_path, root=tmp_path)
    stamp = first.stat().st_mtime_ns
    assert quick_start_gguf(minilm_path, root=tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no staging file left behind


def test_only_folders_the_writer_reproduces_are_eligible(tmp_path: Path, minilm_path: Path) -> None:
    assert quick_start_eligible(minilm_path)
    folder = tmp_path / "cls-pooled"
    shutil.copytree(minilm_path, folder, ignore=shutil.ignore_patterns("model.safetensors"))
    (folder / "model.safetensors").touch()
    assert quick_start_eligible(folder)
    pooling = folder / "1_Pooling" / "config.json"
    config = json.loads(pooling.read_text())
    pooling.write_text(json.dumps({**config, "pooling_mode_mean_tokens": False, "pooling_mode_cls_token": True}))
    assert not quick_start_eligible(folder)
    assert not quick_start_eligible(tmp_path / "missing")


def test_quick_start_off_loads_sentence_transformers() -> None:
    settings = load_settings({"QUICK_START_EMBEDDINGS": "false"})
    embedder = load_sentence_transformers(settings.tiers["embedding"], settings)
    try:
        assert isinstance(embedder, SentenceTransformerEmbedder)
    finally:
        embedder.close()


def test_a_first_request_through_http_is_answered_by_the_default_tier(
    reference: tuple[np.ndarray, list[int]],
) -> None:
    settings = load_settings({"LIGHT_MODEL_PATH": "", "RERANKER_MODEL_PATH": "", "SPEECH_MODEL_PATH": ""})
    with TestClient(create_app(settings), base_url="http://localhost") as client:
        response = client.post("/v1/embeddings", json={"model": "embedding", "input": SENTENCES, "truncate": True})
        health = client.get("/health").json()["tiers"]["embedding"]
    assert response.status_code == 200, response.text
    body = response.json()
    vectors, counts = reference
    assert (np.array([d["embedding"] for d in body["data"]]) * vectors).sum(axis=1).min() >= 0.999
    assert body["usage"]["prompt_tokens"] == sum(counts)
    assert health["backend"] == "sentence_transformers" and health["state"] == "ready"
