"""Response cache keys: what an answer is keyed on, and which request fields and tier settings count.

A key is the SHA-256 of canonical JSON over the endpoint, the tier, the model's identity (path, file size
and mtime, so a swapped model file never serves stale answers) and the normalised request. Kept apart from
the cache's storage (cache.py) because the routes and the chat engine make keys without touching it, and
because every field of a request schema and of `TierConfig` must be classified here (tests/test_cache.py).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from config import TIER_KEYS, TierConfig

SCHEMA_VERSION = 1  # bump when the key derivation or the stored value format changes

# Request fields that never change the answer. Everything else in a request schema is keyed;
# tests/test_cache.py fails when a schema gains a field that is in neither set.
# `session_id` never reaches a key: api/sessions.py writes the session's whole history into the turn's
# `messages` and drops the id, so two histories never share an entry, and keys made before sessions
# existed stay valid.
IGNORED_FIELDS = frozenset({"stream", "stream_options", "user", "store", "metadata", "session_id", "priority"})
_SAMPLING = frozenset(
    {
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "max_tokens",
        "stop",
        "seed",
        "repeat_penalty",
        "frequency_penalty",
        "presence_penalty",
        "n",
        "logprobs",
        "logit_bias",
    }
)  # keyed by chat and completions alike
KEYED_FIELDS: dict[str, frozenset[str]] = {
    "ChatCompletionRequest": _SAMPLING
    | frozenset(
        {
            "model",
            "messages",
            "max_completion_tokens",
            "top_logprobs",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "response_format",
        }
    ),
    # Translated into a chat request before the cache sees it (api/responses.py): the history behind
    # previous_response_id and the instructions become its messages, as for a session.
    "ResponsesRequest": frozenset(
        {
            "model",
            "input",
            "instructions",
            "previous_response_id",
            "max_output_tokens",
            "temperature",
            "top_p",
            "tools",
            "tool_choice",
            "parallel_tool_calls",
            "text",
            "truncation",
        }
    ),
    "CompletionRequest": _SAMPLING
    | frozenset(
        {
            "model",
            "prompt",
            "echo",
            "suffix",
            "best_of",
        }
    ),
    # Embeddings: one entry per input text holding the model's raw output, keyed by the text, the
    # output types and truncate (routes_rag.embed_texts); dimensions, normalize and encoding_format
    # are applied to it after the lookup, so they share entries. Rerank: one entry per request.
    "EmbeddingRequest": frozenset(
        {
            "model",
            "input",
            "encoding_format",
            "dimensions",
            "embedding_type",
            "return_sparse",
            "return_colbert",
            "truncate",
        }
    ),
    "TeiEmbedRequest": frozenset({"model", "inputs", "normalize", "truncate", "dimensions"}),
    "RerankRequest": frozenset(
        {
            "model",
            "query",
            "documents",
            "texts",
            "top_n",
            "top_k",
            "return_documents",
            "return_text",
            "raw_scores",
            "truncate",
        }
    ),
}

# Tier settings that cannot change an answer (scheduling, memory mapping, names), as config's table
# flags them; all others are part of the model identity, since they fill in what a request leaves out.
_OPERATIONAL_TIER_FIELDS = frozenset(key.name for key in TIER_KEYS if not key.cache_key)
# TierConfig fields outside the table: the tier's own name, keyed.
_TIER_IDENTITY_FIELDS = frozenset({"name"})


def _file_stamp(path: Path) -> list[Any]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


@functools.lru_cache(maxsize=16)
def _package_version(name: str) -> str:
    """The installed version of a packaged model (looked up once: it costs ~0.2 ms per call)."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"


def model_identity(config: TierConfig) -> dict[str, Any]:
    """What identifies the model behind a tier: its path, file sizes and mtimes, output settings."""
    path = config.model_path
    files: Any = None
    if path.startswith("package:"):
        files = _package_version(path.removeprefix("package:"))
    elif path and not path.startswith(("http://", "https://")):
        target = Path(path)
        try:
            if target.is_dir():
                files = sorted([entry.name, *_file_stamp(Path(entry.path))] for entry in os.scandir(target))
            else:
                files = _file_stamp(target)
        except OSError:
            files = "missing"
    settings = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in _OPERATIONAL_TIER_FIELDS
        and f.name != "model_path"
        and not (f.name in _KEYED_SINCE_V1 and getattr(config, f.name) == f.default)
    }
    if config.mmproj:  # the projector is part of the model: a new file answers images differently
        try:
            settings["mmproj"] = [config.mmproj, *_file_stamp(Path(config.mmproj))]
        except OSError:
            settings["mmproj"] = [config.mmproj, "missing"]
    return {"path": path, "files": files, "settings": settings}


# Keyed settings added after SCHEMA_VERSION 1: part of the identity only when they differ from their
# default, so the entries of a tier that does not use them keep their keys across upgrades
# (tests/test_cache.py pins two keys). A new keyed tier setting belongs here.
_KEYED_SINCE_V1 = frozenset({"upstreams", "upstream_model", "beam_size", "compute_type", "mmproj"})


def digest(parts: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of `parts` (sorted keys, no whitespace, schema version)."""
    canonical = json.dumps(
        {"v": SCHEMA_VERSION, **parts}, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    )
    return hashlib.sha256(canonical.encode()).hexdigest()


def unclassified_fields(schema: type[Any]) -> set[str]:
    """Fields of a request schema that are neither keyed nor ignored (must be empty: see the tests)."""
    keyed = KEYED_FIELDS.get(schema.__name__, frozenset())
    return set(schema.model_fields) - keyed - IGNORED_FIELDS


def unclassified_tier_fields(config_type: type[TierConfig] = TierConfig) -> set[str]:
    """`TierConfig` fields that config's table does not flag as keyed or not (must be empty: see the tests)."""
    classified = {key.name for key in TIER_KEYS} | _TIER_IDENTITY_FIELDS
    return {f.name for f in dataclasses.fields(config_type)} - classified


def normalise_request(body: Any) -> dict[str, Any]:
    """The request as JSON, without the fields that never change the answer."""
    return body.model_dump(mode="json", exclude=set(IGNORED_FIELDS))


def request_key(endpoint: str, config: TierConfig, request: Mapping[str, Any]) -> str:
    """The key of a whole-request entry (chat, completions, rerank)."""
    return digest({"endpoint": endpoint, "tier": config.name, "model": model_identity(config), "request": request})


def text_keys(endpoint: str, config: TierConfig, texts: Sequence[str], options: Mapping[str, Any]) -> list[str]:
    """One key per input text (embeddings): `options` holds every request field except the input."""
    base = {"endpoint": endpoint, "tier": config.name, "model": model_identity(config), "options": dict(options)}
    return [digest({**base, "text": text}) for text in texts]


def is_deterministic(body: Any) -> bool:
    """Cacheable sampling: temperature explicitly 0, or a seed. An omitted temperature is not 0."""
    return body.temperature == 0 or body.seed is not None
