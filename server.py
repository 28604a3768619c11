"""The HTTP service: `create_app(settings)` builds the app; `main()` runs it (`python server.py`).

No module-level state: everything a request needs hangs off `app.state.llm` (`api.state.AppState`:
settings, model manager, cache, ...), so tests build as many independent apps as they like.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request

from cache import ResponseCache
from config import ConfigError, Settings, load_settings, read_environment
from core.protocols import Factory
from manager.factories import default_factories
from model_manager import ModelManager

if TYPE_CHECKING:
    from middleware.limits import Limiter

# ---------------------------------------------------------------- app


def create_app(
    settings: Settings, factories: Mapping[str, Factory] | None = None, limiter: Limiter | None = None
) -> FastAPI:
    """Build the service for `settings`; `factories` replaces the model loaders (tests use fakes), `limiter`
    the in-process rate limiter (tests drive its clock). A bad API_KEYS_FILE raises `ConfigError`."""
    from api import admin, audio, chat, dashboard, old_servers, ollama, rag, responses, sessions
    from api.error_handlers import install_error_handlers
    from api.state import AppState
    from middleware import stack
    from middleware.activity import Activity
    from middleware.keys import KeyStore
    from middleware.security import is_authenticated
    from ops import metrics
    from scale.shared import Shared
    from sessions.conversations import Conversations, Limits

    keys = KeyStore(settings.api_keys, settings.api_keys_file)
    manager = ModelManager(settings, factories if factories is not None else default_factories())
    cache = ResponseCache(settings)
    shared = Shared.build(settings, cache)  # what replicas share through Redis, if configured
    conversations = Conversations(shared.store, Limits.from_settings(settings), locks=shared.turn_locks)
    limiter = limiter if limiter is not None else shared.limiter

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        manager.preload()
        manager.start_idle_watch()
        conversations.start_purging()
        try:
            with keys.reload_on_sighup():
                yield
        finally:
            await conversations.close()
            state.downloads.close()  # a transfer in progress stops at its next chunk
            await manager.close()
            await shared.aclose()
            await cache.aclose()

    app = FastAPI(title="llmservice", version="0.1.0", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    state = AppState(
        settings,
        manager,
        cache,
        Activity(),
        metrics.Metrics(manager, shared.status if shared.uses else None),
        started=time.time(),
        conversations=conversations,
    )
    app.state.llm = state
    install_error_handlers(app)
    stack.install(app, settings, state.activity, state.metrics, keys, limiter)
    # "/api/v1" and "/api/admin" are the replaced servers' prefixes; Ollama's API owns the rest of "/api".
    app.include_router(old_servers.v1_router)  # before /api/v1/models/{id}, which would take memory/usage
    for prefix in ("/v1", "", "/api/v1"):
        app.include_router(chat.router, prefix=prefix)
        app.include_router(rag.router, prefix=prefix)
        app.include_router(responses.router, prefix=prefix)
        app.include_router(sessions.router, prefix=prefix)
        app.include_router(audio.router, prefix=prefix)
    app.include_router(rag.extra_router)
    app.include_router(admin.router)
    app.include_router(admin.router, prefix="/api")
    app.include_router(ollama.router)
    app.include_router(ollama.root_router)
    app.include_router(metrics.router)
    app.include_router(dashboard.router)

    async def health(request: Request) -> dict[str, Any]:
        tiers = {name: manager.status(name) for name in manager.tiers}
        # A remote tier whose every upstream is out (breakers open) is degraded too, as a failed tier is.
        degraded = any(t["state"] == "failed" or t.get("pool") == "degraded" for t in tiers.values())
        status = "degraded" if degraded else "ok"
        if settings.keys_configured and not is_authenticated(request.scope):
            return {"status": status}  # liveness only: model names and failure reasons need a key
        body: dict[str, Any] = {"status": status, "uptime_seconds": round(time.time() - state.started, 1)}
        if manager.slots.limit:  # MAX_LOADED_CHAT_TIERS: who waits for which chat tier to load
            body["chat_queue"] = manager.slots.status()
        if shared.uses:  # "ok" or "bypassed"/"unavailable" per use; a Redis outage never makes a replica unready
            body["redis"] = {use: info.get("state") for use, info in shared.status().items()}
        return {**body, "tiers": tiers}

    for path in ("/health", "/api/v1/health"):
        app.add_api_route(path, health, methods=["GET"])
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
    try:
        app = create_app(settings, factories)
    except ConfigError as exc:  # the key file is read here
        sys.stderr.write(f"llmservice: configuration error: {exc}\n")
        return 2
    return lifecycle.serve(app, settings)


if __name__ == "__main__":
    sys.exit(main())
