"""The response cache at the chat-turn seam: look a turn up, replay its events, record a live one.

An entry holds what generation produced, below tool-call shaping: for each choice its text pieces
(the stream's chunk boundaries) and finish reason, plus the token usage. A replay yields the same
events a live turn would, so every formatter shapes it exactly as it shapes a live result, and a hit
replays as SSE with the same framing whether the entry was filled by a stream or by a plain request.
Only deterministic turns (temperature 0, or a seed) are cached, and only once every choice ended
well.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from cache import ResponseCache
from config import TierConfig
from core.cache_keys import IGNORED_FIELDS, is_deterministic, request_key
from core.events import DoneEvent, Event, TextEvent
from core.turns import Choice, JsonObject, JsonValue, Turn, TurnRequest


@dataclass(frozen=True)
class CachePolicy:
    """The request's Cache-Control: `no-cache` skips the lookup (the fresh answer still refreshes the
    entry); `no-store` also keeps the answer out of the cache."""

    lookup: bool = True
    store: bool = True

    @classmethod
    def from_directives(cls, directives: set[str]) -> CachePolicy:
        skip = bool(directives & {"no-cache", "no-store"})
        return cls(lookup=not skip, store="no-store" not in directives)


@dataclass
class Entry:
    """The outcome of one lookup: `key` is None when the turn is not cacheable."""

    cache: ResponseCache | None
    key: str | None = None
    hit: JsonObject | None = None
    store: bool = True

    @property
    def status(self) -> str | None:
        if self.key is None:
            return None
        return "HIT" if self.hit is not None else "MISS"


async def lookup(
    cache: ResponseCache | None, endpoint: str, tier: TierConfig, request: TurnRequest, policy: CachePolicy
) -> Entry:
    if cache is None or not cache.enabled or not is_deterministic(request.sampling) or _wants_logprobs(request):
        return Entry(cache)
    normalised = {k: v for k, v in request.wire.items() if k not in IGNORED_FIELDS}
    if request.images:
        normalised = _images_by_digest(normalised, request)
    key = request_key(endpoint, tier, normalised)
    if not policy.lookup:
        return Entry(cache, key, store=policy.store)
    hit = await cache.get(key)
    return Entry(cache, key, hit if _well_formed(hit) else None)


def _wants_logprobs(request: TurnRequest) -> bool:
    """An entry keeps text only: an answer with an upstream's logprobs could not be replayed whole."""
    asked = request.wire.get("logprobs")  # chat: true; completions: a count, 0 included
    return (asked is not None and asked is not False) or bool(request.wire.get("top_logprobs"))


def _images_by_digest(wire: JsonObject, request: TurnRequest) -> JsonObject:
    """The request with each image's URL replaced by the digest of its bytes: an http URL may serve other
    bytes tomorrow, and the same image sent as a data URI or a URL is the same question."""
    digests = iter(image.digest for image in request.images)
    messages: list[JsonValue] = []
    for message in wire.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(message, dict) and isinstance(content, list):
            parts = [
                {**part, "image_url": {"sha256": next(digests, ""), "detail": _detail(part)}}
                if isinstance(part, dict) and part.get("type") == "image_url"
                else part
                for part in content
            ]
            message = {**message, "content": parts}
        messages.append(message)
    return {**wire, "messages": messages}


def _detail(part: dict[str, JsonValue]) -> JsonValue:
    url = part.get("image_url")
    return url.get("detail") if isinstance(url, dict) else None


def _well_formed(value: object) -> bool:
    choices = value.get("choices") if isinstance(value, dict) else None
    return (
        isinstance(choices, list)
        and bool(choices)
        and all(
            isinstance(c, dict) and isinstance(c.get("pieces"), list) and all(isinstance(p, str) for p in c["pieces"])
            for c in choices
        )
    )


# ---------------------------------------------------------------- replay


@dataclass
class _Replay:
    pieces: list[str]
    done: DoneEvent

    async def events(self) -> AsyncIterator[Event]:
        for piece in self.pieces:
            yield TextEvent(piece)
        yield self.done

    def cancel(self) -> None:
        """Nothing runs: a replay has nothing to stop."""


def replay(hit: JsonObject) -> Turn:
    """The recorded turn as a turn whose choices yield the recorded events (`lookup` checked its shape)."""
    usage = hit.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    prompt_tokens = _int(usage.get("prompt_tokens"))
    completion_tokens = _int(usage.get("completion_tokens"))
    choices: list[Choice] = []
    recorded = hit.get("choices")
    for choice in recorded if isinstance(recorded, list) else []:
        if isinstance(choice, dict) and isinstance(choice.get("pieces"), list):
            done = DoneEvent(str(choice.get("finish_reason", "stop")), prompt_tokens, completion_tokens)
            choices.append(_Replay([str(piece) for piece in choice["pieces"]], done))
    return Turn(choices, prompt_tokens, "HIT", replayed=True, recorded_completion_tokens=completion_tokens)


def _int(value: object) -> int:
    return int(value) if isinstance(value, (int, float)) else 0


# ---------------------------------------------------------------- record


@dataclass
class _Recording:
    """Collects every choice's pieces; stores the entry once all of them ended well."""

    entry: Entry
    prompt_tokens: int
    pieces: list[list[str]]
    finished: dict[int, DoneEvent] = field(default_factory=dict)

    async def finish(self, index: int, done: DoneEvent) -> None:
        self.finished[index] = done
        if len(self.finished) < len(self.pieces) or self.entry.cache is None or self.entry.key is None:
            return
        value = {
            "choices": [
                {"pieces": pieces, "finish_reason": self.finished[i].finish_reason}
                for i, pieces in enumerate(self.pieces)
            ],
            "usage": {
                # A remote turn learns its prompt size only from the upstream's final event.
                "prompt_tokens": self.prompt_tokens or max(d.prompt_tokens for d in self.finished.values()),
                "completion_tokens": sum(d.completion_tokens for d in self.finished.values()),
            },
        }
        await self.entry.cache.put(self.entry.key, value)


@dataclass
class _Recorded:
    inner: Choice
    recording: _Recording
    index: int

    async def events(self) -> AsyncIterator[Event]:
        pieces = self.recording.pieces[self.index]
        async for event in self.inner.events():
            if isinstance(event, TextEvent):
                pieces.append(event.text)
            elif isinstance(event, DoneEvent):
                await self.recording.finish(self.index, event)
            yield event

    def cancel(self) -> None:
        self.inner.cancel()


def record(choices: Sequence[Choice], entry: Entry, prompt_tokens: int) -> list[Choice]:
    """The choices of a live turn, recorded for the cache when the entry is to be filled."""
    if entry.key is None or not entry.store:
        return list(choices)
    recording = _Recording(entry, prompt_tokens, [[] for _ in choices])
    return [_Recorded(choice, recording, i) for i, choice in enumerate(choices)]
