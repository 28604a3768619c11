"""The whole middleware stack, added in one call so that its order is stated once.

Outermost first (Starlette runs the middleware added last outermost, so `install` adds bottom-up):

    RequestContext   request id, access log, request metrics; the last-resort 500 envelope
    HeaderLimit      431 for too many or too large headers (uvicorn's h11 checks only incomplete heads)
    ActivityTracker  in flight until the last byte (idle shutdown); 503 while draining
    HostAllowlist    DNS-rebinding guard
    EnvelopeCORS     when CORS_ORIGINS is set; outside auth so preflights and 401s carry CORS headers
    BearerAuth       when API_KEYS or API_KEYS_FILE is set: 401 without a valid key, 403 on admin
                     routes without an admin key
    RateLimit        for keys with limits: 429 over rpm, tpm or max_parallel; x-ratelimit-* headers
    BodyLimit        413 before a route reads an oversize body (MAX_AUDIO_BYTES on the audio routes)
    (FastAPI's exception handlers, then the routes)

RequestContext is outermost so that every refusal below it is logged and counted with its id.
"""

from __future__ import annotations

from starlette.applications import Starlette

from config import Settings
from middleware.activity import Activity, ActivityTracker
from middleware.body_limit import BodyLimit
from middleware.connection import HeaderLimit
from middleware.keys import KeyStore
from middleware.limits import Limiter, LocalLimiter, RateLimit
from middleware.request_context import RequestContext
from middleware.request_info import RequestObserver
from middleware.security import BearerAuth, EnvelopeCORS, HostAllowlist, cors_options


def install(
    app: Starlette,
    settings: Settings,
    activity: Activity,
    metrics: RequestObserver | None,
    keys: KeyStore | None = None,
    limiter: Limiter | None = None,
) -> None:
    """Add every middleware to `app`, innermost first. `keys` defaults to API_KEYS alone."""
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, max_audio_bytes=settings.max_audio_bytes)
    keys = keys if keys is not None else KeyStore(settings.api_keys)
    if keys.enabled:
        app.add_middleware(RateLimit, limiter=limiter if limiter is not None else LocalLimiter())
        app.add_middleware(BearerAuth, keys=keys)
    if settings.cors_origins:
        app.add_middleware(EnvelopeCORS, **cors_options(settings.cors_origins))
    app.add_middleware(HostAllowlist, allowed=(*settings.allowed_hosts, settings.host))
    app.add_middleware(ActivityTracker, activity=activity)
    app.add_middleware(HeaderLimit)
    app.add_middleware(RequestContext, metrics=metrics)
