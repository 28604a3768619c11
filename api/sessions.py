"""Routes for /v1/sessions (also under /api/v1, the old server's prefix), and a chat request's session.

A session is a conversation the server keeps (sessions/conversations.py). A chat request that names
one (`session_id` in the body, or the `X-Session-ID` header) sends only its new messages: the stored
history goes in front, and the reply is stored once it is complete. With API keys, a key sees only the
sessions (and stored responses) it made: another key's id is a 404, as an unknown one is.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from api.schemas import MAX_ID_LENGTH, ChatCompletionRequest, ChatMessage, SessionCreateRequest
from api.sse import disconnected
from api.state import app_state
from core.errors import ClientGone, InvalidRequest
from core.turns import JsonObject, JsonValue, Message, Turn
from middleware.security import is_authenticated
from sessions import history
from sessions.conversations import Conversations, Started
from sessions.store import Record

router = APIRouter()

SESSION_HEADER = "X-Session-ID"
TRIMMED_HEADER = "X-Session-Trimmed"  # history messages the tier's context could not hold (dropped for good)
ChatStarter = Callable[[ChatCompletionRequest], Awaitable[Turn]]


def conversations(request: Request) -> Conversations:
    return app_state(request).conversations


def owner_of(request: Request) -> str:
    """Whose records a request sees: a digest of its API key ("" when the server has no keys)."""
    if not is_authenticated(request.scope):
        return ""
    token = request.headers.get("authorization", "").strip().partition(" ")[2].strip()
    return hashlib.sha256(token.encode()).hexdigest()[:32]


# ---------------------------------------------------------------- a chat turn on a session


async def start_chat(
    request: Request, body: ChatCompletionRequest, new: Sequence[Message], begin: ChatStarter
) -> tuple[Turn, dict[str, str]]:
    """Start a chat turn: on the session's history when the request names one (after the session's
    previous turn, on any replica, has closed), else as it came. Returns the turn and the session's
    response headers."""
    session_id = body.session_id or request.headers.get(SESSION_HEADER)
    if not session_id:
        return await begin(body), {}
    if body.n > 1:
        raise InvalidRequest("n > 1 is not supported on a session: only one reply can be kept", param="n")

    # A remote tier with LB_POLICY=session keeps a conversation on one upstream by the body's `user`
    # (its KV prefix stays there); a session is one conversation. A digest: the id itself is a secret.
    user = body.user or "session-" + hashlib.sha256(session_id.encode()).hexdigest()[:24]

    async def begin_on(messages: tuple[Message, ...]) -> Turn:
        full = [ChatMessage.model_validate(m) for m in messages]
        return await begin(body.model_copy(update={"messages": full, "session_id": None, "user": user}))

    started = await unless_gone(request, conversations(request).run_turn(owner_of(request), session_id, new, begin_on))
    headers = {SESSION_HEADER: session_id}
    if started.dropped:
        headers[TRIMMED_HEADER] = str(started.dropped)
    return started.turn, headers


async def unless_gone(request: Request, starting: Coroutine[Any, Any, Started]) -> Started:
    """The started turn, unless the client leaves first (while its turn waits for the session's
    previous one): the wait, or the turn if it had just started, is given up at once."""
    task = asyncio.ensure_future(starting)
    gone = asyncio.ensure_future(disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not task.done():
            task.cancel()
    left = gone.done() and not gone.cancelled()
    if left:
        gone.exception()  # read: a receive that failed means the client is gone as well
    try:
        started = await task
    except asyncio.CancelledError:
        if left:
            raise ClientGone("The client disconnected while its turn waited for the session") from None
        raise
    if left:
        await started.turn.aclose()
        raise ClientGone("The client disconnected while its turn started")
    return started


# ---------------------------------------------------------------- routes


def session_view(record: Record) -> JsonObject:
    body = record.body
    messages = history.from_json(body.get("messages"))
    system = messages[0].get("content") if messages and messages[0].get("role") == "system" else None
    return {
        "id": record.id,
        "object": "session",
        "created_at": int(record.created_at),
        "expires_at": int(record.expires_at) if record.expires_at is not None else None,
        "model": body.get("model"),
        "system": system,
        "metadata": body.get("metadata") or {},
        "message_count": len(messages),
        "turns": body.get("turns", 0),
        "trimmed_messages": body.get("trimmed", 0),
    }


def page_view(views: list[JsonValue], has_more: bool) -> JsonObject:
    first = views[0] if views else None
    last = views[-1] if views else None
    return {
        "object": "list",
        "data": views,
        "first_id": first.get("id") if isinstance(first, dict) else None,
        "last_id": last.get("id") if isinstance(last, dict) else None,
        "has_more": has_more,
    }


@router.post("/sessions")
async def create_session(body: SessionCreateRequest, request: Request) -> JSONResponse:
    record = await conversations(request).create_session(
        owner_of(request), body.system, body.model, body.metadata or {}, body.ttl_seconds
    )
    return JSONResponse(session_view(record))


@router.get("/sessions")
async def list_sessions(
    request: Request,
    limit: int = Query(default=20, ge=1, le=100),
    after: str | None = Query(default=None, max_length=MAX_ID_LENGTH),
) -> JSONResponse:
    records, has_more = await conversations(request).page(owner_of(request), "session", after, limit)
    return JSONResponse(page_view([session_view(r) for r in records], has_more))


@router.get("/sessions/{session_id}")
async def get_session(session_id: str, request: Request) -> JSONResponse:
    return JSONResponse(session_view(await conversations(request).find(owner_of(request), "session", session_id)))


@router.get("/sessions/{session_id}/messages")
async def get_session_messages(session_id: str, request: Request) -> JSONResponse:
    record = await conversations(request).find(owner_of(request), "session", session_id)
    return JSONResponse(page_view(history.to_json(history.from_json(record.body.get("messages"))), False))


@router.delete("/sessions/{session_id}")
async def delete_session(session_id: str, request: Request) -> JSONResponse:
    await conversations(request).delete(owner_of(request), "session", session_id)
    return JSONResponse({"id": session_id, "object": "session.deleted", "deleted": True})
