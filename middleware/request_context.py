"""Per-request context: the request id, what the route learned (tier, tokens, first token), access logs.

`RequestContext` is the outermost middleware. It gives every request an id (the client's `x-request-id`
when it is sane, else a fresh one), puts it in a contextvar that `RequestIdFilter` copies into every
log record, returns it in the `x-request-id` response header, and when the response's last byte is
sent writes one access-log line and records the request's metrics.

Request text (a path, a model name) reaches the logs, so control characters in it are escaped: in the
access line itself, and in the arguments of every record by `ControlCharacterFilter`, which
`configure_logging` puts on every handler. A `%0a` in a path cannot forge a log line.

Routes report what only they know through `note_tier`, `add_tokens`, `mark_first_token` and
`note_cache`; BearerAuth reports the request's key through `note_key`. These write into a mutable
`RequestInfo` held by the contextvar; the object is shared with the tasks that stream the response
body, so a stream's numbers arrive before the log line.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import ModelNotAllowed, ServiceError
from middleware.envelope import log_unexpected, send_error
from middleware.request_info import RequestInfo, RequestObserver

access_log = logging.getLogger("llmservice.access")
log = logging.getLogger("llmservice")
HEADER = "x-request-id"
# A client-supplied id is kept only if it is short and plain (it goes into logs and headers).
_SANE_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
CLIENT_CLOSED = 499  # nginx's status for a request whose client left before any response


_current: contextvars.ContextVar[RequestInfo | None] = contextvars.ContextVar("llmservice_request", default=None)


def current() -> RequestInfo | None:
    return _current.get()


def current_request_id() -> str:
    info = _current.get()
    return info.request_id if info is not None else "-"


# ---------------------------------------------------------------- hooks for routes (no-ops outside a request)


def note_key(name: str, tiers: frozenset[str] | None) -> None:
    """The request's API key (from BearerAuth): its name for logs and metrics, the tiers it may use."""
    info = _current.get()
    if info is not None:
        info.key_name = name
        info.allowed_tiers = tiers


def tier_allowed(tier: str) -> bool:
    """Whether the request's key may use `tier` (always, without a restricted key)."""
    info = _current.get()
    return info is None or info.allowed_tiers is None or tier in info.allowed_tiers


def note_tier(tier: str) -> None:
    """The tier serving the request. Every route notes it right after resolving the model name and
    before any model loads, so this is also where a key restricted to other tiers is refused (403)."""
    info = _current.get()
    if info is None:
        return
    if not tier_allowed(tier):
        raise ModelNotAllowed(
            f"This API key may not use the {tier} tier (it may use: {', '.join(sorted(info.allowed_tiers or ()))})",
            param="model",
        )
    info.tier = tier


def add_tokens(prompt_tokens: int, completion_tokens: int, compute_seconds: float = 0.0) -> None:
    """Count one finished generation (call once per choice)."""
    info = _current.get()
    if info is not None:
        info.prompt_tokens += prompt_tokens
        info.completion_tokens += completion_tokens
        info.compute_seconds += compute_seconds


def mark_first_token() -> None:
    """Stamp the time of the first generated text (later calls are ignored)."""
    info = _current.get()
    if info is not None and not info.first_token_at:
        info.first_token_at = time.monotonic()


def note_cache(hits: int = 0, misses: int = 0) -> None:
    """Report cache lookups of this request (e.g. per input text of an embeddings batch).

    Without a call, an `X-Cache: HIT|MISS` response header counts as one lookup.
    """
    info = _current.get()
    if info is not None:
        info.cache_hits += hits
        info.cache_misses += misses
        info.cache_noted = True


# ---------------------------------------------------------------- logging

# C0 and C1 controls, DEL and Unicode's line and paragraph separators: anything a log reader may
# take as the end of a line or as a terminal command.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_CONTROL_OR_QUOTE = re.compile(r'[\x00-\x1f\x7f-\x9f\u2028\u2029"\\]')


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_control(text: str, quoted: bool = False) -> str:
    """`text` with control characters as `\\xNN` (nginx's access-log escaping); `quoted` also escapes `"`
    and backslashes, for a field the line puts in quotes."""
    return (_CONTROL_OR_QUOTE if quoted else _CONTROL).sub(_escaped, text)


