"""Routes for embeddings and rerank: OpenAI `/v1/embeddings`, TEI `/embed` and `/embed_sparse`, and one
rerank handler behind `/v1/rerank`, `/rerank` and `/v2/rerank` for the seed, Cohere, Jina, Infinity and
TEI clients.

Each handler: parse (schemas.py) -> resolve the tier (router.py) -> lease it -> submit a micro-batch
to its owner thread (microbatch.py) -> shape the client's wire format.
"""

from __future__ import annotations

import base64
import functools
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from fastapi import APIRouter, Request

from api import cache_lookup, priority
from api.json_response import FastJSONResponse as JSONResponse
from api.schemas import EmbeddingRequest, RerankRequest, TeiEmbedRequest
from api.state import app_state
from config import TierConfig
from core import routing
from core.errors import InvalidRequest
from middleware import request_context

router = APIRouter()  # mounted under "/v1" and ""
extra_router = APIRouter()  # TEI and Cohere v2 paths, mounted once at the root


Vector = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Embedded:
    """One input's result: raw from the owner thread or the cache (`dense` a list), then cut and
    normalised for the response (`dense` a float32 array, which the response writes without a Python loop)."""

    dense: list[float] | Vector | None
    sparse: dict[int, float] | None
    colbert: list[list[float]] | None
    tokens: int


# ---------------------------------------------------------------- shared steps


def _resolve(request: Request, model: str, kind: str, asked_priority: str | int | None = None) -> TierConfig:
    priority.apply(request, asked_priority)  # the micro-batching queue reads it (core/priority.py)
    settings = app_state(request).settings
    tier = routing.resolve(model, kind, settings).tier
    request_context.note_tier(tier)  # metrics and the access log are per tier
    return settings.tiers[tier]


@functools.cache
def _cl100k() -> Any:
    """OpenAI's cl100k tokenizer, shipped offline by bpe-openai (immutable, so safe to share)."""
    import bpe_openai

    return bpe_openai.get_encoding("cl100k_base")


def input_texts(raw: str | list[str] | list[int] | list[list[int]]) -> list[str]:
    """Texts to embed. Token ids are OpenAI cl100k ids (what LangChain's OpenAIEmbeddings sends):
    they are decoded to text, which this model then tokenizes with its own tokenizer."""
    if isinstance(raw, str):
        return [raw]
    if raw and isinstance(raw[0], int):
        return [_decode_tokens(raw)]  # type: ignore[arg-type]
    return [item if isinstance(item, str) else _decode_tokens(item) for item in raw]  # type: ignore[union-attr]


def _decode_tokens(tokens: Sequence[int]) -> str:
    encoding = _cl100k()
    if max(tokens) >= encoding.n_vocab:
        raise InvalidRequest(f"Token id {max(tokens)} is not an OpenAI cl100k token id", param="input")
    try:
        return str(encoding.decode(list(tokens)))
    except KeyError:  # ids in the encoding's gaps (e.g. 100256) name no token
        bad = next(t for t in tokens if _undefined(encoding, t))
        raise InvalidRequest(f"Token id {bad} is not an OpenAI cl100k token id", param="input") from None


def _undefined(encoding: Any, token: int) -> bool:
    try:
        encoding.decode([token])
    except KeyError:
        return True
    return False


def _embed_run(types: tuple[str, ...], truncate: bool) -> Any:
    def run(model: Any, texts: Sequence[str]) -> list[Embedded]:
        result = model.embed(texts, types, truncate)
        n = len(texts)
        dense = result.dense or [None] * n
        sparse = result.sparse or [None] * n
        colbert = result.colbert or [None] * n
        counts = result.token_counts or [0] * n
        return [Embedded(*row) for row in zip(dense, sparse, colbert, counts, strict=True)]

    return run


async def embed_texts(
    request: Request,
    model: str,
    texts: list[str],
    types: tuple[str, ...],
    truncate: bool,
    dimensions: int | None,
    normalize: bool = True,
    asked_priority: str | None = None,
) -> tuple[list[Embedded], dict[str, str]]:
    """Embed on the tier's owner thread (micro-batched); dense vectors are cut to `dimensions` (the
    request's, else `EMBEDDING_DIMENSION`) and (re-)normalised unless `normalize` is false.

    The response cache holds the model's raw output per text (keyed by text, types and truncate):
    a batch with known texts embeds only the new ones. Also returns the `X-Cache` header."""
    tier = _resolve(request, model, "embedding", asked_priority)
    want = dimensions if dimensions is not None else tier.embedding_dimension

    async def compute(missing: list[str]) -> list[dict[str, Any]]:
        async with app_state(request).manager.lease(tier.name, tier) as worker:
            _check_dimensions(want, int(worker.model.dimension))
            rows: list[Embedded] = await worker.gather(("embed", types, truncate), missing, _embed_run(types, truncate))
        return [_row_json(row) for row in rows]

    options = {"types": list(types), "truncate": truncate}
    values, headers = await cache_lookup.per_text(request, "embeddings", tier, texts, options, compute)
    rows = [_row_from_json(value) for value in values]
    for row in rows:
        if row.dense is not None:
            _check_dimensions(want, len(row.dense))
    return [_cut(row, want, normalize) for row in rows], headers


