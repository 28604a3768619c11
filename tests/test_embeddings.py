"""/v1/embeddings and TEI /embed against the packaged all-MiniLM-L6-v2 through the whole HTTP stack."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from config import load_settings
from server import create_app

pytestmark = pytest.mark.real

# Vectors are compared across requests at 1e-6: no quick-start copy handing over mid-module.
ENV = {"LIGHT_MODEL_PATH": "", "ENABLE_CACHE": "false", "EMBEDDING_N_THREADS": "2", "QUICK_START_EMBEDDINGS": "false"}


@pytest.fixture(scope="module")
def api() -> Iterator[TestClient]:
    with TestClient(
        create_app(load_settings(ENV)), raise_server_exceptions=False, base_url="http://localhost"
    ) as client:
        yield client


def embed(api: TestClient, inputs: Any, **extra: Any) -> dict[str, Any]:
    response = api.post("/v1/embeddings", json={"model": "text-embedding-3-small", "input": inputs, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def vectors(body: dict[str, Any]) -> np.ndarray:
    return np.array([item["embedding"] for item in body["data"]], dtype=np.float64)


def assert_error(response: Any, status: int, fragment: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["code"], str)
    assert fragment in error["message"]
    return error


def test_similar_sentences_score_higher(api: TestClient) -> None:
    body = embed(
        api,
        ["A cat is sitting on the mat.", "There is a cat on the rug.", "The stock market fell sharply today."],
    )
    v = vectors(body)
    assert v.shape == (3, 384)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    assert body["object"] == "list" and body["model"] == "text-embedding-3-small"


def test_float_and_base64_decode_to_the_same_vector(api: TestClient) -> None:
    text = "retrieval augmented generation"
    as_float = vectors(embed(api, text, encoding_format="float"))[0]
    encoded = embed(api, text, encoding_format="base64")["data"][0]["embedding"]
    assert isinstance(encoded, str)
    decoded = np.frombuffer(base64.b64decode(encoded), dtype="<f4")
    np.testing.assert_allclose(decoded, as_float, rtol=1e-6, atol=1e-7)


def test_dimensions_truncates_and_renormalises(api: TestClient) -> None:
    full = vectors(embed(api, "matryoshka dolls"))[0]
    cut = vectors(embed(api, "matryoshka dolls", dimensions=64))[0]
    assert cut.shape == (64,)
    assert abs(np.linalg.norm(cut) - 1.0) < 1e-5
    np.testing.assert_allclose(cut, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)


def test_dimensions_larger_than_the_model_is_a_400(api: TestClient) -> None:
    response = api.post("/v1/embeddings", json={"model": "embedding", "input": "x", "dimensions": 1000})
    error = assert_error(response, 400, "384")
    assert error["param"] == "dimensions"


def test_embedding_dimension_setting_applies_by_default() -> None:
    with TestClient(
        create_app(load_settings({**ENV, "EMBEDDING_EMBEDDING_DIMENSION": "128"})), base_url="http://localhost"
    ) as client:
        v = vectors(embed(client, ["one", "two"]))
    assert v.shape == (2, 128)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)


def test_token_id_input_matches_its_text(api: TestClient) -> None:
    import bpe_openai

    encoding = bpe_openai.get_encoding("cl100k_base")
    texts = ["The quick brown fox jumps over the lazy dog.", "Embeddings from token ids"]
    from_text = vectors(embed(api, texts))
    from_ids = vectors(embed(api, [encoding.encode(t) for t in texts]))
    single = vectors(embed(api, encoding.encode(texts[0])))
    assert (from_text * from_ids).sum(axis=1).min() > 0.999
    assert float(from_text[0] @ single[0]) > 0.999


def test_token_ids_outside_cl100k_are_a_400(api: TestClient) -> None:
    response = api.post("/v1/embeddings", json={"model": "embedding", "input": [5, 999_999]})
    assert_error(response, 400, "cl100k")


def test_empty_strings_are_valid_and_usage_counts_tokens(api: TestClient) -> None:
    body = embed(api, ["", "hello world"])
    assert len(body["data"]) == 2
    # MiniLM's tokenizer: [CLS] [SEP] for "", [CLS] hello world [SEP] for the second.
    assert body["usage"] == {"prompt_tokens": 2 + 4, "total_tokens": 6}


def test_over_long_input_is_a_400_unless_truncated(api: TestClient) -> None:
    long_text = "word " * 600
    response = api.post("/v1/embeddings", json={"model": "embedding", "input": ["short", long_text]})
    error = assert_error(response, 400, "256")
    assert error["code"] == "context_length_exceeded"
    body = embed(api, ["short", long_text], truncate=True)
    assert body["usage"]["prompt_tokens"] == 3 + 256


def test_sparse_from_a_dense_only_model_is_a_400_naming_what_it_supports(api: TestClient) -> None:
    response = api.post("/v1/embeddings", json={"model": "embedding", "input": "x", "embedding_type": "sparse"})
    assert_error(response, 400, "supports: dense")
    response = api.post("/v1/embeddings", json={"model": "embedding", "input": "x", "return_sparse": True})
    assert_error(response, 400, "'sparse'")


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"model": "embedding", "input": []}, "input"),
        ({"model": "embedding"}, "input"),
        ({"model": "embedding", "input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"model": "embedding", "input": "x", "dimensions": 0}, "dimensions"),
    ],
)
def test_bad_bodies_are_400_not_422(api: TestClient, payload: dict[str, Any], fragment: str) -> None:
    assert_error(api.post("/v1/embeddings", json=payload), 400, fragment)


def test_model_names_resolve_by_kind(api: TestClient) -> None:
    assert_error(api.post("/v1/embeddings", json={"model": "reranker", "input": "x"}), 400, "reranker tier")
    assert_error(api.post("/v1/embeddings", json={"model": "no-such-thing", "input": "x"}), 404, "does not exist")
    assert api.post("/embeddings", json={"model": "embedding/all-MiniLM-L6-v2", "input": "x"}).status_code == 200


def test_tei_embed_matches_openai_route(api: TestClient) -> None:
    texts = ["first text", "second text"]
    tei = api.post("/embed", json={"inputs": texts})
    assert tei.status_code == 200
    np.testing.assert_allclose(np.array(tei.json()), vectors(embed(api, texts)), atol=1e-6)
    single = api.post("/embed", json={"inputs": "first text", "normalize": False}).json()
    assert len(single) == 1 and len(single[0]) == 384


def test_tei_embed_sparse_needs_a_sparse_model(api: TestClient) -> None:
    assert_error(api.post("/embed_sparse", json={"inputs": "x"}), 400, "supports: dense")
