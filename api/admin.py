"""Admin API: tier status, load and unload on demand, response cache statistics and clearing.

GET  /admin/status                   every tier (state, backend, model, memory, in flight, queue,
                                     last use, load time), the memory budget, the cache, draining
POST /admin/tiers/{tier}/load        load now (waits for the load; 503 when it fails)
POST /admin/tiers/{tier}/unload      409 while requests are in flight, unless ?force=true, which
                                     cancels them (streams end with an error event)
GET  /admin/cache, DELETE /admin/cache
Models at run time (downloads, the local list, swapping a tier's model): api/models_admin.py.
Loading and unloading by model id: api/old_servers.py. JSON analytics (/admin/metrics/...): api/admin_metrics.py.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request

from api import admin_metrics, models_admin, old_servers
from api.state import app_state
from core.errors import NotFound
from model_manager import ModelManager

router = APIRouter(prefix="/admin")
router.include_router(models_admin.router)
router.include_router(old_servers.admin_router)  # POST /admin/models/{id}/load, /unload
router.include_router(admin_metrics.router)  # GET /admin/metrics/...


def _manager(request: Request) -> ModelManager:
    return app_state(request).manager


def _tier(request: Request, tier: str) -> str:
    manager = _manager(request)
    name = tier.strip().lower()
    if name not in manager.tiers:
        raise NotFound(f"No configured tier {tier!r}. Configured tiers: {', '.join(manager.tiers)}")
    return name


@router.get("/status")
async def admin_status(request: Request) -> dict[str, Any]:
    state = app_state(request)
    manager, activity = state.manager, state.activity
    return {
        "uptime_seconds": round(time.time() - state.started, 1),
        "draining": activity.draining,
        "requests_in_flight": activity.in_flight,
        "memory": {
            "max_bytes": manager.budget_bytes or None,
            "reserved_bytes": manager.used_bytes,
        },
        "tiers": {name: manager.detailed_status(name) for name in manager.tiers},
        **({"chat_queue": manager.slots.status()} if manager.slots.limit else {}),
        "cache": state.cache.stats(),
    }


@router.post("/tiers/{tier}/load")
async def load_tier(tier: str, request: Request) -> dict[str, Any]:
    name = _tier(request, tier)
    manager = _manager(request)
    await manager.ensure_loaded(name)
    return {"tier": name, **manager.detailed_status(name)}


@router.post("/tiers/{tier}/unload")
async def unload_tier(tier: str, request: Request, force: bool = False) -> dict[str, Any]:
    name = _tier(request, tier)
    manager = _manager(request)
    cancelled = manager.tiers[name].in_flight
    await manager.unload(name, force=force)
    return {"tier": name, "cancelled": cancelled if force else 0, **manager.detailed_status(name)}


@router.get("/cache")
async def cache_stats(request: Request) -> dict[str, Any]:
    return app_state(request).cache.stats()


@router.delete("/cache")
async def clear_cache(request: Request) -> dict[str, Any]:
    cache = app_state(request).cache
    return {**await cache.clear(), **cache.stats()}
