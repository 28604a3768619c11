"""The OpenAI error envelope as a response, for ASGI code that runs outside FastAPI's handlers.

Middleware refuses requests before (or around) the routes, where the exception handlers cannot
help; every such refusal goes through `send_error`, so the body and headers are built in one place.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping

from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from core.errors import ServiceError

log = logging.getLogger("llmservice")


def error_response(error: ServiceError, extra_headers: Mapping[str, str] | None = None) -> JSONResponse:
    """`error` in the envelope, with its status and headers (Retry-After, WWW-Authenticate) plus `extra_headers`."""
    return JSONResponse(error.body(), status_code=error.status, headers={**error.headers, **(extra_headers or {})})


async def send_error(
    error: ServiceError,
    scope: Scope,
    receive: Receive,
    send: Send,
    extra_headers: Mapping[str, str] | None = None,
) -> None:
    await error_response(error, extra_headers)(scope, receive, send)


# Frames of a 500's trace worth logging: enough to find the fault, never thousands of lines per request.
LOGGED_FRAMES = 12


def printable(text: str) -> str:
    """`text` with lone surrogates escaped: a message naming a bad key must still encode as UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def log_unexpected(exc: BaseException, method: str, path: str) -> None:
    """One error record for a 500, with only the innermost frames of its trace."""
    trace = "".join(traceback.format_exception(exc, limit=-LOGGED_FRAMES)).rstrip()
    log.error("unexpected error on %s %s\n%s", method, printable(path), trace)
