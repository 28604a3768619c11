"""The application's state, typed: what every route reads from `app.state.llm` through `app_state`.

Middleware gets what it needs when it is added, and ops reads `app.state.llm` itself, so neither
imports this module (it imports them).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.requests import Request

from cache import ResponseCache
from config import Settings
from middleware.activity import Activity
from model_manager import ModelManager
from models_admin.downloads import Downloads
from ops.metrics import Metrics
from sessions.conversations import Conversations


@dataclass
class AppState:
    env_settings: Settings  # as read at start-up; `settings` has the tier changes made since (admin API)
    manager: ModelManager
    cache: ResponseCache
    activity: Activity
    metrics: Metrics
    started: float  # time.time() when the app was built (`created` of /v1/models, uptime)
    conversations: Conversations  # sessions and stored responses
    extras: dict[str, object] = field(default_factory=dict)  # room for tests' stand-ins
    downloads: Downloads = field(init=False)  # hub downloads into MODELS_DIR (admin API)

    def __post_init__(self) -> None:
        self.downloads = Downloads(self.env_settings)

    @property
    def settings(self) -> Settings:
        """The settings in force: the manager's, which a swap replaces at once for every route."""
        return self.manager.settings


def app_state(request: Request) -> AppState:
    state: AppState = request.app.state.llm
    return state
