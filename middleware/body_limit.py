"""Refuse request bodies over `MAX_BODY_BYTES` with a 413 before a route reads them; the audio routes
(uploads of recordings) have their own, larger `MAX_AUDIO_BYTES` (25 MiB, OpenAI's)."""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from core.errors import PayloadTooLarge
from middleware.envelope import send_error

# Under every prefix the routes are mounted at ("/v1", "", "/api/v1").
AUDIO_ROUTES = ("/audio/transcriptions", "/audio/translations")


class BodyLimit:
    """Checks Content-Length up front, and counts the bytes of chunked bodies as they arrive."""

    def __init__(self, app: ASGIApp, max_bytes: int, max_audio_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_audio_bytes = max_bytes if max_audio_bytes is None else max_audio_bytes

    def _limit(self, path: str) -> tuple[int, str]:
        if path.rstrip("/").endswith(AUDIO_ROUTES):
            return self.max_audio_bytes, "MAX_AUDIO_BYTES"
        return self.max_bytes, "MAX_BODY_BYTES"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes, key = self._limit(str(scope.get("path", "")))
        too_large = PayloadTooLarge(f"The request body is larger than {max_bytes} bytes ({key})")
        for name, value in scope.get("headers", ()):
            if name == b"content-length" and value.isdigit() and int(value) > max_bytes:
                await send_error(too_large, scope, receive, send)
                return
        seen = 0
        answered = started = False

        async def limited_receive() -> Message:
            nonlocal seen, answered
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    # Answer here, not where the exception lands: FastAPI turns any exception raised
                    # while it reads a body into its own 400, which `guarded_send` then drops.
                    if not started:
                        answered = True
                        await send_error(too_large, scope, receive, send)
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if answered:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass  # answered already, or too late to (a response had started): uvicorn closes the connection


class _BodyTooLarge(Exception):
    pass
