"""The OpenAI error envelope as a response, for ASGI code that runs outside FastAPI's handlers.

Middleware refuses requests before (or around) the routes, where the exception handlers cannot
help; every such refusal goes through `send_error`, so the body and headers are built in one place.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.responses import JSONResponse
from starlette.types import Receive, Scope, Send

from core.errors import ServiceError


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
