"""Rerankers: cross-encoders (sentence-transformers), FlagReranker, GGUF rank models, similarity.

`score(pairs)` takes (query, document) pairs, so the micro-batcher can merge requests with different
queries into one forward pass. Scores are raw: logits for the model-based rerankers, cosine
similarities for the similarity reranker (`scores_are_logits` tells the route how to map to [0, 1]).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from config import Settings, TierConfig
from core.errors import ModelUnavailable
from core.model_paths import resolve_model_path
from embedders import FACTORIES as EMBEDDER_FACTORIES
from embedders import open_gguf

log = logging.getLogger("llmservice.rerankers")

Pair = tuple[str, str]


def _model_folder(tier: TierConfig) -> str:
    path = resolve_model_path(tier.model_path)
    if not Path(path).is_dir():
        raise ModelUnavailable(f"The {tier.name} tier's model folder does not exist")
    return path


def _set_threads(tier: TierConfig) -> None:
    if tier.n_threads:
        import torch

        torch.set_num_threads(tier.n_threads)


def _token_lengths(tokenizer: Any, texts: Sequence[str]) -> list[int]:
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]]


class CrossEncoderReranker:
    """A sentence-transformers CrossEncoder (one logit per pair)."""

    scores_are_logits = True

    def __init__(self, tier: TierConfig, path: str) -> None:
        import torch
        from sentence_transformers import CrossEncoder

        _set_threads(tier)
        self.model = CrossEncoder(path, device="cpu", max_length=tier.n_ctx, local_files_only=True)
        self._identity = torch.nn.Identity()
        self.max_input_tokens = int(self.model.max_length or tier.n_ctx)

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        scores = self.model.predict(
            [list(p) for p in pairs], batch_size=64, activation_fn=self._identity, show_progress_bar=False
        )
        return [float(s) for s in scores]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return _token_lengths(self.model.tokenizer, texts)

    def close(self) -> None:
        self.model = None


class FlagRerankerBackend:
    """FlagEmbedding's FlagReranker (bge-reranker family); LLM-based ones through FlagLLMReranker."""

    scores_are_logits = True

    def __init__(self, tier: TierConfig, path: str) -> None:
        from FlagEmbedding import FlagLLMReranker, FlagReranker

        _set_threads(tier)
        config = _read_config(path)
        is_llm = any(a.endswith("ForCausalLM") for a in config.get("architectures", []))
        cls = FlagLLMReranker if is_llm else FlagReranker
        self.model = cls(path, use_fp16=False, devices="cpu", max_length=tier.n_ctx)
        tokenizer = self.model.tokenizer
        if tokenizer.pad_token is None:  # causal-LM tokenizers often lack one; batching needs it
            tokenizer.pad_token = tokenizer.eos_token
        self.max_input_tokens = tier.n_ctx

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        scores = self.model.compute_score_single_gpu([list(p) for p in pairs], batch_size=64, device="cpu")
        return [float(s) for s in scores]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return _token_lengths(self.model.tokenizer, texts)

    def close(self) -> None:
        self.model = None


def _read_config(path: str) -> dict[str, Any]:
    import json

    try:
        return json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


