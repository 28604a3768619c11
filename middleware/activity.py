"""Request activity: what idle shutdown and the drain wait on.

`ActivityTracker` counts every HTTP request until its response's last byte, stamps the last activity
(monitoring reads excepted) and, once the process drains, refuses new requests with 503.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from core.errors import ShuttingDown
from middleware.envelope import send_error

# Reads by monitors (health checks, scrapers, the dashboard) do not count as activity for the idle
# shutdown: a supervisor polling /health must not keep an unused server alive forever.
MONITORING_PATHS = frozenset(
    {"/health", "/api/v1/health", "/metrics", "/admin", "/admin/status", "/admin/cache", "/api/admin/status"}
)


class Activity:
    """Requests in flight (counted until the response's last byte), last activity, draining flag."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.in_flight = 0
        self.last_activity = clock()
        self.draining = False
        self._idle: asyncio.Event | None = None

    def _idle_event(self) -> asyncio.Event:
        if self._idle is None:
            self._idle = asyncio.Event()
            if self.in_flight == 0:
                self._idle.set()
        return self._idle

    def begin(self, active: bool = True) -> None:
        """A request starts; `active=False` (a monitoring read) leaves the idle clock alone."""
        self.in_flight += 1
        if active:
            self.last_activity = self.clock()
        self._idle_event().clear()

    def end(self, active: bool = True) -> None:
        self.in_flight -= 1
        if active:
            self.last_activity = self.clock()
        if self.in_flight == 0:
            self._idle_event().set()

    async def wait_idle(self, timeout: float) -> bool:
        """True when nothing is in flight within `timeout` seconds."""
        try:
            await asyncio.wait_for(self._idle_event().wait(), timeout)
        except TimeoutError:
            return False
        return True


class ActivityTracker:
    """ASGI middleware: counts HTTP requests in flight; answers 503 to new ones while draining."""

    def __init__(self, app: ASGIApp, activity: Activity) -> None:
        self.app = app
        self.activity = activity

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.activity.draining:
            refused = ShuttingDown("The server is shutting down", retry_after=5)
            # Close the connection too: a keep-alive client would otherwise retry on a socket about to go.
            await send_error(refused, scope, receive, send, extra_headers={"Connection": "close"})
            return
        active = not (scope.get("method") == "GET" and scope.get("path") in MONITORING_PATHS)
        self.activity.begin(active)
        try:
            await self.app(scope, receive, send)
        finally:
            self.activity.end(active)
