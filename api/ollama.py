"""The Ollama API on the same port, for tools that speak only Ollama (n8n, Home Assistant, Open WebUI's
Ollama connection, Continue, the `ollama` client libraries).

It is one more formatter over the chat-turn seam, not a path of its own to a model: a chat or generate
body becomes the OpenAI request api/chat.py already turns into a `TurnRequest` (api/ollama_wire.py),
opened with the same `open_turn` (cache, lease, limits, tool calls), and its events are written as
Ollama's NDJSON lines (`done: false` pieces, then one `done: true` line with `done_reason`,
`eval_count` and the durations in nanoseconds). Embeddings reuse api/rag.py's `embed_texts`.

POST /api/chat, /api/generate    NDJSON by default, one object with `stream: false`; an empty prompt
                                 loads the model, `keep_alive: 0` with it unloads (admin keys only);
                                 with a prompt, `keep_alive` keeps the tier loaded that long after the
                                 request (0: unload once idle; a non-admin key's 0 is ignored)
POST /api/embed, /api/embeddings
GET  /api/tags, /api/ps, /api/version      POST /api/show
GET  /, HEAD /                   "Ollama is running" (public, like /health)

Model names are ours (tier names, aliases, `tier/model` ids, the router's patterns), with or without
an Ollama tag (`light:latest`). Errors are Ollama's `{"error": "<message>"}` with the status;
refusals by the middleware (401, 429, 413) keep the OpenAI envelope, whose `error` the Ollama
clients show as it is.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.routing import APIRoute

from api import chat as openai_chat
from api import images
from api import ollama_wire as wire
from api.json_response import FastJSONResponse
from api.rag import Embedded, dense_of, embed_texts
from api.schemas import ChatCompletionRequest, CompletionRequest
from api.sse import collect, disconnected, note
from api.state import app_state
from chat.turn import reads_images, require_image_support
from config import Settings, TierConfig
from core import routing
from core.errors import Forbidden, ModelNotFound, ServiceError, WrongModelKind
from core.events import DoneEvent, TextEvent, ToolCallEvent
from core.turns import JsonObject, Turn
from middleware import request_context
from middleware.keys import SCOPE_KEY, ApiKey

OLLAMA_VERSION = "0.12.0"  # the Ollama API version these routes follow
NDJSON = "application/x-ndjson"
NS = 1_000_000_000
_FOREVER_S = 10 * 365 * 86400  # "expires_at" of a tier that never unloads
_QUANT = re.compile(r"(?i)(?:^|[-_.])((?:i?q\d(?:_[a-z0-9]+)*)|f16|f32|bf16)(?:$|[-_.])")


class OllamaRoute(APIRoute):
    """Errors leave as Ollama's `{"error": "<message>"}`: Ollama clients show a string."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except ServiceError as exc:
                return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

        return route


router = APIRouter(prefix="/api", route_class=OllamaRoute)
root_router = APIRouter()


@root_router.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
async def root() -> PlainTextResponse:
    """Ollama's liveness answer; clients (and Open WebUI's connection check) look for it. Public."""
    return PlainTextResponse("Ollama is running")


# ---------------------------------------------------------------- names and shapes


def model_name(name: str, kind: str, settings: Settings) -> str:
    """The name to resolve: as given when it resolves, else without its Ollama tag ("light:latest")."""
    try:
        routing.resolve(name, kind, settings)
        return name
    except ModelNotFound as exc:
        error = exc
    base = name.rpartition(":")[0]
    if base:
        with contextlib.suppress(ModelNotFound):
            routing.resolve(base, kind, settings)
            return base
    raise error


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat().replace("+00:00", "Z")


def _now() -> str:
    return _iso(time.time())


def _ns(seconds: float) -> int:
    return int(seconds * NS)


@dataclass(frozen=True)
class Shape:
    """One response's lines: `/api/chat` puts text in `message`, `/api/generate` in `response`."""

    model: str
    chat: bool
    started: float  # time.monotonic() when the route began

    def line(self, text: str, calls: list[ToolCallEvent] | None = None, done: JsonObject | None = None) -> JsonObject:
        out: JsonObject = {"model": self.model, "created_at": _now()}
        if self.chat:
            message: JsonObject = {"role": "assistant", "content": text}
            if calls:
                message["tool_calls"] = [_call(c) for c in calls]
            out["message"] = message
        else:
            out["response"] = text
        out["done"] = done is not None
        return {**out, **(done or {})}

    def done(self, event: DoneEvent) -> JsonObject:
        return {
            "done_reason": "length" if event.finish_reason == "length" else "stop",
            "total_duration": _ns(time.monotonic() - self.started),
            "load_duration": 0,
            "prompt_eval_count": event.prompt_tokens,
            "prompt_eval_duration": 0,
            "eval_count": event.completion_tokens,
            "eval_duration": _ns(event.compute_seconds),
        }


def _call(call: ToolCallEvent) -> JsonObject:
    try:
        arguments = json.loads(call.arguments)
    except json.JSONDecodeError:
        arguments = {}
    return {"function": {"name": call.name, "arguments": arguments if isinstance(arguments, dict) else {}}}


