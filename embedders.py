"""Embedding backends: sentence-transformers, BGE-M3 (FlagEmbedding) and GGUF models via llama.cpp.

Each loader runs on the tier's owner thread and imports its library there. Embedders return raw
(unnormalised) dense vectors; the route normalises, truncates to `dimensions` and re-normalises, so
every backend behaves the same on the wire.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from config import Settings, TierConfig
from core.errors import ContextLengthExceeded, InvalidRequest, ModelUnavailable
from core.model_paths import resolve_model_path
from core.protocols import EmbeddingResult

log = logging.getLogger("llmservice.embedders")


def check_lengths(counts: Sequence[int], limit: int, truncate: bool, param: str = "input") -> None:
    """Inputs over the model's limit are a 400 naming the limit, unless the client asked to truncate."""
    if truncate:
        return
    for position, count in enumerate(counts):
        if count > limit:
            raise ContextLengthExceeded(
                f"Input {position} has {count} tokens, over this model's limit of {limit} tokens. "
                "Shorten it or send truncate: true.",
                param=param,
            )


def check_types(types: Sequence[str], supported: tuple[str, ...]) -> None:
    for kind in types:
        if kind not in supported:
            raise InvalidRequest(
                f"This embedding model cannot produce {kind!r} embeddings; it supports: {', '.join(supported)}",
                param="embedding_type",
            )


def _unit(row: Sequence[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in row)) or 1.0
    return [float(x) / norm for x in row]


def _model_folder(tier: TierConfig) -> str:
    path = resolve_model_path(tier.model_path)
    if not Path(path).is_dir():
        raise ModelUnavailable(f"The {tier.name} tier's model folder does not exist")
    return path


# ---------------------------------------------------------------- sentence-transformers


class SentenceTransformerEmbedder:
    """Any sentence-transformers folder (the embedded default is all-MiniLM-L6-v2)."""

    supported_types = ("dense",)

    def __init__(self, tier: TierConfig, path: str) -> None:
        from sentence_transformers import SentenceTransformer

        if tier.n_threads:
            import torch

            torch.set_num_threads(tier.n_threads)
        self.model = SentenceTransformer(path, device="cpu", local_files_only=True)
        self.tokenizer = self.model.tokenizer
        self.dimension = int(self.model.get_embedding_dimension() or 0)
        self.max_input_tokens = int(self.model.max_seq_length or tier.n_ctx)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        encoded = self.tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        return [len(ids) for ids in encoded]

    def embed(self, texts: Sequence[str], types: Sequence[str], truncate: bool) -> EmbeddingResult:
        check_types(types, self.supported_types)
        counts = self.count_tokens(texts)
        check_lengths(counts, self.max_input_tokens, truncate)
        vectors = self.model.encode(list(texts), batch_size=64, convert_to_numpy=True, show_progress_bar=False)
        return EmbeddingResult(
            dense=vectors.astype("float32").tolist(),
            token_counts=[min(c, self.max_input_tokens) for c in counts],
        )

    def close(self) -> None:
        self.model = None


def load_sentence_transformers(tier: TierConfig, settings: Settings) -> SentenceTransformerEmbedder:
    return SentenceTransformerEmbedder(tier, _model_folder(tier))


# ---------------------------------------------------------------- BGE-M3


