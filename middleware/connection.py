"""The connection under the ASGI stack: a deadline and a size limit for each request's head.

uvicorn's h11 protocol times out only idle keep-alive connections, so a client that sends a head a
byte at a time (slowloris), or opens a socket and sends nothing, holds it forever. `HeadGuard` gives
every head `HEADER_TIMEOUT` seconds, counted from the connection opening or from the head's first
byte, then answers 408 and closes (or just closes, when nothing came). It also answers h11's own
refusals (a malformed head; a head still incomplete past MAX_HEADER_BYTES) in the OpenAI envelope
instead of uvicorn's plain-text 400. Once a head is complete the deadline is off: a request may take
as long as it needs.

h11 measures a head only while it is incomplete, so one that arrives whole in a single read passes
whatever its size; `HeaderLimit` checks the parsed head (its size and its number of headers) again,
inside the ASGI stack where the refusal is logged with a request id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from http import HTTPStatus
from typing import ClassVar

import h11
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from core.errors import InvalidRequest, ServiceError
from middleware.envelope import send_error

log = logging.getLogger("llmservice.connection")

MAX_HEADER_BYTES = 32 * 1024  # request line plus headers (nginx allows 32 KiB, Node.js 16 KiB)
MAX_HEADERS = 100  # Apache's LimitRequestFields; SDKs and browsers send about 20


class HeadersTooLarge(InvalidRequest):
    status = 431
    code = "headers_too_large"


class HeaderTimeout(InvalidRequest):
    status = 408
    code = "header_timeout"


class MalformedRequest(InvalidRequest):
    code = "invalid_http_request"


def _too_large(max_count: int = MAX_HEADERS, max_bytes: int = MAX_HEADER_BYTES) -> HeadersTooLarge:
    return HeadersTooLarge(
        f"The request's headers are too large: at most {max_count} headers and {max_bytes} bytes with the request line"
    )


def _raw_response(error: ServiceError) -> bytes:
    """`error` as a whole HTTP/1.1 response that closes the connection, written past h11's state machine."""
    body = json.dumps(error.body()).encode()
    head = (
        f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}\r\n"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("latin-1") + body


class HeadGuard(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request's head, and refusals in the envelope."""

    header_timeout: ClassVar[float] = 10.0
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)
        self._follow_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _follow_head(self) -> None:
        """Arm the deadline while h11 waits for a head; disarm it once the head is in.

        h11 keeps the client's state IDLE until a request's head is complete. The first head's deadline
        runs from the connection opening; a later one's from its first byte (before it, the connection
        is idle between requests, which uvicorn's keep-alive timeout bounds).
        """
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)
        elif not waiting:
            self._disarm()

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:  # part of a head came: tell the client why it is cut off
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "-"
            log.info("closing %s: request head not complete after %gs", client, self.header_timeout)
            error = HeaderTimeout(f"The request's headers were not complete within {self.header_timeout:g} seconds")
            self.transport.write(_raw_response(error))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this inside its `except h11.RemoteProtocolError`, so h11's error, with its
        # status hint (431 for a head over the buffer limit), is the exception being handled.
        exc = sys.exception()
        status = exc.error_status_hint if isinstance(exc, h11.RemoteProtocolError) else 400
        error = _too_large() if status == 431 else MalformedRequest("The request is not valid HTTP/1.1")
        self._disarm()
        self.transport.write(_raw_response(error))
        self.transport.close()


def head_guard(header_timeout: float) -> type[HeadGuard]:
    """The protocol class for one server, with its `HEADER_TIMEOUT`."""

    class ConfiguredHeadGuard(HeadGuard):
        pass

    ConfiguredHeadGuard.header_timeout = header_timeout
    return ConfiguredHeadGuard


class HeaderLimit:
    """431 for a parsed head with more than MAX_HEADERS headers or over MAX_HEADER_BYTES."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_HEADER_BYTES, max_count: int = MAX_HEADERS) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_count = max_count

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            headers = scope.get("headers", ())
            # As on the wire: "name: value\r\n" per header, and the request target.
            size = len(scope.get("raw_path", b"")) + len(scope.get("query_string", b""))
            size += sum(len(name) + len(value) + 4 for name, value in headers)
            if len(headers) > self.max_count or size > self.max_bytes:
                await send_error(_too_large(self.max_count, self.max_bytes), scope, receive, send)
                return
        await self.app(scope, receive, send)
