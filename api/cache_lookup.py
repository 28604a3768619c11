"""The response cache seen from the HTTP routes: look a request up, replay a hit, fill on success.

A chat or completions entry holds what generation produced, not the rendered response: for each
choice its text pieces (the stream's chunk boundaries) and finish reason, plus the token usage. The
routes shape it exactly as they shape a live result, so a hit replays as SSE with the same framing
whether the entry was filled by a stream or by a plain request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from cache import ResponseCache, is_deterministic, normalise_request, request_key, text_keys
from chat.scheduler import DoneEvent
from config import TierConfig
from middleware import request_context


def cache_directives(request: Request) -> set[str]:
    """The request's Cache-Control directives: `no-cache` skips the lookup (the fresh answer still
    refreshes the entry); `no-store` also keeps the answer out of the cache."""
    raw = request.headers.get("cache-control", "").lower()
    return {part.strip().split("=", 1)[0] for part in raw.split(",") if part.strip()}


@dataclass
class CacheLookup:
    """The outcome of one lookup: `key` is None when the request is not cacheable."""

    cache: ResponseCache | None
    key: str | None = None
    hit: dict[str, Any] | None = None
    store_result: bool = True

    @property
    def headers(self) -> dict[str, str]:
        if self.key is None:
            return {}
        return {"X-Cache": "HIT" if self.hit is not None else "MISS"}

    async def store(
        self, choices: Sequence[tuple[Sequence[str], str]], prompt_tokens: int, completion_tokens: int
    ) -> None:
        """Fill the entry from a finished result: (pieces, finish reason) per choice and the usage."""
        if self.cache is None or self.key is None or not self.store_result:
            return
        value = {
            "choices": [{"pieces": list(pieces), "finish_reason": reason} for pieces, reason in choices],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
        }
        await self.cache.put(self.key, value)


async def lookup(request: Request, endpoint: str, tier: TierConfig, body: Any) -> CacheLookup:
    """Look up a deterministic request (temperature 0 or a seed); others are never cached."""
    cache: ResponseCache | None = getattr(request.app.state, "cache", None)
    if cache is None or not cache.enabled or not is_deterministic(body):
        return CacheLookup(cache)
    key = request_key(endpoint, tier, normalise_request(body))
    directives = cache_directives(request)
    if directives & {"no-cache", "no-store"}:
        return CacheLookup(cache, key, store_result="no-store" not in directives)
    hit = await cache.get(key)
    if not _well_formed(hit):
        hit = None
    return CacheLookup(cache, key, hit)


def _well_formed(value: Any) -> bool:
    try:
        return all(isinstance(piece, str) for c in value["choices"] for piece in c["pieces"]) and bool(value["choices"])
    except (TypeError, KeyError):
        return False


@dataclass
class CachedRun:
    """A cached choice with the surface of a running job, so the SSE code replays it unchanged."""

    pieces: list[str]
    done: DoneEvent
    chunks: list[str] = field(default_factory=list)

    def cancel(self) -> None:
        """Nothing runs: a replay has nothing to stop."""

    async def events(self) -> AsyncIterator[str]:
        for piece in self.pieces:
            yield piece


def cached_runs(hit: dict[str, Any]) -> list[CachedRun]:
    usage = hit.get("usage", {})
    runs = []
    for choice in hit["choices"]:
        done = DoneEvent(
            finish_reason=str(choice.get("finish_reason", "stop")),
            prompt_tokens=int(usage.get("prompt_tokens", 0)),
            completion_tokens=int(usage.get("completion_tokens", 0)),
            queue_seconds=0.0,
            compute_seconds=0.0,
        )
        runs.append(CachedRun(list(choice["pieces"]), done))
    return runs


async def no_release() -> None:
    """The release of a cache replay: it holds no lease."""


def filler(cached: CacheLookup) -> Callable[[Any], Awaitable[None]] | None:
    """The `on_complete` of a live stream: fills the cache once the stream ran to its end."""
    if cached.key is None:
        return None

    async def fill(running: Any) -> None:
        done = running.done
        await cached.store([(running.chunks, done.finish_reason)], done.prompt_tokens, done.completion_tokens)

    return fill


async def store_jobs(cached: CacheLookup, jobs: Sequence[Any], prompt_tokens: int) -> None:
    """Fill the cache from finished non-streamed jobs (routes_chat.RunningJob)."""
    completion_tokens = sum(r.done.completion_tokens for r in jobs if r.done is not None)
    choices = [(r.chunks, r.done.finish_reason if r.done else "stop") for r in jobs]
    await cached.store(choices, prompt_tokens, completion_tokens)


# ---------------------------------------------------------------- embeddings and rerank


def _enabled(request: Request) -> ResponseCache | None:
    cache: ResponseCache | None = getattr(request.app.state, "cache", None)
    return cache if cache is not None and cache.enabled else None


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
