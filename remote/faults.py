"""What an upstream's answer means for a request: a fault to fail over from, or an error to pass through.

Faults (another upstream may do better): connect errors and timeouts, 5xx, 429, 408, a stream that
stalls or ends before its first event. Any other status is the upstream's verdict on the request
itself (a 400 for a prompt over its context, a 404 for a model it does not serve): it goes back to
our client with its status, message and code, and it is not retried. A 400 that names the context
(CONTEXT_CODES, CONTEXT_TYPES) is also a ContextLengthExceeded, so a session's turn can trim and retry.
"""

from __future__ import annotations

import json

from remote.pool import UpstreamContextExceeded, UpstreamRefused

RETRYABLE_STATUSES = frozenset({408, 429})
# How upstreams say "the prompt is longer than my context", by field, never by message text: OpenAI's
# code (vLLM-compatible servers and llmservice use it too) and llama-server's error type.
CONTEXT_CODES = frozenset({"context_length_exceeded"})
CONTEXT_TYPES = frozenset({"exceed_context_size_error"})
MAX_ERROR_BYTES = 64 * 1024  # an error body is read for its message, never in full


class UpstreamFault(Exception):
    """An attempt failed in a way that says nothing about the request: try another upstream."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


def is_fault(status: int) -> bool:
    return status >= 500 or status in RETRYABLE_STATUSES


def retry_after_seconds(value: str | None) -> float | None:
    """A Retry-After header in seconds (the HTTP-date form is rare from model servers: ignored)."""
    if not value:
        return None
    try:
        return max(0.0, float(value.strip()))
    except ValueError:
        return None


def refusal(status: int, body: bytes) -> UpstreamRefused:
    """The upstream's client error, in our envelope: OpenAI's `{"error": {...}}`, TEI's
    `{"error": "...", "error_type": ...}`, FastAPI's `{"detail": ...}`, or plain text."""
    message, code, kind, param = "", f"upstream_{status}", "invalid_request_error", None
    try:
        parsed = json.loads(body[:MAX_ERROR_BYTES])
    except (ValueError, UnicodeDecodeError):
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message") or "")
        code = str(error.get("code") or code)
        kind = str(error.get("type") or kind)
        param = str(error["param"]) if error.get("param") is not None else None
    elif isinstance(error, str):
        message = error
        code = str(parsed.get("error_type") or code) if isinstance(parsed, dict) else code
    elif isinstance(parsed, dict) and parsed.get("detail") is not None:
        message = str(parsed["detail"])
    else:
        message = body[:1000].decode("utf-8", "replace").strip()
    message = message or f"The upstream answered {status}"
    if status == 400 and (code in CONTEXT_CODES or kind in CONTEXT_TYPES):
        return UpstreamContextExceeded(status, message, "context_length_exceeded", kind, param)
    return UpstreamRefused(status, message, code, kind, param)


def fault_text(status: int, body: bytes) -> str:
    """A short description of a faulty answer, for the pool's last error and the final 503."""
    detail = refusal(status, body).message
    return f"HTTP {status}: {detail[:200]}"
