"""Embedding backends: sentence-transformers, BGE-M3 (FlagEmbedding) and GGUF models via llama.cpp.

Each loader runs on the tier's owner thread and imports its library there. Embedders return raw
(unnormalised) dense vectors; the route normalises, truncates to `dimensions` and re-normalises, so
every backend behaves the same on the wire.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from config import Settings, TierConfig
from core.errors import ContextLengthExceeded, InvalidRequest, ModelUnavailable
from core.model_paths import resolve_model_path
from core.protocols import Embedder, EmbeddingResult

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
        self.model.eval()
        prompt_name = self.model.default_prompt_name  # what `encode` would prepend to every text
        self._prompt = self.model.prompts.get(prompt_name) if prompt_name else None
        self.tokenizer = self.model.tokenizer
        self.dimension = int(self.model.get_embedding_dimension() or 0)
        self.max_input_tokens = int(self.model.max_seq_length or tier.n_ctx)

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        encoded = self.tokenizer(list(texts), add_special_tokens=True, truncation=False)["input_ids"]
        return [len(ids) for ids in encoded]

    def embed(self, texts: Sequence[str], types: Sequence[str], truncate: bool) -> EmbeddingResult:
        """Tokenized once, as `encode` would (its preprocessing, prompt and cut at max_seq_length), then counted
        from the attention mask: only a text that reaches the cut is tokenized again, whole, to be counted."""
        import torch

        check_types(types, self.supported_types)
        texts = list(texts)
        features = self.model.preprocess(texts, prompt=self._prompt)
        mask = features.get("attention_mask")
        if not isinstance(mask, torch.Tensor):  # a model without one: the two-pass way
            return self._embed_twice(texts, truncate)
        counts = [int(n) for n in mask.sum(dim=1).tolist()]
        at_cut = [i for i, n in enumerate(counts) if n >= self.max_input_tokens]
        if at_cut:
            for i, whole in zip(at_cut, self.count_tokens([texts[i] for i in at_cut]), strict=True):
                counts[i] = whole
        check_lengths(counts, self.max_input_tokens, truncate)
        with torch.inference_mode():
            vectors = self.model(features)["sentence_embedding"]
        return EmbeddingResult(
            dense=vectors.float().numpy().tolist(),
            token_counts=[min(c, self.max_input_tokens) for c in counts],
        )

    def _embed_twice(self, texts: list[str], truncate: bool) -> EmbeddingResult:
        counts = self.count_tokens(texts)
        check_lengths(counts, self.max_input_tokens, truncate)
        vectors = self.model.encode(texts, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
        return EmbeddingResult(
            dense=vectors.astype("float32").tolist(),
            token_counts=[min(c, self.max_input_tokens) for c in counts],
        )

    def close(self) -> None:
        self.model = None


def load_sentence_transformers(tier: TierConfig, settings: Settings) -> Embedder:
    folder = _model_folder(tier)
    if settings.quick_start_embeddings:
        from core.bert_gguf import quick_start_eligible

        if quick_start_eligible(Path(folder)):
            try:
                return QuickStartEmbedder(tier, folder)
            except Exception as exc:  # noqa: BLE001 - no llama.cpp or gguf: the plain path still works
                log.warning("quick start unavailable for the %s tier (%s); loading torch first", tier.name, exc)
    return SentenceTransformerEmbedder(tier, folder)


class QuickStartEmbedder:
    """A sentence-transformers BERT folder served first through llama.cpp (a GGUF copy; ~0.3 s to load),
    then through sentence-transformers once torch has loaded on a helper thread (6-10 s; faster batches).

    The two give the same vectors (cosine >= 0.99999) and token counts. The helper thread only builds the
    model; every call into either library happens on the tier's owner thread, in `embed`.
    """

    supported_types = ("dense",)

    def __init__(self, tier: TierConfig, folder: str, full_loader: Callable[[], Embedder] | None = None) -> None:
        from core.bert_gguf import max_seq_length, quick_start_gguf

        gguf = quick_start_gguf(Path(folder))
        self.quick: LlamaCppEmbedder | None = LlamaCppEmbedder(tier, str(gguf), max_seq_length(Path(folder)))
        self.dimension = self.quick.dimension
        self.max_input_tokens = self.quick.max_input_tokens
        self.full: Embedder | None = None
        self._closed = False
        self._lock = threading.Lock()
        loader = full_loader or (lambda: SentenceTransformerEmbedder(tier, folder))
        self.loaded = threading.Event()  # set when the full model is in (or failed): tests wait on it
        threading.Thread(target=self._load_full, args=(loader,), name=f"load-{tier.name}-torch", daemon=True).start()

    def _load_full(self, loader: Callable[[], Embedder]) -> None:
        try:
            full = loader()
        except Exception:  # noqa: BLE001 - llama.cpp keeps serving the same vectors
            log.exception("sentence-transformers did not load; llama.cpp keeps serving embeddings")
            self.loaded.set()
            return
        with self._lock:
            if self._closed:
                full.close()
            else:
                self.full = full
        self.loaded.set()

    def _active(self) -> Embedder:
        if self.full is None:
            assert self.quick is not None
            return self.quick
        if self.quick is not None:  # switched: free llama.cpp's copy, on the owner thread
            self.quick.close()
            self.quick = None
        return self.full

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return self._active().count_tokens(texts)

    def embed(self, texts: Sequence[str], types: Sequence[str], truncate: bool) -> EmbeddingResult:
        return self._active().embed(texts, types, truncate)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            full, self.full = self.full, None
        for model in (self.quick, full):
            if model is not None:
                model.close()
        self.quick = None


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


def open_gguf(tier: TierConfig, pooling_type: int | None = None, path: str | None = None) -> Any:
    """A llama.cpp context in embedding mode (`path`, else the tier's model); pooling comes from the GGUF
    unless given."""
    import llama_cpp

    path = path or resolve_model_path(tier.model_path)
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
    """GGUF embedding models (BERT, nomic, bge, ...) with the pooling the GGUF declares. `max_input_tokens`
    may be lower than the GGUF's context (sentence-transformers cuts MiniLM at 256 of its 512 positions)."""

    supported_types = ("dense",)

    def __init__(self, tier: TierConfig, path: str | None = None, max_input_tokens: int | None = None) -> None:
        import llama_cpp

        self.llm = open_gguf(tier, path=path)
        self.dimension = int(self.llm.n_embd())
        limit = min(tier.n_ctx, int(self.llm._model.n_ctx_train()) or tier.n_ctx)
        self.max_input_tokens = min(limit, max_input_tokens or limit)
        self.per_token = self.llm.pooling_type() == llama_cpp.LLAMA_POOLING_TYPE_NONE
        # A truncated input keeps its closing [SEP], as Hugging Face tokenizers truncate.
        self.keeps_last = bool(self.llm._model.add_eos_token())

    def _ids(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(self._ids(text)) for text in texts]

    def embed(self, texts: Sequence[str], types: Sequence[str], truncate: bool) -> EmbeddingResult:
        check_types(types, self.supported_types)
        ids = [self._ids(text) for text in texts]  # tokenized once: counted, checked, then decoded
        check_lengths([len(i) for i in ids], self.max_input_tokens, truncate)
        ids = [self._cut(i) for i in ids]
        if self.per_token:  # a GGUF without pooling: mean over its token vectors
            rows = self.llm.embed(list(texts), normalize=False, truncate=True)
            dense = [[sum(col) / len(tokens) for col in zip(*tokens, strict=True)] for tokens in rows]
        else:
            dense = [self._pooled(i) for i in ids]
        return EmbeddingResult(dense=[list(map(float, r)) for r in dense], token_counts=[len(i) for i in ids])

    def _cut(self, ids: list[int]) -> list[int]:
        limit = self.max_input_tokens
        if len(ids) <= limit:
            return ids
        return ids[: limit - 1] + ids[-1:] if self.keeps_last else ids[:limit]

    def _pooled(self, ids: list[int]) -> list[float]:
        """One sequence per decode (llama-cpp-python's `embed` does the same with one sequence slot)."""
        import llama_cpp

        batch, ctx = self.llm._batch, self.llm._ctx
        batch.reset()
        batch.add_sequence(ids, 0, True)
        ctx.kv_cache_clear()
        ctx.decode(batch)
        batch.reset()
        return llama_cpp.llama_get_embeddings_seq(ctx.ctx, 0)[: self.dimension]

    def close(self) -> None:
        self.llm.close()


def load_llamacpp_embedder(tier: TierConfig, settings: Settings) -> LlamaCppEmbedder:
    return LlamaCppEmbedder(tier)


FACTORIES = {
    "embedding:sentence_transformers": load_sentence_transformers,
    "embedding:bge_m3": load_bge_m3,
    "embedding:llamacpp": load_llamacpp_embedder,
}