def _ndjson(data: JsonObject) -> bytes:
    return (json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n").encode()


async def _lines(turn: Turn, shape: Shape, finished: Callable[[], None]) -> AsyncIterator[bytes]:
    """The NDJSON body of the turn's one choice; an error after the first line is one `error` line.
    `finished` runs once the turn is closed (keep_alive)."""
    try:
        async for event in turn.choices[0].events():
            note(event, turn)
            if isinstance(event, TextEvent):
                if event.text:
                    yield _ndjson(shape.line(event.text))
            elif isinstance(event, ToolCallEvent):
                yield _ndjson(shape.line("", [event]))
            elif isinstance(event, DoneEvent):
                yield _ndjson(shape.line("", done=shape.done(event)))
                return
            else:
                yield _ndjson({"error": event.error.message})
                return
    finally:
        await turn.aclose()
        finished()


# ---------------------------------------------------------------- chat and generate


async def _generate(
    request: Request, shape: Shape, body: wire.Generation, openai: ChatCompletionRequest | CompletionRequest
) -> Response:
    """Open the turn for the translated request and write it the Ollama way."""
    if isinstance(openai, ChatCompletionRequest):
        turn_request, endpoint = openai_chat.chat_turn_request(openai), "chat.completions"
    else:
        turn_request, endpoint = openai_chat.completion_turn_request(openai), "completions"
    resolution, tier = openai_chat.resolve(request, model_name(body.model, "chat", app_state(request).settings))
    if isinstance(openai, ChatCompletionRequest) and images.has_images(openai):
        require_image_support(tier)  # before any image is decoded
        turn_request = await images.attach_images(openai, turn_request, app_state(request).settings)
    finished = _keep_alive(request, tier.name, body.keep_alive)
    turn = await openai_chat.start(request, tier, endpoint, turn_request)
    headers = openai_chat.response_headers(resolution, turn)
    if body.stream:
        return StreamingResponse(_lines(turn, shape, finished), media_type=NDJSON, headers=headers)
    try:
        result = (await collect(turn, disconnected(request)))[0]
    finally:
        finished()
    return JSONResponse(shape.line(result.text, result.calls, shape.done(result.done)), headers=headers)


def _may_unload(request: Request) -> bool:
    key: ApiKey | None = request.scope.get(SCOPE_KEY)
    return key is None or key.admin


def _keep_alive(request: Request, tier: str, value: wire.KeepAlive) -> Callable[[], None]:
    """What to do when the request ends: keep the tier loaded `keep_alive` longer, or with 0 unload it
    once idle. A non-admin key's 0 is ignored (it would unload a tier other services use); an invalid
    value is a 400 now, before any work."""
    seconds = wire.keep_alive_seconds(value)
    manager = app_state(request).manager

    def finished() -> None:
        if seconds is not None and tier in manager.tiers and (seconds > 0 or _may_unload(request)):
            manager.keep_alive(tier, seconds)

    return finished


async def _load(request: Request, shape: Shape, body: wire.Generation) -> JSONResponse:
    """No prompt: load the model, or unload it with `keep_alive: 0` (Ollama's way to free memory)."""
    _, tier = openai_chat.resolve(request, model_name(body.model, "chat", app_state(request).settings))
    manager = app_state(request).manager
    if wire.keep_alive_is_zero(body.keep_alive):
        key: ApiKey | None = request.scope.get(SCOPE_KEY)
        if key is not None and not key.admin:
            raise Forbidden(f"The key {key.name!r} may not unload models (it needs admin = true)")
        await manager.unload(tier.name, force=False)
        reason = "unload"
    else:
        finished = _keep_alive(request, tier.name, body.keep_alive)
        await manager.ensure_loaded(tier.name)
        finished()
        reason = "load"
    return JSONResponse(shape.line("", done={"done_reason": reason}))


@router.post("/chat")
async def chat(request: Request) -> Response:
    body = wire.parse(await request.body(), wire.ChatBody)
    shape = Shape(body.model, chat=True, started=time.monotonic())
    if not body.messages:
        return await _load(request, shape, body)
    return await _generate(request, shape, body, wire.chat_request(body))


@router.post("/generate")
async def generate(request: Request) -> Response:
    body = wire.parse(await request.body(), wire.GenerateBody)
    shape = Shape(body.model, chat=False, started=time.monotonic())
    if not body.prompt and not body.system:
        return await _load(request, shape, body)
    return await _generate(request, shape, body, wire.generate_request(body))


# ---------------------------------------------------------------- embeddings


async def _embed(
    request: Request, model: str, texts: list[str], truncate: bool, dimensions: int | None, keep_alive: wire.KeepAlive
) -> tuple[list[Embedded], dict[str, str]]:
    settings = app_state(request).settings
    name = model_name(model, "embedding", settings)
    finished = _keep_alive(request, routing.resolve(name, "embedding", settings).tier, keep_alive)
    try:
        return await embed_texts(request, name, texts, ("dense",), truncate, dimensions)
    finally:
        finished()


@router.post("/embed")
async def embed(request: Request) -> JSONResponse:
    started = time.monotonic()
    body = wire.parse(await request.body(), wire.EmbedBody)
    texts = [body.input] if isinstance(body.input, str) else body.input
    rows, headers = await _embed(request, body.model, texts, body.truncate, body.dimensions, body.keep_alive)
    payload = {
        "model": body.model,
        "embeddings": [dense_of(row) for row in rows],
        "total_duration": _ns(time.monotonic() - started),
        "load_duration": 0,
        "prompt_eval_count": sum(row.tokens for row in rows),
    }
    return FastJSONResponse(payload, headers=headers)  # float32 arrays: orjson writes them


@router.post("/embeddings")
async def embeddings(request: Request) -> JSONResponse:
    """The older endpoint: one `prompt`, one `embedding`."""
    body = wire.parse(await request.body(), wire.EmbeddingsBody)
    rows, headers = await _embed(request, body.model, [body.prompt], True, None, body.keep_alive)
    return FastJSONResponse({"embedding": dense_of(rows[0])}, headers=headers)


# ---------------------------------------------------------------- models


def _listed(settings: Settings) -> list[TierConfig]:
    """Chat and embedding tiers the request's key may use (Ollama has no rerank or speech API)."""
    return [
        t for t in settings.tiers.values() if t.kind in ("chat", "embedding") and request_context.tier_allowed(t.name)
    ]


def _details(tier: TierConfig) -> JsonObject:
    quant = _QUANT.search(tier.model_name)
    return {
        "parent_model": "",
        "format": "gguf" if tier.backend == "llamacpp" else tier.backend,
        "family": tier.name,
        "families": [tier.name],
        "parameter_size": "",
        "quantization_level": quant.group(1).upper() if quant else "",
    }


def _card(tier: TierConfig, started: float) -> JsonObject:
    path = tier.model_path
    return {
        "name": f"{tier.name}:latest",
        "model": f"{tier.name}:latest",
        "modified_at": _iso(started),
        "size": os.path.getsize(path) if os.path.isfile(path) else 0,
        "digest": hashlib.sha256(tier.model_id.encode()).hexdigest(),
        "details": _details(tier),
    }


@router.get("/tags")
async def tags(request: Request) -> JSONResponse:
    state = app_state(request)
    return JSONResponse({"models": [_card(tier, state.started) for tier in _listed(state.settings)]})


@router.get("/ps")
async def running(request: Request) -> JSONResponse:
    state = app_state(request)
    models = []
    for tier in _listed(state.settings):
        status = state.manager.status(tier.name)
        if status.get("state") != "ready":
            continue
        # Ollama's expires_at: when the idle unload would happen (the TTL, or a later keep_alive deadline);
        # far ahead when the tier never unloads.
        idle = float(status.get("idle_seconds") or 0.0)
        kept = state.manager.tiers[tier.name].keep_until - state.manager.clock()
        left = min(_FOREVER_S, max(tier.ttl - idle, kept)) if tier.ttl > 0 else _FOREVER_S
        expires = time.time() + left
        card = _card(tier, state.started)
        card.update(
            expires_at=_iso(expires),
            size_vram=0,
            context_length=tier.n_ctx,
        )
        models.append(card)
    return JSONResponse({"models": models})


def _shown_tier(name: str, settings: Settings) -> TierConfig:
    """The chat or embedding tier a name resolves to (an unknown name is a 404 listing the valid ones)."""
    wrong: WrongModelKind | None = None
    for kind in ("chat", "embedding"):
        try:
            return settings.tiers[routing.resolve(model_name(name, kind, settings), kind, settings).tier]
        except WrongModelKind as exc:
            wrong = exc
    assert wrong is not None
    raise wrong


@router.post("/show")
async def show(request: Request) -> JSONResponse:
    state = app_state(request)
    tier = _shown_tier(wire.parse(await request.body(), wire.ShowBody).model_name(), state.settings)
    request_context.note_tier(tier.name)  # 403 for a key restricted to other tiers
    chat = tier.kind == "chat"
    parameters = f"temperature {tier.temperature}\ntop_p {tier.top_p}\ntop_k {tier.top_k}\n" if chat else ""
    return JSONResponse(
        {
            "modelfile": f"FROM {tier.model_id}\n",
            "parameters": parameters + (f"num_predict {tier.max_tokens}" if chat else ""),
            "template": "",
            "details": _details(tier),
            "model_info": {
                "general.architecture": "llmservice",
                "general.basename": tier.model_name,
                "llmservice.context_length": tier.n_ctx,
                "llmservice.tier": tier.name,
                "llmservice.backend": tier.backend,
            },
            "capabilities": _capabilities(tier),
            "modified_at": _iso(state.started),
        }
    )


def _capabilities(tier: TierConfig) -> list[str]:
    if tier.kind != "chat":
        return ["embedding"]
    return ["completion", "tools", "vision"] if reads_images(tier) else ["completion", "tools"]


@router.get("/version")
async def version() -> JSONResponse:
    return JSONResponse({"version": OLLAMA_VERSION})
