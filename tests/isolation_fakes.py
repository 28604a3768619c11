"""Fakes that crash the way native code does, for process isolation (tests/test_isolation.py).

A tier with `{TIER}_ISOLATION=process` loads its model in a spawned worker process, which imports its
factory by name: so these factories are module-level functions. "ABORT" in a prompt (after three
tokens) or in a text to embed calls `os.abort()`, as an assertion in llama.cpp or MLX would; a model
path containing "abort-on-load" aborts while loading. "DIE_ON:<path>" in a prompt held by
"HOLD:<gate>" (tests/fakes.py) aborts while held, once that file exists: a test keeps requests in
flight, then crashes the worker under them.
"""

from __future__ import annotations

import os
import re
import resource
from collections.abc import Sequence

from config import Settings, TierConfig
from core.protocols import EmbeddingResult, GenerationJob, StepOutput
from tests.fakes import FakeChat, FakeEmbedder, FakeReranker


def abort() -> None:
    """Die as a native assertion does (SIGABRT), without writing a core file."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    os.abort()


_DIE_ON = re.compile(r"DIE_ON:([^<\s]+)")


def _prompt(job: GenerationJob) -> str:
    return "".join(chr(t) for t in job.prompt_tokens)


class AbortingChat(FakeChat):
    def step(self) -> list[StepOutput]:
        for job, _, pos in self.active.values():
            if pos == 3 and "ABORT" in _prompt(job):
                abort()
        return super().step()

    def _held(self) -> bool:
        for job, _, _ in self.active.values():
            bomb = _DIE_ON.search(_prompt(job))
            if bomb and os.path.exists(bomb.group(1)):
                abort()
        return super()._held()


class AbortingEmbedder(FakeEmbedder):
    def embed(self, texts: Sequence[str], types: Sequence[str], truncate: bool) -> EmbeddingResult:
        if any("ABORT" in text for text in texts):
            abort()
        return super().embed(texts, types, truncate)


def _check_load(tier: TierConfig) -> None:
    if "abort-on-load" in tier.model_path:
        abort()


def load_chat(tier: TierConfig, settings: Settings) -> FakeChat:
    _check_load(tier)
    return AbortingChat(tier)


def load_embedder(tier: TierConfig, settings: Settings) -> FakeEmbedder:
    _check_load(tier)
    return AbortingEmbedder()


def load_reranker(tier: TierConfig, settings: Settings) -> FakeReranker:
    _check_load(tier)
    return FakeReranker()


def factories() -> dict[str, object]:
    return {
        "chat:llamacpp": load_chat,
        "embedding:sentence_transformers": load_embedder,
        "rerank:cross_encoder": load_reranker,
    }
