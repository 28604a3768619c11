"""FastAPI's exception handlers: every error a route raises leaves in the OpenAI envelope.

Typed errors keep their status; validation errors become 400 naming the parameter; unknown routes
and methods 404/405; anything else a 500 that never shows `str(exc)`, logged with a bounded trace.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.errors import InvalidRequest, MethodNotAllowed, NotFound, ServiceError
from middleware.envelope import error_response, log_unexpected, printable

__all__ = ["error_response", "install_error_handlers"]

log = logging.getLogger("llmservice")

# Innermost frames of an unexpected error worth logging: a RecursionError's full trace is thousands of lines.


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request body", None
    first = errors[0]
    loc = [printable(str(part)) for part in first.get("loc", ()) if part != "body"]
    ctx = first.get("ctx") or {}
    # Whole-body checks (api/schemas.check_json) name the parameter in ctx: a model validator has no loc.
    param = ".".join(loc) or (printable(ctx["param"]) if isinstance(ctx.get("param"), str) else None)
    message = printable(first.get("msg", "invalid value"))
    if first.get("type") == "json_invalid":
        return "The request body is not valid JSON", None
    if first.get("type") == "missing":
        return f"Missing required parameter: {param!r}", param
    return (f"Invalid value for {param!r}: {message}" if param else message), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(InvalidRequest(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error_response(NotFound(f"No route for {request.method} {request.url.path}"))
        if exc.status_code == 405:
            return error_response(MethodNotAllowed(f"Method {request.method} is not allowed on {request.url.path}"))
        error = ServiceError(str(exc.detail))
        error.status = exc.status_code
        error.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        error.code = "http_error"
        return error_response(error)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log_unexpected(exc, request.method, request.url.path)
        return error_response(ServiceError("The server hit an internal error"))
