"""The HTTP service: `create_app(settings)` builds the app; `main()` runs it (`python server.py`).

No module-level state: everything a request needs hangs off `app.state` (settings, model manager),
so tests build as many independent apps as they like.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cache import ResponseCache
from config import ConfigError, Settings, load_settings, read_environment
from core.errors import InvalidRequest, MethodNotAllowed, NotFound, PayloadTooLarge, ServiceError
from core.protocols import Factory
from model_manager import ModelManager, default_factories

log = logging.getLogger("llmservice")


# ---------------------------------------------------------------- errors


def error_response(exc: ServiceError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request body", None
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid value")
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
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(ServiceError("The server hit an internal error"))


class BodyLimit:
    """Refuse request bodies over the limit with a 413 before the route reads them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = PayloadTooLarge(f"The request body is larger than {self.max_bytes} bytes")
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                await JSONResponse(too_large.body(), status_code=413)(scope, receive, send)
                return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except _BodyTooLarge:
            await JSONResponse(too_large.body(), status_code=413)(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


# ---------------------------------------------------------------- app


def create_app(settings: Settings, factories: Mapping[str, Factory] | None = None) -> FastAPI:
    """Build the service for `settings`; `factories` replaces the model loaders (tests use fakes)."""
    from api import admin, chat, dashboard, rag
    from api.state import AppState
    from middleware import request_context, security
    from ops import metrics
    from ops.lifecycle import Activity, ActivityTracker

    manager = ModelManager(settings, factories if factories is not None else default_factories())
    cache = ResponseCache(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager.preload()
        manager.start_idle_watch()
        try:
            yield
        finally:
            await manager.close()
            cache.close()

    app = FastAPI(title="llmservice", version="0.1.0", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.settings = settings
    app.state.manager = manager
    app.state.cache = cache
    app.state.activity = Activity()
    app.state.started = time.time()
    app.state.metrics = metrics.Metrics(manager)
    app.state.llm = AppState(settings, manager, cache, app.state.activity, app.state.metrics, started=app.state.started)
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    security.install(app, settings)  # auth, CORS, Host allowlist (outside the body limit)
    # Counts every request until its last byte (idle shutdown) and refuses new ones while draining.
    app.add_middleware(ActivityTracker, activity=app.state.activity)
    request_context.install(app, app.state.metrics)  # outermost: request id, access log, metrics
    for prefix in ("/v1", ""):
        app.include_router(chat.router, prefix=prefix)
        app.include_router(rag.router, prefix=prefix)
    app.include_router(rag.extra_router)
    app.include_router(admin.router)
    app.include_router(metrics.router)
    app.include_router(dashboard.router)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        tiers = {name: manager.status(name) for name in manager.tiers}
        degraded = any(t["state"] == "failed" for t in tiers.values())
        return {
            "status": "degraded" if degraded else "ok",
            "uptime_seconds": round(time.time() - app.state.started, 1),
            "tiers": tiers,
        }

    return app


# ---------------------------------------------------------------- entry point


def main(argv: list[str] | None = None, factories: Mapping[str, Factory] | None = None) -> int:
    from middleware.request_context import configure_logging
    from ops import lifecycle

    try:
        settings = load_settings(read_environment())
    except ConfigError as exc:
        sys.stderr.write(f"llmservice: configuration error: {exc}\n")  # logging is not set up yet
        return 2
    configure_logging(settings.log_level.upper() if settings.log_level != "trace" else "DEBUG")
    return lifecycle.serve(create_app(settings, factories), settings)


if __name__ == "__main__":
    sys.exit(main())
