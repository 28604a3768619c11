"""Maps a requested model name to a tier. Pure: no I/O, no state.

Order: exact tier name -> `tier/model` id -> alias -> glob patterns -> size hints. An unknown name is
a 404 listing the valid names. The one fallback, an unconfigured chat tier to the nearest configured
one, is reported in `Resolution.fallback_from` so the server can announce it in `X-Tier`.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from config import CHAT_TIERS, TIERS, Settings
from core.errors import ModelNotFound, WrongModelKind

# Checked in order: reranker names often contain embedding words ("bge-reranker", "cross-encoder/...-MiniLM").
# Speech: OpenAI's "whisper-1", "distil-whisper/...", "gpt-4o-transcribe".
BUILTIN_PATTERNS: dict[str, tuple[str, ...]] = {
    "speech": ("*whisper*", "*transcribe*"),
    "reranker": ("*rerank*", "*cross-encoder*", "*cross_encoder*"),
    "embedding": ("*embed*", "*bge*", "*e5*", "*minilm*", "*mpnet*", "*gte-*", "*nomic*"),
}
# Size hints such as "qwen2.5-0.5b", "llama-3-8b-instruct", "70B": parameters in billions.
_SIZE = re.compile(r"(?<![a-z0-9.])(\d+(?:\.\d+)?)\s*b(?![a-z0-9])", re.IGNORECASE)
_FALLBACK_ORDER = {"heavy": ("medium", "light"), "medium": ("light", "heavy"), "light": ("medium", "heavy")}
KIND_OF_TIER = {**{t: "chat" for t in CHAT_TIERS}, "embedding": "embedding", "reranker": "rerank", "speech": "speech"}


@dataclass(frozen=True)
class Resolution:
    tier: str  # the configured tier that serves the request
    requested_tier: str  # the tier the name pointed at before any fallback
    fallback_from: str | None = None  # set when requested_tier is unconfigured and a neighbour serves


def _size_tier(name: str) -> str | None:
    match = _SIZE.search(name)
    if match is None:
        return None
    billions = float(match.group(1))
    if billions <= 3:
        return "light"
    return "medium" if billions <= 14 else "heavy"


def _match_tier(name: str, settings: Settings) -> str | None:
    """The tier a name points at, configured or not."""
    lowered = name.strip().lower()
    if lowered in TIERS:
        return lowered
    for tier in settings.tiers.values():
        if lowered == tier.model_id.lower() or lowered == tier.model_name.lower():
            return tier.name
    head, sep, _ = lowered.partition("/")
    if sep and head in TIERS:
        return head
    for tier in settings.tiers.values():
        if lowered in (alias.lower() for alias in tier.aliases):
            return tier.name
    for tier in settings.tiers.values():
        if any(fnmatch.fnmatchcase(lowered, pattern.lower()) for pattern in tier.patterns):
            return tier.name
    for tier_name, patterns in BUILTIN_PATTERNS.items():
        if any(fnmatch.fnmatchcase(lowered, pattern) for pattern in patterns):
            return tier_name
    return _size_tier(lowered)


def valid_names(settings: Settings) -> list[str]:
    names: list[str] = []
    for tier in settings.tiers.values():
        names += [tier.name, tier.model_id, *tier.aliases]
    return names


def resolve(name: str, kind: str, settings: Settings) -> Resolution:
    """The tier serving `name` for an endpoint of `kind` ('chat', 'embedding', 'rerank' or 'speech')."""
    tier = _match_tier(name, settings)
    if tier is None:
        raise ModelNotFound(
            f"The model {name!r} does not exist. Valid names: {', '.join(valid_names(settings))}",
            param="model",
        )
    if KIND_OF_TIER[tier] != kind:
        raise WrongModelKind(
            f"The model {name!r} is served by the {tier} tier, which does not serve {kind} requests",
            param="model",
        )
    if tier in settings.tiers:
        return Resolution(tier=tier, requested_tier=tier)
    if tier in CHAT_TIERS and not settings.strict_tiers:
        for neighbour in _FALLBACK_ORDER[tier]:
            if neighbour in settings.tiers:
                return Resolution(tier=neighbour, requested_tier=tier, fallback_from=tier)
    raise ModelNotFound(
        f"The model {name!r} maps to the {tier} tier, which is not configured. "
        f"Valid names: {', '.join(valid_names(settings))}",
        param="model",
    )