class BgeM3Embedder:
    """BGE-M3 via FlagEmbedding: dense, sparse (lexical weights) and ColBERT from one forward pass.

    `encode_single_device` on "cpu" pins one device: `encode` would start a process pool when it sees
    several devices, and each call would pay for it.
    """

    supported_types = ("dense", "sparse", "colbert")

    def __init__(self, tier: TierConfig, path: str) -> None:
        from FlagEmbedding import BGEM3FlagModel

        if tier.n_threads:
            import torch

            torch.set_num_threads(tier.n_threads)
        self.model = BGEM3FlagModel(path, use_fp16=False, devices="cpu", normalize_embeddings=False)
        self.tokenizer = self.model.tokenizer
        self.dimension = int(self.model.model.model.config.hidden_size)
        positions = int(getattr(self.model.model.model.config, "max_position_embeddings", tier.n_ctx))
        # XLM-RoBERTa reserves pad_token_id + 1 positions before the first token.
        self.max_input_tokens = min(tier.n_ctx, positions - 2) if positions > 2 else tier.n_ctx

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        encoded = self.tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        return [len(ids) for ids in encoded]

    def embed(self, texts: Sequence[str], types: Sequence[str], truncate: bool) -> EmbeddingResult:
        check_types(types, self.supported_types)
        counts = self.count_tokens(texts)
        check_lengths(counts, self.max_input_tokens, truncate)
        out = self.model.encode_single_device(
            list(texts),
            batch_size=64,
            max_length=self.max_input_tokens,
            return_dense="dense" in types,
            return_sparse="sparse" in types,
            return_colbert_vecs="colbert" in types,
            device="cpu",
        )
        result = EmbeddingResult(token_counts=[min(c, self.max_input_tokens) for c in counts])
        if "dense" in types:
            result.dense = out["dense_vecs"].astype("float32").tolist()
        if "sparse" in types:
            result.sparse = [{int(k): float(v) for k, v in weights.items()} for weights in out["lexical_weights"]]
        if "colbert" in types:
            result.colbert = [[_unit(row) for row in vecs.tolist()] for vecs in out["colbert_vecs"]]
        return result

    def close(self) -> None:
        self.model = None


def load_bge_m3(tier: TierConfig, settings: Settings) -> BgeM3Embedder:
    return BgeM3Embedder(tier, _model_folder(tier))


# ---------------------------------------------------------------- GGUF via llama.cpp


def open_gguf(tier: TierConfig, pooling_type: int | None = None) -> Any:
    """A llama.cpp context in embedding mode; pooling comes from the GGUF unless given."""
    import llama_cpp

    path = resolve_model_path(tier.model_path)
    if not os.path.isfile(path):
        raise ModelUnavailable(f"The {tier.name} tier's model file does not exist")
    pooling = llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED if pooling_type is None else pooling_type
    try:
        # Non-causal models need a whole sequence in one micro-batch, so n_ubatch = n_batch = n_ctx.
        return llama_cpp.Llama(
            model_path=path,
            embedding=True,
            pooling_type=pooling,
            n_ctx=tier.n_ctx,
            n_batch=tier.n_ctx,
            n_ubatch=tier.n_ctx,
            n_threads=tier.n_threads,
            n_gpu_layers=tier.n_gpu_layers,
            use_mmap=tier.use_mmap,
            use_mlock=tier.use_mlock,
            verbose=False,
        )
    except ValueError as exc:  # llama-cpp-python reports unreadable files as ValueError
        raise ModelUnavailable(f"The {tier.name} tier's model file could not be loaded: not a valid GGUF") from exc


class LlamaCppEmbedder:
    """GGUF embedding models (BERT, nomic, bge, ...) with the pooling the GGUF declares."""

    supported_types = ("dense",)

    def __init__(self, tier: TierConfig) -> None:
        import llama_cpp

        self.llm = open_gguf(tier)
        self.dimension = int(self.llm.n_embd())
        self.max_input_tokens = min(tier.n_ctx, int(self.llm._model.n_ctx_train()) or tier.n_ctx)
        self.per_token = self.llm.pooling_type() == llama_cpp.LLAMA_POOLING_TYPE_NONE

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)) for text in texts]

    def embed(self, texts: Sequence[str], types: Sequence[str], truncate: bool) -> EmbeddingResult:
        check_types(types, self.supported_types)
        counts = self.count_tokens(texts)
        check_lengths(counts, self.max_input_tokens, truncate)
        counts = [min(c, self.max_input_tokens) for c in counts]
        rows = self.llm.embed(list(texts), normalize=False, truncate=True)
        if self.per_token:  # a GGUF without pooling: mean over its token vectors
            rows = [[sum(col) / len(tokens) for col in zip(*tokens, strict=True)] for tokens in rows]
        return EmbeddingResult(dense=[list(map(float, r)) for r in rows], token_counts=counts)

    def close(self) -> None:
        self.llm.close()


def load_llamacpp_embedder(tier: TierConfig, settings: Settings) -> LlamaCppEmbedder:
    return LlamaCppEmbedder(tier)


FACTORIES = {
    "embedding:sentence_transformers": load_sentence_transformers,
    "embedding:bge_m3": load_bge_m3,
    "embedding:llamacpp": load_llamacpp_embedder,
}