def _check_dimensions(want: int | None, size: int) -> None:
    if want is not None and want > size:
        raise InvalidRequest(
            f"dimensions is {want} but this model's embeddings have {size} dimensions", param="dimensions"
        )


def _row_json(row: Embedded) -> dict[str, Any]:
    """An embedding as plain JSON (what the cache stores; sparse token ids become string keys)."""
    return {
        "dense": np.asarray(row.dense, dtype=np.float64).tolist() if row.dense is not None else None,
        "sparse": {str(k): float(v) for k, v in row.sparse.items()} if row.sparse is not None else None,
        "colbert": [[float(x) for x in vec] for vec in row.colbert] if row.colbert is not None else None,
        "tokens": int(row.tokens),
    }


def _row_from_json(value: dict[str, Any]) -> Embedded:
    sparse = value["sparse"]
    return Embedded(
        value["dense"],
        {int(k): v for k, v in sparse.items()} if sparse is not None else None,
        value["colbert"],
        value["tokens"],
    )


def _unit(array: Vector) -> Vector:
    norm = float(np.linalg.norm(array))
    return array / np.float32(norm) if norm > 0 else array


def _cut(row: Embedded, dimensions: int | None, normalize: bool) -> Embedded:
    """Matryoshka truncation: keep the first `dimensions` components and re-normalise."""
    if row.dense is None:
        return row
    array = np.asarray(row.dense, dtype=np.float32)
    dense = array[:dimensions] if dimensions else array
    return Embedded(_unit(dense) if normalize else dense, row.sparse, row.colbert, row.tokens)


def dense_of(row: Embedded) -> list[float] | Vector:
    """The dense vector, or an empty list for a row without one (sparse-only requests)."""
    return row.dense if row.dense is not None else []


def _encode(vector: list[float] | Vector, encoding_format: str | None) -> list[float] | Vector | str:
    if encoding_format == "base64":
        return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector


def _requested_types(body: EmbeddingRequest) -> tuple[str, ...]:
    types = [body.embedding_type or "dense"]
    if body.return_sparse and "sparse" not in types:
        types.append("sparse")
    if body.return_colbert and "colbert" not in types:
        types.append("colbert")
    return tuple(types)


# ---------------------------------------------------------------- embeddings


@router.post("/embeddings")
async def embeddings(body: EmbeddingRequest, request: Request) -> JSONResponse:
    texts = input_texts(body.input)
    types = _requested_types(body)
    rows, headers = await embed_texts(
        request, body.model, texts, types, body.truncate, body.dimensions, asked_priority=body.priority
    )
    data = []
    for index, row in enumerate(rows):
        item: dict[str, Any] = {
            "object": "embedding",
            "index": index,
            "embedding": _encode(dense_of(row), body.encoding_format),
        }
        if row.sparse is not None:
            item["sparse_embedding"] = {str(k): v for k, v in row.sparse.items()}
        if row.colbert is not None:
            item["colbert_embedding"] = row.colbert
        data.append(item)
    tokens = sum(row.tokens for row in rows)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    # A response object skips FastAPI's per-float jsonable_encoder walk; orjson writes the arrays.
    return JSONResponse({"object": "list", "data": data, "model": body.model, "usage": usage}, headers=headers)


@extra_router.post("/embed")
async def tei_embed(body: TeiEmbedRequest, request: Request) -> JSONResponse:
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    rows, headers = await embed_texts(
        request, body.model, texts, ("dense",), body.truncate, body.dimensions, body.normalize, body.priority
    )
    return JSONResponse([dense_of(row) for row in rows], headers=headers)


@extra_router.post("/embed_sparse")
async def tei_embed_sparse(body: TeiEmbedRequest, request: Request) -> JSONResponse:
    texts = [body.inputs] if isinstance(body.inputs, str) else body.inputs
    rows, headers = await embed_texts(
        request, body.model, texts, ("sparse",), body.truncate, None, asked_priority=body.priority
    )
    out = [[{"index": k, "value": v} for k, v in sorted((row.sparse or {}).items())] for row in rows]
    return JSONResponse(out, headers=headers)


# ---------------------------------------------------------------- rerank


@dataclass(frozen=True)
class Ranked:
    index: int
    score: float
    text: str


