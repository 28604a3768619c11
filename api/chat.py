"""Routes for /v1/chat/completions, /v1/completions and /v1/models: OpenAI's wire format over turns.

Each handler: parse (pydantic) -> a `TurnRequest` -> resolve the tier (core/routing.py) -> open the
turn (chat/turn.py: cache, lease, start) -> format its events as JSON or SSE (api/sse.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from api import images, priority, sessions
from api.cache_lookup import cache_directives
from api.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from api.sse import (
    ChoiceResult,
    ChunkMaker,
    chunk_maker,
    collect,
    disconnected,
    finish_reason,
    stream_response,
    timing_headers,
    usage_of,
)
from api.state import app_state
from chat import structured_output, tools
from chat.recording import CachePolicy
from chat.turn import open_turn, require_image_support
from config import TierConfig
from core import routing
from core.errors import InvalidRequest, ServiceError
from core.turns import JsonObject, Message, Prompt, SamplingRequest, Turn, TurnRequest
from middleware import request_context

log = logging.getLogger("llmservice.chat")
router = APIRouter()


# ---------------------------------------------------------------- wire -> turn


def reject_unsupported(body: ChatCompletionRequest | CompletionRequest) -> None:
    # logprobs depend on the tier: a remote one passes them upstream, a local one refuses (chat/local.py)
    if body.stream and body.n > 1:
        raise InvalidRequest("n > 1 is supported only without streaming", param="n")


def sampling_request(body: ChatCompletionRequest | CompletionRequest) -> SamplingRequest:
    return SamplingRequest(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        max_tokens=body.requested_max_tokens(),
        stop=body.stop_list(),
        seed=body.seed,
        repeat_penalty=body.repeat_penalty,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        logit_bias=body.logit_bias,
    )


def message_dicts(body: ChatCompletionRequest) -> tuple[Message, ...]:
    out: list[Message] = []
    for message in body.messages:
        entry: Message = {"role": message.role, "content": message.text()}
        if message.name:
            entry["name"] = message.name
        if message.tool_calls:
            entry["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        if message.tool_call_id:
            entry["tool_call_id"] = message.tool_call_id
        out.append(entry)
    return tuple(out)


def chat_turn_request(body: ChatCompletionRequest) -> TurnRequest:
    """The turn a chat request asks for; bad tools or schemas are a 400 before any model loads."""
    functions = [tool.function.model_dump(exclude_none=True) for tool in body.tools] if body.tools else None
    plan = tools.plan_tools(functions, body.tool_choice, body.parallel_tool_calls)
    if plan is not None and plan.forced:
        schema: JsonObject | None = tools.call_schema(plan)
    else:
        schema = structured_output.schema_from_response_format(body.response_format)
    return TurnRequest(
        kind="chat",
        sampling=sampling_request(body),
        messages=message_dicts(body),
        n=body.n,
        tools=plan,
        json_schema=schema,
        stream=body.stream,
        wire=body.model_dump(mode="json"),
    )


def completion_turn_request(body: CompletionRequest) -> TurnRequest:
    prompt = body.prompt
    if isinstance(prompt, str):
        prompts: tuple[Prompt, ...] = (prompt,)
    elif prompt and isinstance(prompt[0], int):
        prompts = (tuple(prompt),)  # type: ignore[arg-type]
    else:
        prompts = tuple(p if isinstance(p, str) else tuple(p) for p in prompt)  # type: ignore[union-attr]
    return TurnRequest(
        kind="completion",
        sampling=sampling_request(body),
        prompts=prompts,
        n=body.n,
        stream=body.stream,
        wire=body.model_dump(mode="json"),
    )


async def start(request: Request, tier: TierConfig, endpoint: str, turn_request: TurnRequest) -> Turn:
    state = app_state(request)
    policy = CachePolicy.from_directives(cache_directives(request))
    return await open_turn(state.manager, state.cache, tier, endpoint, turn_request, policy)


def resolve(request: Request, model: str, asked_priority: str | None = None) -> tuple[routing.Resolution, TierConfig]:
    """The tier serving `model`; also puts the request's priority in force (api/priority.py)."""
    priority.apply(request, asked_priority)
    settings = app_state(request).settings
    resolution = routing.resolve(model, "chat", settings)
    request_context.note_tier(resolution.tier)
    if resolution.fallback_from:
        log.info("tier %s is not configured: serving %r with %s", resolution.fallback_from, model, resolution.tier)
    return resolution, settings.tiers[resolution.tier]


def response_headers(resolution: routing.Resolution, turn: Turn) -> dict[str, str]:
    headers = {"X-Tier": resolution.tier}
    if resolution.fallback_from:
        headers["X-Tier-Fallback"] = f"{resolution.fallback_from}->{resolution.tier}"
    if turn.cache_status is not None:
        headers["X-Cache"] = turn.cache_status
    if turn.upstream:
        headers["X-Upstream"] = turn.upstream
    return headers