class LlamaCppReranker:
    """A GGUF reranker (rank pooling): one classifier score per (query, document) sequence."""

    scores_are_logits = True

    def __init__(self, tier: TierConfig) -> None:
        import llama_cpp

        self.llama_cpp = llama_cpp
        self.llm = open_gguf(tier, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_RANK)
        self.max_input_tokens = min(tier.n_ctx, int(self.llm._model.n_ctx_train()) or tier.n_ctx)
        vocab = self.llm._model.vocab
        eos = llama_cpp.llama_vocab_eos(vocab)
        self._eos = eos if eos != llama_cpp.LLAMA_TOKEN_NULL else llama_cpp.llama_vocab_sep(vocab)
        self._bos = [llama_cpp.llama_vocab_bos(vocab)] if llama_cpp.llama_vocab_get_add_bos(vocab) else []
        self._end = [self._eos] if llama_cpp.llama_vocab_get_add_eos(vocab) else []
        self._sep = [llama_cpp.llama_vocab_sep(vocab)] if llama_cpp.llama_vocab_get_add_sep(vocab) else []
        self._template = self.llm.metadata.get("tokenizer.chat_template.rerank")

    def _pair_tokens(self, query: str, doc: str) -> list[int]:
        """The layout of llama.cpp's server (format_prompt_rerank): the GGUF's rerank template when it
        has one, else [BOS] query [EOS] [SEP] document [EOS], each special only where the vocabulary
        adds it (BERT: [CLS] q [SEP] d [SEP]; XLM-RoBERTa: <s> q </s> </s> d </s>)."""
        tokenize = self.llm.tokenize
        if self._template:
            prompt = self._template.replace("{query}", query).replace("{document}", doc)
            return tokenize(prompt.encode("utf-8"), add_bos=False, special=True)[: self.max_input_tokens]
        q = tokenize(query.encode("utf-8"), add_bos=False, special=False)
        d = tokenize(doc.encode("utf-8"), add_bos=False, special=False)
        return (self._bos + q + self._end + self._sep + d + self._end)[: self.max_input_tokens]

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        llm = self.llm
        scores: list[float] = []
        batch: list[list[int]] = []
        used = 0
        for query, doc in pairs:
            tokens = self._pair_tokens(query, doc)
            if batch and (used + len(tokens) > llm.n_batch or len(batch) >= llm.context_params.n_seq_max):
                scores += self._decode(batch)
                batch, used = [], 0
            batch.append(tokens)
            used += len(tokens)
        if batch:
            scores += self._decode(batch)
        return scores

    def _decode(self, sequences: list[list[int]]) -> list[float]:
        llm = self.llm
        llm._ctx.kv_cache_clear()
        llm._batch.reset()
        for seq_id, tokens in enumerate(sequences):
            llm._batch.add_sequence(tokens, seq_id, True)
        llm._ctx.decode(llm._batch)
        out = [float(self.llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, i)[0]) for i in range(len(sequences))]
        llm._batch.reset()
        llm._ctx.kv_cache_clear()
        return out

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(self.llm.tokenize(t.encode("utf-8"), add_bos=True, special=False)) for t in texts]

    def close(self) -> None:
        self.llm.close()


class SimilarityReranker:
    """Cosine similarity between query and document embeddings from the embedding tier's model."""

    scores_are_logits = False

    def __init__(self, embedder: Any) -> None:
        self.embedder = embedder
        self.max_input_tokens = int(embedder.max_input_tokens)

    def score(self, pairs: Sequence[Pair]) -> list[float]:
        texts = list(dict.fromkeys(t for pair in pairs for t in pair))
        vectors = dict(zip(texts, self.embedder.embed(texts, ("dense",), True).dense or [], strict=True))
        return [_cosine(vectors[q], vectors[d]) for q, d in pairs]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self.embedder.count_tokens(texts)

    def close(self) -> None:
        self.embedder.close()


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return dot / norm if norm else 0.0


def load_cross_encoder(tier: TierConfig, settings: Settings) -> CrossEncoderReranker:
    return CrossEncoderReranker(tier, _model_folder(tier))


def load_flag_reranker(tier: TierConfig, settings: Settings) -> FlagRerankerBackend:
    return FlagRerankerBackend(tier, _model_folder(tier))


def load_llamacpp_reranker(tier: TierConfig, settings: Settings) -> LlamaCppReranker:
    return LlamaCppReranker(tier)


def load_similarity(tier: TierConfig, settings: Settings) -> SimilarityReranker:
    """Loads its own copy of the embedding tier's model, so the two tiers never share a thread."""
    embedding = settings.tiers.get("embedding")
    if embedding is None:
        raise ModelUnavailable("The similarity reranker needs the embedding tier, which is not configured")
    loader = EMBEDDER_FACTORIES.get(f"embedding:{embedding.backend}")
    if loader is None:
        raise ModelUnavailable(f"The similarity reranker cannot use the {embedding.backend!r} embedder")
    return SimilarityReranker(loader(embedding, settings))


FACTORIES = {
    "rerank:cross_encoder": load_cross_encoder,
    "rerank:flag_reranker": load_flag_reranker,
    "rerank:llamacpp": load_llamacpp_reranker,
    "rerank:similarity": load_similarity,
}
