"""Router: every way of naming a tier, the announced fallback, and the errors."""

from __future__ import annotations

import pytest

from config import load_settings
from core.errors import ModelNotFound, WrongModelKind
from core.routing import resolve

SETTINGS = load_settings(
    {
        "MEDIUM_MODEL_PATH": "/models/qwen2.5-7b-instruct.gguf",
        "MEDIUM_ALIASES": "gpt-4o,smart",
        "LIGHT_PATTERNS": "tiny-*",
    }
)


@pytest.mark.parametrize(
    ("name", "kind", "tier"),
    [
        ("light", "chat", "light"),
        ("MEDIUM", "chat", "medium"),
        ("light/gemma-3-270m-q4_k_m", "chat", "light"),
        ("medium/anything-else", "chat", "medium"),
        ("qwen2.5-7b-instruct", "chat", "medium"),
        ("gpt-4o", "chat", "medium"),
        ("tiny-model", "chat", "light"),
        ("text-embedding-3-small", "embedding", "embedding"),
        ("BAAI/bge-m3", "embedding", "embedding"),
        ("intfloat/e5-large", "embedding", "embedding"),
        ("bge-reranker-v2-m3", "rerank", "reranker"),
        ("cross-encoder/ms-marco-MiniLM-L-6-v2", "rerank", "reranker"),
        ("qwen2.5-0.5b-instruct", "chat", "light"),
        ("llama-3-8b", "chat", "medium"),
        ("mistral-14B", "chat", "medium"),
    ],
)
def test_names_resolve_to_tiers(name: str, kind: str, tier: str) -> None:
    resolution = resolve(name, kind, SETTINGS)
    assert resolution.tier == tier
    assert resolution.fallback_from is None


def test_unconfigured_chat_tier_falls_back_to_the_nearest_and_says_so() -> None:
    resolution = resolve("llama-3-70b", "chat", SETTINGS)
    assert resolution.requested_tier == "heavy"
    assert resolution.tier == "medium"
    assert resolution.fallback_from == "heavy"


def test_strict_tiers_turns_the_fallback_into_a_404() -> None:
    strict = load_settings({"STRICT_TIERS": "true"})
    with pytest.raises(ModelNotFound) as caught:
        resolve("heavy", "chat", strict)
    assert "not configured" in caught.value.message


def test_unknown_name_is_a_404_listing_valid_names() -> None:
    with pytest.raises(ModelNotFound) as caught:
        resolve("no-such-model", "chat", SETTINGS)
    assert caught.value.status == 404 and caught.value.code == "model_not_found"
    assert "light/gemma-3-270m-q4_k_m" in caught.value.message and "smart" in caught.value.message


def test_chat_request_to_embedding_tier_is_a_400() -> None:
    with pytest.raises(WrongModelKind) as caught:
        resolve("embedding", "chat", SETTINGS)
    assert caught.value.status == 400
    assert "embedding tier" in caught.value.message
