"""JSON analytics of the admin API (mounted by api/admin.py under /admin and /api/admin).

GET /admin/metrics/summary                      every window (minute, hour, day): total, per tier, per key
GET /admin/metrics/requests?window=hour         requests, errors, requests/s      + a time series
GET /admin/metrics/tokens?window=hour           prompt, completion, total, tokens/s (generation speed)
GET /admin/metrics/latency?window=hour          latency p50, p95, mean in ms

Counted by ops/analytics.py: API requests only (not the admin API, /metrics or health probes), by the
tier that served them and the API key's name (never the secret).
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from api.state import app_state
from core.errors import InvalidRequest
from ops.analytics import SERIES_STEP, TOTAL, WINDOWS, Analytics, Tally, split

router = APIRouter(prefix="/metrics")

ALL_FIELDS: tuple[str, ...] = ()  # as_json whole
REQUEST_FIELDS = ("requests", "errors", "requests_per_second")
TOKEN_FIELDS = ("requests", "prompt_tokens", "completion_tokens", "total_tokens", "tokens_per_second")
LATENCY_FIELDS = ("requests", "latency_ms")
Json = dict[str, object]


def _analytics(request: Request) -> Analytics:
    return app_state(request).metrics.analytics


def _stats(tally: Tally, seconds: float, fields: tuple[str, ...]) -> Json:
    stats = tally.as_json(seconds)
    return {name: stats[name] for name in fields} if fields else stats


def _parts(analytics: Analytics, window: str, fields: tuple[str, ...]) -> dict[str, Json]:
    """{"total": stats, "tiers": {name: stats}, "keys": {name: stats}} over the window."""
    seconds = WINDOWS[window]
    total, tiers, keys = split(analytics.window(window))
    return {
        "total": _stats(total, seconds, fields),
        "tiers": {name: _stats(t, seconds, fields) for name, t in tiers.items()},
        "keys": {name: _stats(t, seconds, fields) for name, t in keys.items()},
    }


def _view(request: Request, window: str, fields: tuple[str, ...]) -> Json:
    if window not in WINDOWS:
        raise InvalidRequest(f"window {window!r}: one of {', '.join(WINDOWS)}", param="window")
    analytics, step = _analytics(request), SERIES_STEP[window]
    series = [
        {"start": start, **_stats(tallies.get(TOTAL, Tally()), step, fields)}
        for start, tallies in analytics.series(window)
    ]
    head: Json = {"window": window, "seconds": WINDOWS[window], "step_seconds": step}
    return {**head, **_parts(analytics, window, fields), "series": series}


@router.get("/summary")
async def summary(request: Request) -> Json:
    """Each part by window: {"total": {"minute": stats, ...}, "tiers": {name: {"minute": stats, ...}}, ...}."""
    analytics = _analytics(request)
    out: dict[str, dict[str, Json]] = {"total": {}, "tiers": {}, "keys": {}}
    for window in WINDOWS:
        parts = _parts(analytics, window, ALL_FIELDS)
        out["total"][window] = parts["total"]
        for part in ("tiers", "keys"):
            for name, stats in parts[part].items():
                entry = out[part].setdefault(name, {})
                entry[window] = stats
    return {"windows": dict(WINDOWS), **out}


@router.get("/requests")
async def requests(request: Request, window: str = "hour") -> Json:
    return _view(request, window, REQUEST_FIELDS)


@router.get("/tokens")
async def tokens(request: Request, window: str = "hour") -> Json:
    return _view(request, window, TOKEN_FIELDS)


@router.get("/latency")
async def latency(request: Request, window: str = "hour") -> Json:
    return _view(request, window, LATENCY_FIELDS)
