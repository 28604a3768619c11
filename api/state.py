"""The application's state, typed: what every route and middleware may read from `app.state.llm`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.requests import Request

from cache import ResponseCache
from config import Settings
from model_manager import ModelManager

if TYPE_CHECKING:
    from ops.lifecycle import Activity
    from ops.metrics import Metrics


@dataclass
class AppState:
    settings: Settings
    manager: ModelManager
    cache: ResponseCache
    activity: Activity
    metrics: Metrics
    started: float  # time.time() when the app was built (`created` of /v1/models, uptime)
    extras: dict[str, object] = field(default_factory=dict)  # room for tests' stand-ins


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.llm
    return state
