"""The response cache seen from the HTTP routes: the request's Cache-Control, and the lookups of
embeddings (one entry per text) and rerank (one per request). Chat and completions are cached at the
chat-turn seam (chat/recording.py), as the events a turn produced.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import Request

from api.state import app_state
from cache import ResponseCache
from config import TierConfig
from core.cache_keys import normalise_request, request_key, text_keys
from middleware import request_context


def cache_directives(request: Request) -> set[str]:
    """The request's Cache-Control directives: `no-cache` skips the lookup (the fresh answer still
    refreshes the entry); `no-store` also keeps the answer out of the cache."""
    raw = request.headers.get("cache-control", "").lower()
    return {part.strip().split("=", 1)[0] for part in raw.split(",") if part.strip()}


# ---------------------------------------------------------------- embeddings and rerank


def _enabled(request: Request) -> ResponseCache | None:
    cache = app_state(request).cache
    return cache if cache.enabled else None


async def per_text(
    request: Request,
    endpoint: str,
    tier: TierConfig,
    texts: Sequence[str],
    options: dict[str, Any],
    compute: Callable[[list[str]], Awaitable[Sequence[Any]]],
) -> tuple[list[Any], dict[str, str]]:
    """Per-text entries (embeddings): values for `texts` in order, computing only the texts not
    cached (each distinct text once); `compute` returns JSON-serialisable values. Also the
    `X-Cache` header: HIT when every text came from the cache."""
    cache = _enabled(request)
    if cache is None:
        return list(await compute(list(texts))), {}
    keys = text_keys(endpoint, tier, texts, options)
    directives = cache_directives(request)
    if directives & {"no-cache", "no-store"}:
        values, hits = list(await compute(list(texts))), 0
        if "no-store" not in directives:
            await cache.put_many(dict(zip(keys, values, strict=True)))
    else:
        values, hits = await cache.get_or_compute_many(keys, texts, compute)
    request_context.note_cache(hits=hits, misses=len(texts) - hits)
    return values, {"X-Cache": "HIT" if hits == len(texts) else "MISS"}


async def whole_request(
    request: Request, endpoint: str, tier: TierConfig, body: Any, compute: Callable[[], Awaitable[Any]]
) -> tuple[Any, dict[str, str]]:
    """One entry per request (rerank, always deterministic): the cached value or `compute()`'s,
    which must be JSON-serialisable; errors propagate and are never stored."""
    cache = _enabled(request)
    if cache is None:
        return await compute(), {}
    key = request_key(endpoint, tier, normalise_request(body))
    directives = cache_directives(request)
    if not directives & {"no-cache", "no-store"}:
        hit = await cache.get(key)
        if hit is not None:
            request_context.note_cache(hits=1)
            return hit, {"X-Cache": "HIT"}
    value = await compute()
    if "no-store" not in directives:
        await cache.put(key, value)
    request_context.note_cache(misses=1)
    return value, {"X-Cache": "MISS"}
