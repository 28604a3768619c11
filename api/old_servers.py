"""The replaced servers' model routes, over the model manager's own load and unload.

A model `{id}` is a tier name, an alias, a tier's model id (`light/qwen2.5-0.5b-instruct-q4_k_m`) or
anything else the router resolves; a name that would fall back to another tier is a 404 here.

POST /api/v1/models/{id}/load       load the tier now (waits for it); the key must be allowed the tier
POST /api/v1/models/{id}/unload     unload once idle: at once when nothing holds it, else when its last
                                    request ends (`"pending": true`); admin keys only when keys are on
GET  /api/v1/models/memory/usage    per tier: loaded, the estimate from its files, the bytes reserved
                                    against MAX_MEMORY_GB, the measured RSS growth; the budget; the RSS
POST /admin/models/{id}/load, /unload   the same for the admin API (also under /api/admin)

The tier list of `GET /admin/models` (`tiers`) comes from `tier_models` here.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request

from api.state import AppState, app_state
from config import Settings
from core import routing
from core.errors import Forbidden, ModelNotFound, WrongModelKind
from manager.memory import rss_bytes
from middleware import request_context
from middleware.keys import SCOPE_KEY, ApiKey

v1_router = APIRouter(prefix="/api/v1/models")
admin_router = APIRouter(prefix="/models")
Json = dict[str, object]
KINDS = ("chat", "embedding", "rerank", "speech")


def tier_of(model_id: str, settings: Settings) -> str:
    """The configured tier `model_id` names (any kind); unknown names are a 404 listing the valid ones."""
    for kind in KINDS:
        try:
            resolution = routing.resolve(model_id, kind, settings)
        except WrongModelKind:
            continue
        if resolution.fallback_from:
            raise ModelNotFound(
                f"The model {model_id!r} maps to the {resolution.fallback_from} tier, which is not configured. "
                f"Configured tiers: {', '.join(settings.tiers)}",
                param="model",
            )
        return resolution.tier
    raise ModelNotFound(f"The model {model_id!r} does not exist", param="model")  # every kind said "wrong kind"


def tier_models(state: AppState) -> list[Json]:
    """Each configured tier's model and whether it is loaded (the old admin API's model list)."""
    out: list[Json] = []
    for name, tier in state.settings.tiers.items():
        status = state.manager.status(name)
        out.append(
            {
                "id": tier.model_id,
                "tier": name,
                "kind": routing.KIND_OF_TIER[name],
                "backend": tier.backend,
                "aliases": list(tier.aliases),
                "state": status["state"],
                "loaded": status["state"] == "ready",
            }
        )
    return out


async def _load(state: AppState, model_id: str, tier: str) -> Json:
    await state.manager.ensure_loaded(tier)
    return {"id": model_id, "tier": tier, "loaded": True, **state.manager.detailed_status(tier)}


async def _unload(state: AppState, model_id: str, tier: str) -> Json:
    now = await state.manager.release(tier)
    status = state.manager.detailed_status(tier)
    return {"id": model_id, "tier": tier, "loaded": status["state"] == "ready", "pending": not now, **status}


# ---------------------------------------------------------------- /api/v1/models


@v1_router.get("/memory/usage")
async def memory_usage(request: Request) -> Json:
    state = app_state(request)
    manager = state.manager
    names = [name for name in manager.tiers if request_context.tier_allowed(name)]
    # Estimates stat the model files (a folder's every file): off the event loop.
    estimates = await asyncio.to_thread(lambda: {n: manager.estimator(manager.tiers[n].config) for n in names})
    tiers: Json = {}
    for name in names:
        rt = manager.tiers[name]
        tiers[name] = {
            "model": rt.config.model_id,
            "state": rt.state,
            "loaded": rt.state == "ready",
            "estimated_bytes": estimates[name] or None,  # from the model's files; None when unknown (remote)
            "reserved_bytes": rt.reserved_bytes,  # counted against MAX_MEMORY_GB now (0 when unloaded)
            "rss_delta_bytes": rt.rss_delta_bytes,  # the process's growth measured around the load
        }
    budget = manager.budget_bytes or None
    return {
        "budget": {
            "max_bytes": budget,
            "used_bytes": manager.used_bytes,
            "free_bytes": max(0, budget - manager.used_bytes) if budget else None,
        },
        "process": {"rss_bytes": rss_bytes()},
        "tiers": tiers,
    }


@v1_router.post("/{model_id:path}/load")
async def load_model(model_id: str, request: Request) -> Json:
    state = app_state(request)
    tier = tier_of(model_id, state.settings)
    request_context.note_tier(tier)  # 403 for a key restricted to other tiers
    return await _load(state, model_id, tier)


@v1_router.post("/{model_id:path}/unload")
async def unload_model(model_id: str, request: Request) -> Json:
    state = app_state(request)
    tier = tier_of(model_id, state.settings)
    request_context.note_tier(tier)
    key: ApiKey | None = request.scope.get(SCOPE_KEY)
    if key is not None and not key.admin:  # an unload slows every other service using the tier
        raise Forbidden(f"The key {key.name!r} may not unload models (it needs admin = true)")
    return await _unload(state, model_id, tier)


# ---------------------------------------------------------------- /admin/models (admin keys only, by middleware)


@admin_router.post("/{model_id:path}/load")
async def admin_load_model(model_id: str, request: Request) -> Json:
    state = app_state(request)
    return await _load(state, model_id, tier_of(model_id, state.settings))


@admin_router.post("/{model_id:path}/unload")
async def admin_unload_model(model_id: str, request: Request) -> Json:
    state = app_state(request)
    return await _unload(state, model_id, tier_of(model_id, state.settings))