def include_usage(body: ChatCompletionRequest | CompletionRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


# ---------------------------------------------------------------- chat completions


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    reject_unsupported(body)
    # Checking big tool or response schemas costs milliseconds per element: never on the event loop.
    schemas = body.tools or body.response_format
    turn_request = await asyncio.to_thread(chat_turn_request, body) if schemas else chat_turn_request(body)
    resolution, tier = resolve(request, body.model, body.priority)
    if images.has_images(body):
        turn_request = await _with_images(request, body, tier, turn_request)

    async def begin(full: ChatCompletionRequest) -> Turn:  # `body`, or a session's history plus body's messages
        return await start(request, tier, "chat.completions", turn_request if full is body else chat_turn_request(full))

    turn, session_headers = await sessions.start_chat(request, body, message_dicts(body), begin)
    headers = response_headers(resolution, turn) | session_headers
    if body.stream:
        return stream_response(turn, _chat_chunk_maker(body), include_usage(body), headers)
    results = await collect(turn, disconnected(request))
    payload = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": [chat_choice(i, result) for i, result in enumerate(results)],
        "usage": usage_of(turn, results),
    }
    # Headers again: a whole answer may have moved to another upstream (X-Upstream) while it was read.
    headers = response_headers(resolution, turn) | session_headers
    return JSONResponse(payload, headers={**headers, **timing_headers(turn, results)})


async def _with_images(
    request: Request, body: ChatCompletionRequest, tier: TierConfig, turn: TurnRequest
) -> TurnRequest:
    if body.session_id or request.headers.get(sessions.SESSION_HEADER):
        raise InvalidRequest("Images are not supported on a session: send the whole conversation", param="messages")
    require_image_support(tier)  # before any image is fetched or decoded
    return await images.attach_images(body, turn, app_state(request).settings)


def chat_choice(index: int, result: ChoiceResult) -> JsonObject:
    if result.calls:
        calls: list[JsonObject] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in result.calls
        ]
        message: JsonObject = {"role": "assistant", "content": None, "tool_calls": calls}  # type: ignore[dict-item]
    else:
        message = {"role": "assistant", "content": result.text}
    return {
        "index": index,
        "message": message,
        "logprobs": result.logprobs,
        "finish_reason": finish_reason(result.done),
    }


def _chat_chunk_maker(body: ChatCompletionRequest) -> ChunkMaker:
    def choice(role: bool, text: str | None, finish: str | None, delta: JsonObject | None = None) -> JsonObject:
        if delta is None:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    return chunk_maker("chatcmpl", "chat.completion.chunk", body.model, include_usage(body), choice)


# ---------------------------------------------------------------- text completions


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    reject_unsupported(body)
    if body.suffix:
        raise InvalidRequest("suffix (fill-in-the-middle) is not supported", param="suffix")
    resolution, tier = resolve(request, body.model, body.priority)
    several = isinstance(body.prompt, list) and len(body.prompt) > 1 and isinstance(body.prompt[0], (str, list))
    if body.stream and several:
        raise InvalidRequest("several prompts are supported only without streaming", param="prompt")
    turn = await start(request, tier, "completions", completion_turn_request(body))
    headers = response_headers(resolution, turn)
    if body.stream:
        echo_text = body.prompt if body.echo and isinstance(body.prompt, str) else ""

        def choice(role: bool, text: str | None, finish: str | None) -> JsonObject:
            return {"index": 0, "text": echo_text if role else (text or ""), "logprobs": None, "finish_reason": finish}

        make_chunk = chunk_maker("cmpl", "text_completion", body.model, include_usage(body), choice)
        return stream_response(turn, make_chunk, include_usage(body), headers)
    results = await collect(turn, disconnected(request))
    payload = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": [_completion_choice(body, i, result) for i, result in enumerate(results)],
        "usage": usage_of(turn, results),
    }
    headers = response_headers(resolution, turn)  # the upstream may have changed while it was read
    return JSONResponse(payload, headers={**headers, **timing_headers(turn, results)})


def _completion_choice(body: CompletionRequest, index: int, result: ChoiceResult) -> JsonObject:
    text = result.text
    if body.echo:
        prompt_text = body.prompt if isinstance(body.prompt, str) else None
        if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str):
            prompt_text = body.prompt[index // body.n]  # type: ignore[assignment]
        text = (prompt_text or "") + text
    return {"index": index, "text": text, "logprobs": result.logprobs, "finish_reason": finish_reason(result.done)}


# ---------------------------------------------------------------- models


def _owned_by(tier: TierConfig) -> str:
    return f"llmservice:{tier.backend}"


@router.get("/models")
async def list_models(request: Request) -> JSONResponse:
    state = app_state(request)
    created = int(state.started)
    tiers = [t for t in state.settings.tiers.values() if request_context.tier_allowed(t.name)]  # the key's tiers
    cards = [ModelCard(id=t.model_id, created=created, owned_by=_owned_by(t)) for t in tiers]
    return JSONResponse(ModelList(data=cards).model_dump())


@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> JSONResponse:
    state = app_state(request)
    resolution = None
    for kind in ("chat", "embedding", "rerank", "speech"):
        try:
            resolution = routing.resolve(model_id, kind, state.settings)
            break
        except ServiceError as exc:
            if exc.status == 404:
                raise
    assert resolution is not None
    request_context.note_tier(resolution.tier)  # 403 for a key restricted to other tiers
    tier = state.settings.tiers[resolution.tier]
    card = ModelCard(id=tier.model_id, created=int(state.started), owned_by=_owned_by(tier))
    return JSONResponse(card.model_dump())
