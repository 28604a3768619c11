"""What is known about one request, and the protocol of whoever records it when the request ends.

Its own module so that `ops.metrics` (which records) and `middleware.request_context` (which fills
it in) both import it and not each other: middleware never imports ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class RequestInfo:
    """What is known about one request; routes fill it in, the middleware reads it at the end."""

    request_id: str
    started: float  # time.monotonic() when the request arrived
    tier: str = ""
    key_name: str = ""  # the API key's name (never the secret); "" without keys
    allowed_tiers: frozenset[str] | None = None  # the key's tiers; None = every tier
    prompt_tokens: int = 0
    completion_tokens: int = 0
    compute_seconds: float = 0.0  # time spent generating (from the scheduler), summed over choices
    first_token_at: float = 0.0  # time.monotonic() of the first generated text
    cache_hits: int = 0
    cache_misses: int = 0
    cache_noted: bool = False

    @property
    def ttft(self) -> float | None:
        return self.first_token_at - self.started if self.first_token_at else None

    @property
    def tokens_per_second(self) -> float | None:
        if self.completion_tokens <= 0 or self.compute_seconds <= 0:
            return None
        return self.completion_tokens / self.compute_seconds


class RequestObserver(Protocol):
    """Told about every finished request (`ops.metrics.Metrics` is one)."""

    def observe_request(self, tier: str, endpoint: str, status: int, duration: float, info: RequestInfo) -> None: ...
