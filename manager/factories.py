"""The backend loaders a tier can use, and what each imports on first use (for WARM_IMPORTS)."""

from __future__ import annotations

import importlib
import logging
import time

from core.protocols import Factory

log = logging.getLogger("llmservice.models")


def default_factories() -> dict[str, Factory]:
    """Backend loaders keyed "kind:backend"; each imports its heavy library only when called."""
    import embedders
    import rerankers
    import speech
    from chat import loaders
    from remote import chat as remote_chat
    from remote import embeddings as remote_embeddings
    from remote import speech as remote_speech

    return {
        "chat:llamacpp": loaders.load_llamacpp_chat,
        "chat:mlx": loaders.load_mlx_chat,
        "turns:remote": remote_chat.load_remote_chat,
        "workers:remote": remote_embeddings.load_remote_worker,
        "workers:speech:remote": remote_speech.load_remote_speech_worker,
        **embedders.FACTORIES,
        **rerankers.FACTORIES,
        **speech.FACTORIES,
    }


def warm_modules() -> dict[Factory, tuple[str, ...]]:
    """What each loader imports on first use: WARM_IMPORTS imports it in the background at start-up, so a
    first request pays for its model's load only (torch plus sentence-transformers take ~6 s here, MiniLM
    ~70 ms). Keyed by the loader itself, so a test's fake loaders warm nothing."""
    import embedders
    import rerankers
    import speech
    from chat import loaders

    return {
        loaders.load_llamacpp_chat: ("llama_cpp", "chat.llama_engine"),
        # llama_cpp first: QUICK_START_EMBEDDINGS answers through it while torch is still importing.
        embedders.load_sentence_transformers: ("llama_cpp", "sentence_transformers"),
        embedders.load_bge_m3: ("FlagEmbedding",),
        embedders.load_llamacpp_embedder: ("llama_cpp",),
        rerankers.load_cross_encoder: ("sentence_transformers",),
        rerankers.load_flag_reranker: ("FlagEmbedding",),
        rerankers.load_llamacpp_reranker: ("llama_cpp",),
        speech.load_faster_whisper: ("faster_whisper",),
    }


def import_all(modules: list[str]) -> None:
    """Import `modules` (on a background thread: the event loop keeps serving, and a first request that
    needs one of them waits only for what is left of its import)."""
    for name in modules:
        start = time.perf_counter()
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - the tier's own load reports a missing library
            log.debug("warming %s failed: %s", name, exc)
            continue
        log.info("imported %s in the background in %.1f s", name, time.perf_counter() - start)
