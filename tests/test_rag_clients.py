"""Real client libraries against a live server (embedded MiniLM embedder + similarity reranker):
the OpenAI SDK, LangChain's OpenAIEmbeddings (token-id path), Cohere's ClientV2 and LlamaIndex's TEI
reranker."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

pytestmark = pytest.mark.real

TEXTS = ["The Eiffel Tower is in Paris.", "Photosynthesis turns light into chemical energy.", ""]
QUERY = "Where is the Eiffel Tower?"
DOCS = ["Bananas are rich in potassium.", "The Eiffel Tower stands in Paris, France.", "Tokyo is in Japan."]
CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"


def reference_vectors(url: str, texts: list[str]) -> np.ndarray:
    body = {"model": "embedding", "input": texts, "encoding_format": "float"}
    response = httpx.post(f"{url}/v1/embeddings", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return np.array([item["embedding"] for item in response.json()["data"]])


def test_openai_sdk_embeddings_default_base64(rag_server: Any) -> None:
    import openai

    sent: list[dict[str, Any]] = []
    http_client = httpx.Client(event_hooks={"request": [lambda r: sent.append(json.loads(r.read()))]})
    client = openai.OpenAI(base_url=f"{rag_server.url}/v1", api_key="sk-local", http_client=http_client)
    result = client.embeddings.create(model="text-embedding-3-small", input=TEXTS)
    assert sent[0]["encoding_format"] == "base64"  # the SDK's default, decoded by the SDK
    ours = np.array([item.embedding for item in result.data])
    np.testing.assert_allclose(ours, reference_vectors(rag_server.url, TEXTS), atol=1e-6)
    assert [item.index for item in result.data] == [0, 1, 2]
    assert result.usage.prompt_tokens > 0 and result.model == "text-embedding-3-small"


@pytest.fixture
def tiktoken_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Seed tiktoken's cache with the cl100k file bpe-openai ships, so nothing is downloaded."""
    import bpe_openai

    data = gzip.decompress((Path(bpe_openai.__file__).parent / "data" / "cl100k_base.tiktoken.gz").read_bytes())
    (tmp_path / hashlib.sha1(CL100K_URL.encode()).hexdigest()).write_bytes(data)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_langchain_openai_embeddings_token_id_path(rag_server: Any, tiktoken_cache: Path) -> None:
    from langchain_openai import OpenAIEmbeddings

    sent: list[dict[str, Any]] = []
    http_client = httpx.Client(event_hooks={"request": [lambda r: sent.append(json.loads(r.read()))]})
    embeddings = OpenAIEmbeddings(
        model="text-embedding-ada-002", base_url=f"{rag_server.url}/v1", api_key="sk-local", http_client=http_client
    )
    documents = TEXTS[:2]
    vectors = np.array(embeddings.embed_documents(documents))
    query = np.array(embeddings.embed_query(documents[0]))
    assert all(isinstance(item, list) and isinstance(item[0], int) for item in sent[0]["input"])  # token ids
    reference = reference_vectors(rag_server.url, documents)
    assert (vectors * reference).sum(axis=1).min() > 0.999
    assert float(query @ reference[0]) > 0.999


def test_cohere_client_v2_rerank(rag_server: Any) -> None:
    import cohere

    client = cohere.ClientV2(api_key="local", base_url=rag_server.url)
    response = client.rerank(model="rerank-v3.5", query=QUERY, documents=DOCS, top_n=2)
    assert [r.index for r in response.results][0] == 1
    assert len(response.results) == 2
    assert response.results[0].relevance_score >= response.results[1].relevance_score
    v1 = cohere.Client(api_key="local", base_url=rag_server.url).rerank(
        model="rerank-english-v3.0", query=QUERY, documents=DOCS, return_documents=True
    )
    assert v1.results[0].index == 1 and v1.results[0].document.text == DOCS[1]


def test_llama_index_tei_reranker(rag_server: Any) -> None:
    from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode
    from llama_index.postprocessor.tei_rerank import TextEmbeddingInference

    reranker = TextEmbeddingInference(base_url=rag_server.url, top_n=2)
    nodes = [NodeWithScore(node=TextNode(text=doc), score=0.0) for doc in DOCS]
    ranked = reranker.postprocess_nodes(nodes, query_bundle=QueryBundle(QUERY))
    assert len(ranked) == 2
    assert ranked[0].node.get_content() == DOCS[1]
    assert 0.0 <= ranked[1].score <= ranked[0].score <= 1.0


def test_concurrent_requests_get_their_own_results(rag_server: Any) -> None:
    """16 clients at once against the live server (micro-batched together or not): each response is
    the vector, and each rerank the order, that the same request gets alone."""
    from concurrent.futures import ThreadPoolExecutor

    texts = [f"sentence {i} about {topic}" for i, topic in enumerate(["rivers", "taxes", "jazz", "cats"] * 4)]
    alone = reference_vectors(rag_server.url, texts)

    def one(text: str) -> list[float]:
        body = {"model": "embedding", "input": text}
        return httpx.post(f"{rag_server.url}/v1/embeddings", json=body, timeout=60).json()["data"][0]["embedding"]

    def rank(query: str) -> dict[int, float]:
        body = {"query": query, "documents": texts}
        results = httpx.post(f"{rag_server.url}/v1/rerank", json=body, timeout=60).json()["results"]
        return {r["index"]: r["relevance_score"] for r in results}  # insertion order = rank order

    with ThreadPoolExecutor(16) as pool:
        together = np.array(list(pool.map(one, texts)))
        rankings = list(pool.map(rank, texts[:4]))
    assert (together * alone).sum(axis=1).min() > 0.9999
    assert [next(iter(r)) for r in rankings] == [0, 1, 2, 3]  # each query's own sentence ranks first
    for together_scores, query in zip(rankings, texts[:4], strict=True):
        alone_scores = rank(query)
        assert all(abs(together_scores[i] - alone_scores[i]) < 1e-4 for i in range(len(texts)))
