"""Admin API for models at run time (mounted by api/admin.py under /admin and /api/admin).

POST   /admin/models/download               {repo_id, revision, filename | allow_patterns} -> a job (202)
GET    /admin/models/downloads              every job; /{id} one job; /{id}/events its progress as SSE
DELETE /admin/models/downloads/{id}         cancel a queued or running job
GET    /admin/models                        local models in MODELS_DIR: size, format, backend, used by;
                                            and `tiers`: each tier's model, loaded or not
DELETE /admin/models/{name}                 remove one no tier uses
POST   /admin/tiers/{tier}/model            swap the tier's model: {model_path | download_id, <tier setting>: ...}
DELETE /admin/tiers/{tier}/model            back to the tier's .env settings
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from api.old_servers import tier_models
from api.sse import SSE_HEADERS
from api.state import AppState, app_state
from config import TIERS, render_value
from core.errors import Conflict, InvalidRequest, NotFound
from models_admin import local_models
from models_admin.downloads import DONE, FINISHED, DownloadJob, DownloadRequest

router = APIRouter()
_POLL_S = 0.25  # how often the progress stream looks for news

Pattern = Annotated[str, Field(min_length=1, max_length=200)]
SettingValue = str | int | float | bool | list[str] | None


class DownloadBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    repo_id: str = Field(min_length=1, max_length=200)
    revision: str = Field("main", min_length=1, max_length=200)
    filename: str | None = Field(None, min_length=1, max_length=1000)
    allow_patterns: list[Pattern] | None = Field(None, min_length=1, max_length=64)


class TierModelBody(BaseModel):
    """`model_path` (a path, a URL, or a model's name in MODELS_DIR; "" turns the tier off) or
    `download_id` (a finished download); any other field is a tier setting (n_ctx, parallel, ...)."""

    model_config = ConfigDict(extra="allow")
    model_path: str | None = Field(None, max_length=4096)
    download_id: str | None = Field(None, max_length=64)


# ---------------------------------------------------------------- downloads


@router.post("/models/download", status_code=202)
async def start_download(body: DownloadBody, request: Request) -> dict[str, object]:
    job = app_state(request).downloads.start(
        DownloadRequest(body.repo_id, body.revision, body.filename, tuple(body.allow_patterns or ()))
    )
    return job.snapshot()


@router.get("/models/downloads")
async def list_downloads(request: Request) -> dict[str, object]:
    return {"data": [job.snapshot() for job in app_state(request).downloads.jobs.values()]}


@router.get("/models/downloads/{job_id}")
async def get_download(job_id: str, request: Request) -> dict[str, object]:
    return app_state(request).downloads.get(job_id).snapshot()


@router.get("/models/downloads/{job_id}/events")
async def download_events(job_id: str, request: Request) -> StreamingResponse:
    job = app_state(request).downloads.get(job_id)
    return StreamingResponse(_progress(job), media_type="text/event-stream", headers=SSE_HEADERS)


async def _progress(job: DownloadJob) -> AsyncIterator[bytes]:
    """One event per change (at most every _POLL_S), the last one in a finished state."""
    seen = -1
    while True:
        finished, version = job.state in FINISHED, job.version
        if version != seen:
            seen = version
            yield f"data: {json.dumps(job.snapshot())}\n\n".encode()
        if finished:
            return
        await asyncio.sleep(_POLL_S)


@router.delete("/models/downloads/{job_id}", status_code=202)
async def cancel_download(job_id: str, request: Request) -> dict[str, object]:
    return {**app_state(request).downloads.cancel(job_id).snapshot(), "cancelling": True}


# ---------------------------------------------------------------- local models


@router.get("/models")
async def list_local_models(request: Request) -> dict[str, object]:
    state = app_state(request)
    models_dir = Path(state.env_settings.models_dir)
    found = await asyncio.to_thread(local_models.list_models, models_dir)
    free = await asyncio.to_thread(_free_bytes, models_dir)
    tiers = state.settings.tiers
    return {
        "models_dir": str(models_dir.absolute()),
        "free_bytes": free,
        "data": [model.as_json(local_models.used_by(model, tiers)) for model in found],
        "tiers": tier_models(state),  # the configured tiers' models, loaded or not (api/old_servers.py)
    }


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder if folder.exists() else Path.cwd()).free
    except OSError:
        return None


@router.delete("/models/{name:path}")
async def delete_local_model(name: str, request: Request) -> dict[str, object]:
    state = app_state(request)
    models_dir, busy = Path(state.env_settings.models_dir), state.downloads.busy_folders()
    model = await asyncio.to_thread(local_models.remove, models_dir, name, state.settings.tiers, busy)
    return {"deleted": model.name, "size_bytes": model.size_bytes}


# ---------------------------------------------------------------- swapping a tier's model


@router.post("/tiers/{tier}/model")
async def swap_tier_model(tier: str, body: TierModelBody, request: Request) -> JSONResponse:
    state, name = app_state(request), _tier_name(tier)
    changes = {key: render_value(_setting(key, value)) for key, value in (body.model_extra or {}).items()}
    path = await _model_path(state, body)
    merged = dict(state.manager.overrides.get(name, {}))
    if path is not None:
        changes["model_path"] = path
        if "backend" not in changes:
            merged.pop("backend", None)  # inferred again for the new model
    if not changes:
        raise InvalidRequest("Give model_path, download_id or a tier setting to change")
    started = time.perf_counter()
    await state.manager.change_tier(name, {**merged, **changes})
    return _tier_answer(state, name, started)


@router.delete("/tiers/{tier}/model")
async def reset_tier_model(tier: str, request: Request) -> JSONResponse:
    state, name = app_state(request), _tier_name(tier)
    started = time.perf_counter()
    await state.manager.change_tier(name, None)
    return _tier_answer(state, name, started)


def _tier_name(tier: str) -> str:
    name = tier.strip().lower()
    if name not in TIERS:
        raise NotFound(f"No tier {tier!r}. Tiers: {', '.join(TIERS)}")
    return name


def _setting(key: str, value: Any) -> SettingValue:
    if isinstance(value, dict) or (isinstance(value, list) and not all(isinstance(v, str) for v in value)):
        raise InvalidRequest(f"The tier setting {key!r} takes a string, a number, a boolean or a list of strings")
    setting: SettingValue = value
    return setting


async def _model_path(state: AppState, body: TierModelBody) -> str | None:
    """The model the body names, as a tier's MODEL_PATH (None: it names none)."""
    if body.download_id is not None:
        if body.model_path is not None:
            raise InvalidRequest("Give model_path or download_id, not both", param="download_id")
        job = state.downloads.get(body.download_id)
        if job.state != DONE:
            raise Conflict(f"The download {job.id} is {job.state}, not done")
        return job.path
    path = body.model_path
    if path is None or path == "" or path.startswith(("/", "~", "package:", "http://", "https://")):
        return path
    models_dir = Path(state.env_settings.models_dir)
    model = await asyncio.to_thread(local_models.find, models_dir, path)  # a name from GET /admin/models
    return model.path


def _tier_answer(state: AppState, tier: str, started: float) -> JSONResponse:
    seconds = round(time.perf_counter() - started, 3)
    if tier not in state.manager.tiers:
        return JSONResponse({"tier": tier, "state": "off", "seconds": seconds})
    return JSONResponse({"tier": tier, "seconds": seconds, **state.manager.detailed_status(tier)})
