"""Exposure controls: bearer API keys (middleware/keys.py), a Host-header allowlist (DNS rebinding) and CORS.

`middleware.stack.install` adds them in this order, outermost first: Host allowlist, CORS, auth. CORS
sits outside auth so that preflights (which never carry credentials) are answered, and so that a
401 still carries the CORS headers a browser needs to read it. Refusing a non-loopback `HOST`
without keys happens earlier, in `config.load_settings`.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
from collections.abc import Iterable
from typing import Any

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from core.errors import Forbidden, InvalidRequest, ServiceError, Unauthorized
from middleware import request_context
from middleware.envelope import error_response, send_error
from middleware.keys import SCOPE_KEY, ApiKey, KeyStore

# Paths served without a key: the health probes (with Ollama's "/", which answers "Ollama is running"),
# and the dashboard's static page (a browser cannot attach a bearer header to a navigation; the page
# itself asks for the key and sends it on every call).
PUBLIC_PATHS = frozenset({"/", "/health", "/api/v1/health", "/admin"})
# Paths that need a key with `admin = true` (API_KEYS keys are admins): the admin API under both of
# its prefixes, and the metrics, which show every key's usage.
ADMIN_PREFIXES = ("/admin/", "/api/admin/")
ADMIN_PATHS = frozenset({"/metrics"})
# Set in the scope when the request carried a valid key: a public path may then show more (/health's tiers).
AUTHENTICATED = "llmservice.authenticated"
LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
# A browser sends only the request headers listed here, and lets a page read only the response headers
# listed below (besides the CORS-safelisted ones): sessions (api/sessions.py) need both ways.
CORS_ALLOW_HEADERS = ("Authorization", "Content-Type", "X-Request-Id", "Cache-Control", "X-Session-ID")
CORS_EXPOSE_HEADERS = (
    "X-Request-Id",
    "X-Tier",
    "X-Tier-Fallback",
    "X-Cache",
    "X-Session-ID",
    "X-Session-Trimmed",
    "Retry-After",
    *(f"x-ratelimit-{what}-{kind}" for what in ("limit", "remaining", "reset") for kind in ("requests", "tokens")),
)


class HostNotAllowed(InvalidRequest):
    code = "host_not_allowed"


# ---------------------------------------------------------------- API keys


def key_matches(presented: str, keys: Iterable[str]) -> bool:
    """Constant-time comparison against every configured key (no early exit on a match)."""
    # Hashing first makes both sides the same length, so not even the key's length leaks.
    candidate = hashlib.sha256(presented.encode()).digest()
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate, hashlib.sha256(key.encode()).digest())
    return matched


def _bearer(headers: Headers) -> str | None:
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else ""


def is_authenticated(scope: Scope) -> bool:
    """Whether BearerAuth found a valid key on this request (never true without keys)."""
    return scope.get(AUTHENTICATED) is True


def is_admin_path(path: str) -> bool:
    return path in ADMIN_PATHS or path.startswith(ADMIN_PREFIXES)


def _admit(scope: Scope, key: ApiKey) -> None:
    scope[AUTHENTICATED] = True
    scope[SCOPE_KEY] = key
    request_context.note_key(key.name, key.tiers)


class BearerAuth:
    """`Authorization: Bearer <key>` on everything but PUBLIC_PATHS, when keys are configured.

    On a public path a key is optional: a valid one is noted in the scope, a wrong one is ignored. A
    valid key is put in the scope (`keys.SCOPE_KEY`, for the rate limits) and its name and tiers in
    the request's info (access log, metrics, tier checks).
    """

    def __init__(self, app: ASGIApp, keys: KeyStore) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        token = _bearer(Headers(scope=scope))
        key = self.keys.lookup(token) if token else None
        if scope["path"] in PUBLIC_PATHS:
            if key is not None:
                _admit(scope, key)
            await self.app(scope, receive, send)
            return
        if token is None:
            error: ServiceError = Unauthorized(
                "You didn't provide an API key. Send it as 'Authorization: Bearer <key>'.",
                headers={"WWW-Authenticate": 'Bearer realm="llmservice"'},
            )
        elif key is None:
            error = Unauthorized(
                "Incorrect API key provided.",
                headers={"WWW-Authenticate": 'Bearer realm="llmservice", error="invalid_token"'},
            )
        elif not key.admin and is_admin_path(scope["path"]):
            error = Forbidden(f"The key {key.name!r} may not use admin routes (it needs admin = true)")
        else:
            _admit(scope, key)
            await self.app(scope, receive, send)
            return
        await send_error(error, scope, receive, send)


# ---------------------------------------------------------------- Host allowlist


def is_loopback_host(host: str) -> bool:
    name = host.strip().strip("[]").lower().rstrip(".")
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The name part of a Host header: no port, no IPv6 brackets, lower case, no trailing dot."""
    value = header.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value[1:]
    return value.rsplit(":", 1)[0].rstrip(".") if value.count(":") == 1 else value.rstrip(".")


def host_allowed(header: str, allowed: tuple[str, ...]) -> bool:
    """Loopback names, IP literals (a rebinding attack needs a DNS name) and ALLOWED_HOSTS entries.

    An entry "*.example.com" admits subdomains; "*" admits everything (turns the check off).
    """
    name = host_name(header)
    if not name or is_loopback_host(name):
        return True
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    for entry in allowed:
        entry = entry.lower().rstrip(".")
        if entry == "*" or entry == name or (entry.startswith("*.") and name.endswith(entry[1:])):
            return True
    return False


class HostAllowlist:
    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]) -> None:
        self.app = app
        self.allowed = allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = Headers(scope=scope).get("host", "")
            if not host_allowed(header, self.allowed):
                shown = json.dumps(host_name(header)[:100])
                await send_error(
                    HostNotAllowed(f"Host {shown} is not allowed; add it to ALLOWED_HOSTS", param="Host"),
                    scope,
                    receive,
                    send,
                )
                return
        await self.app(scope, receive, send)


# ---------------------------------------------------------------- CORS


class EnvelopeCORS(CORSMiddleware):
    """Starlette's CORS, with refused preflights answered in the OpenAI error envelope."""

    def preflight_response(self, request_headers: Headers) -> Response:
        response = super().preflight_response(request_headers)
        if response.status_code < 400:
            return response
        error = InvalidRequest(response.body.decode(errors="replace"), param="Origin")
        error.code = "cors_rejected"
        headers = {k: v for k, v in response.headers.items() if k.lower() not in ("content-length", "content-type")}
        return error_response(error, extra_headers=headers)


def cors_options(origins: tuple[str, ...]) -> dict[str, Any]:
    allow_all = "*" in origins
    return {
        "allow_origins": list(origins),
        "allow_methods": ["GET", "POST", "DELETE", "OPTIONS"],
        "allow_headers": list(CORS_ALLOW_HEADERS),
        # Credentials only with an explicit list: the browser then gets the exact origin echoed, never "*".
        "allow_credentials": not allow_all,
        "allow_private_network": not allow_all,
        "expose_headers": list(CORS_EXPOSE_HEADERS),
    }