class ControlCharacterFilter(logging.Filter):
    """Escapes control characters in a record's string arguments, where request text arrives.

    The message template is ours and may span lines on purpose; only the values put into it are escaped.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(escape_control(a) if isinstance(a, str) else a for a in args)
        elif isinstance(args, dict):
            record.args = {k: escape_control(v) if isinstance(v, str) else v for k, v in args.items()}
        return True


class RequestIdFilter(logging.Filter):
    """Adds `record.request_id` (the current request's id, or "-") so formats can use %(request_id)s."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id()
        return True


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"


def configure_logging(level: str) -> None:
    """Root logging for `main()`: every handler's records carry the request id, with request text escaped."""
    logging.basicConfig(level=level, format=LOG_FORMAT)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
        handler.addFilter(ControlCharacterFilter())


# ---------------------------------------------------------------- middleware


def _request_id(scope: Scope) -> str:
    for name, value in scope.get("headers", ()):
        if name == b"x-request-id":
            candidate = value.decode("latin-1")
            if _SANE_ID.fullmatch(candidate):
                return candidate
            break
    return uuid.uuid4().hex


def endpoint_label(scope: Scope) -> str:
    """The matched route's full path template, e.g. "/v1/models/{model_id:path}"; "unmatched" otherwise.

    Templates keep metric labels bounded. A route of an included router knows its path without the
    router's prefix ("/v1"), so the prefix is taken from the request path where the template matches.
    """
    route = scope.get("route")
    template = getattr(route, "path", None)
    if not isinstance(template, str):
        return "unmatched"
    regex = getattr(route, "path_regex", None)
    path: str = scope.get("path", "")
    if regex is not None:
        for i, char in enumerate(path):
            if char == "/" and regex.match(path[i:]):
                return path[:i] + template
    return template


class RequestContext:
    """Request id, access log and request metrics around everything else."""

    def __init__(self, app: ASGIApp, metrics: RequestObserver | None = None) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        info = RequestInfo(request_id=_request_id(scope), started=time.monotonic())
        token = _current.set(info)
        status = CLIENT_CLOSED  # stays so only when no response starts (the client went away first)
        headers: dict[str, str] = {}
        started_response = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                started_response = True
                status = message["status"]
                raw = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"x-request-id"]
                raw.append((b"x-request-id", info.request_id.encode("latin-1")))
                message = {**message, "headers": raw}
                headers.update({k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw})
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception as exc:  # noqa: BLE001 - the last line of defence: an envelope with the id, never a trace
            log_unexpected(exc, str(scope.get("method")), str(scope.get("path")))
            if not started_response:
                await send_error(ServiceError("The server hit an internal error"), scope, receive, send_with_id)
        finally:
            self._finish(scope, info, status, headers)
            _current.reset(token)

    def _finish(self, scope: Scope, info: RequestInfo, status: int, headers: dict[str, str]) -> None:
        duration = time.monotonic() - info.started
        endpoint = endpoint_label(scope)
        tier = info.tier or headers.get("x-tier", "")
        if not info.cache_noted:
            cache = headers.get("x-cache", "").upper()
            info.cache_hits, info.cache_misses = int(cache == "HIT"), int(cache == "MISS")
        if self.metrics is not None:
            self.metrics.observe_request(tier, endpoint, status, duration, info)
        access_log.info("%s", _access_line(scope, status, duration, tier, info))


def _access_line(scope: Scope, status: int, duration: float, tier: str, info: RequestInfo) -> str:
    client = scope.get("client")
    request = f"{scope.get('method')} {scope.get('path')}"
    parts = [
        escape_control(str(client[0])) if client else "-",
        f'"{escape_control(request, quoted=True)}"',
        str(status),
        f"duration_ms={duration * 1000:.1f}",
    ]
    if tier:
        parts.append(f"tier={escape_control(tier)}")
    if info.key_name:
        parts.append(f"key={info.key_name}")  # key names are checked to be plain (middleware/keys.py)
    if info.prompt_tokens or info.completion_tokens:
        parts.append(f"prompt_tokens={info.prompt_tokens} completion_tokens={info.completion_tokens}")
    if info.ttft is not None:
        parts.append(f"ttft_ms={info.ttft * 1000:.1f}")
    if info.tokens_per_second is not None:
        parts.append(f"tokens_per_s={info.tokens_per_second:.1f}")
    if info.cache_hits or info.cache_misses:
        parts.append(f"cache_hits={info.cache_hits} cache_misses={info.cache_misses}")
    return " ".join(parts)
