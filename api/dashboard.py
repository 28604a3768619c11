"""`GET /admin`: the one-page admin dashboard (static/admin.html, vanilla JS, no build step).

The page is static; the server adds one JSON block saying which of our APIs exist (so the page
never probes missing routes) and whether a key is needed, and a Content-Security-Policy that lets
the page's own inline script and style run (by hash) and talk to this origin only.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse

from api.state import app_state
from config import TIERS

log = logging.getLogger("llmservice.dashboard")
PAGE = Path(__file__).resolve().parent.parent / "static" / "admin.html"
FEATURES_MARK = "/*FEATURES*/{}"
# Routes the page uses when present; the admin and RAG routes come from other modules.
PROBED = (
    "/admin/status",
    "/admin/tiers/{tier}/load",
    "/admin/tiers/{tier}/unload",
    "/admin/cache",
    "/metrics",
    "/admin/models",
    "/admin/tiers/{tier}/model",
    "/admin/metrics/summary",
)
PROBED_V1 = ("/v1/chat/completions", "/v1/embeddings", "/v1/rerank", "/v1/audio/transcriptions")

router = APIRouter()


def _digest(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


@functools.lru_cache(maxsize=1)
def _page() -> tuple[str, str]:
    """The page's HTML and its Content-Security-Policy (hashes of the inline script and style)."""
    html = PAGE.read_text(encoding="utf-8")
    scripts = re.findall(r"<script>(.*?)</script>", html, flags=re.S)
    styles = re.findall(r"<style>(.*?)</style>", html, flags=re.S)
    csp = "; ".join(
        [
            "default-src 'none'",
            "script-src " + " ".join(_digest(s) for s in scripts),
            "style-src " + " ".join(_digest(s) for s in styles),
            "connect-src 'self'",
            "img-src data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return html, csp


def features(request: Request) -> dict[str, Any]:
    # Routers included with a prefix do not list their paths in app.routes; the schema has them all.
    try:
        paths = {*request.app.openapi().get("paths", {}), "/metrics"}
    except Exception:  # noqa: BLE001 - a schema problem must not take the dashboard down
        log.exception("could not build the OpenAPI schema; the dashboard assumes chat only")
        paths = {"/metrics", "/v1/chat/completions"}
    settings = app_state(request).settings
    keyed = settings.keys_configured
    return {
        "routes": [p for p in (*PROBED, *PROBED_V1) if p in paths],
        "auth_required": keyed,
        # The page is public; with keys, the configured tiers are shown only once a key works.
        "tiers": [] if keyed else list(settings.tiers),
        "all_tiers": list(TIERS),  # a swap may turn on a tier .env leaves off
    }


@router.get("/admin", include_in_schema=False)
async def admin_page(request: Request) -> HTMLResponse:
    html, csp = _page()
    # The JSON block is data (type="application/json"), never executed; "</" is escaped so it cannot end it.
    blob = json.dumps(features(request)).replace("</", "<\\/")
    return HTMLResponse(
        html.replace(FEATURES_MARK, blob),
        headers={
            "Content-Security-Policy": csp,
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        },
    )