def _rerank_run(truncate: bool) -> Any:
    def run(model: Any, pairs: Sequence[tuple[str, str]]) -> list[tuple[float, int, int]]:
        queries = list(dict.fromkeys(q for q, _ in pairs))
        query_tokens = dict(zip(queries, model.count_tokens(queries), strict=True))
        for count in query_tokens.values():
            if count > model.max_input_tokens:
                raise InvalidRequest(
                    f"The query has {count} tokens, over this model's limit of {model.max_input_tokens}",
                    param="query",
                )
        doc_tokens = model.count_tokens([d for _, d in pairs])
        if not truncate:
            for position, count in enumerate(doc_tokens):
                if count + query_tokens[pairs[position][0]] > model.max_input_tokens:
                    raise InvalidRequest(
                        f"Document {position} with the query has over {model.max_input_tokens} tokens, this "
                        "model's limit. Shorten it or send truncate: true.",
                        param="documents",
                    )
        scores = model.score(pairs)
        return [(s, query_tokens[q], d) for s, (q, _), d in zip(scores, pairs, doc_tokens, strict=True)]

    return run


def _to_unit_interval(score: float, logits: bool) -> float:
    if logits:
        return 1.0 / (1.0 + math.exp(-score)) if score >= 0 else math.exp(score) / (1.0 + math.exp(score))
    return max(0.0, min(1.0, (score + 1.0) / 2.0))  # cosine similarity in [-1, 1]


async def rerank_core(request: Request, body: RerankRequest) -> tuple[list[Ranked], int, dict[str, str]]:
    """Scores every document, sorted best first and cut to top_n/top_k; plus the prompt tokens and
    the `X-Cache` header (one cache entry per request)."""
    texts = body.document_texts()
    if not texts:
        raise InvalidRequest("documents must hold at least one document", param="documents")
    tier = _resolve(request, body.model, "rerank", body.priority)
    if len(texts) > tier.max_documents:
        raise InvalidRequest(
            f"{len(texts)} documents sent; this reranker accepts at most {tier.max_documents} "
            f"({tier.name.upper()}_MAX_DOCUMENTS)",
            param="documents",
        )

    async def compute() -> dict[str, Any]:
        async with app_state(request).manager.lease(tier.name, tier) as worker:
            pairs = [(body.query, text) for text in texts]
            rows: list[tuple[float, int, int]] = await worker.gather(
                ("rerank", body.truncate), pairs, _rerank_run(body.truncate)
            )
            logits = bool(worker.model.scores_are_logits)
        scores = [float(score if body.raw_scores else _to_unit_interval(score, logits)) for score, _, _ in rows]
        return {"scores": scores, "tokens": int(rows[0][1] + sum(d for _, _, d in rows))}

    result, headers = await cache_lookup.whole_request(request, "rerank", tier, body, compute)
    ranked = [Ranked(i, score, texts[i]) for i, score in enumerate(result["scores"])]
    ranked.sort(key=lambda r: r.score, reverse=True)
    limit = body.limit()
    return (ranked[:limit] if limit is not None else ranked), result["tokens"], headers


def rerank_body(body: RerankRequest, ranked: list[Ranked], tokens: int) -> dict[str, Any]:
    """The seed's `data`, Cohere/Jina/Infinity's `results`, with usage in both spellings."""
    with_docs = body.return_documents is not False
    results, data = [], []
    for r in ranked:
        result: dict[str, Any] = {"index": r.index, "relevance_score": r.score}
        seed: dict[str, Any] = {"index": r.index, "score": r.score}
        if with_docs:
            result["document"] = {"text": r.text}
            seed["document"] = r.text
        results.append(result)
        data.append(seed)
    usage = {"prompt_tokens": tokens, "total_tokens": tokens}
    return {
        "id": f"rerank-{uuid.uuid4().hex}",
        "object": "rerank",
        "created": int(time.time()),
        "model": body.model,
        "results": results,
        "data": data,
        "usage": usage,
        "meta": {"billed_units": {"search_units": 1}, "tokens": {"input_tokens": tokens, "output_tokens": 0}},
    }


@router.post("/rerank")
async def rerank(body: RerankRequest, request: Request) -> JSONResponse:
    ranked, tokens, headers = await rerank_core(request, body)
    if body.documents is None and body.texts is not None:  # TEI: a bare list
        out = []
        for r in ranked:
            item: dict[str, Any] = {"index": r.index, "score": r.score}
            if body.return_text:
                item["text"] = r.text
            out.append(item)
        return JSONResponse(out, headers=headers)
    return JSONResponse(rerank_body(body, ranked, tokens), headers=headers)


@extra_router.post("/v2/rerank")
async def rerank_v2(body: RerankRequest, request: Request) -> JSONResponse:
    ranked, tokens, headers = await rerank_core(request, body)
    return JSONResponse(rerank_body(body, ranked, tokens), headers=headers)
