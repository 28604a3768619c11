"""Routes for /v1/chat/completions, /v1/completions and /v1/models.

Each handler: parse (pydantic) -> resolve the tier (router.py) -> lease it (model_manager.py) ->
submit jobs to the tier's scheduler -> shape the OpenAI response or SSE stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from api import cache_lookup
from api.schemas import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from api.sse import (
    SSE_HEADERS,
    OnComplete,
    RunningJob,
    cancel_on_exit,
    chunk_maker,
    finish_reason,
    stream_events,
    submit,
    timing_headers,
    usage,
)
from chat import structured_output, tools
from chat.scheduler import ChatScheduler, DoneEvent
from config import Settings, TierConfig
from core import routing
from core.errors import ContextLengthExceeded, InvalidRequest, ServiceError
from core.protocols import SamplingParams
from middleware import request_context

log = logging.getLogger("llmservice.chat")
router = APIRouter()


def sampling_params(body: ChatCompletionRequest | CompletionRequest, tier: TierConfig, room: int) -> SamplingParams:
    """The request's sampling parameters with the tier's defaults filled in."""
    requested = body.requested_max_tokens()
    max_tokens = min(requested if requested is not None else tier.max_tokens, room)
    repeat = body.repeat_penalty if body.repeat_penalty is not None else tier.repeat_penalty
    return SamplingParams(
        temperature=body.temperature if body.temperature is not None else tier.temperature,
        top_p=body.top_p if body.top_p is not None else tier.top_p,
        top_k=body.top_k if body.top_k is not None else tier.top_k,
        max_tokens=max(1, max_tokens),
        stop=body.stop_list(),
        seed=body.seed,
        repeat_penalty=repeat,
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        logit_bias=parse_logit_bias(body.logit_bias),
    )


def parse_logit_bias(raw: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} map, biases clamped to [-100, 100] as OpenAI does."""
    if not raw:
        return ()
    try:
        return tuple((int(token), max(-100.0, min(100.0, float(bias)))) for token, bias in raw.items())
    except ValueError:
        raise InvalidRequest("logit_bias keys must be token ids", param="logit_bias") from None


def check_context(prompt_tokens: int, context_length: int) -> int:
    """Room left for the completion; a prompt that fills the context is a 400 naming both counts."""
    if prompt_tokens >= context_length:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context_length} tokens. However, your prompt has "
            f"{prompt_tokens} tokens, which leaves no room for a completion. Shorten the prompt.",
            param="messages",
        )
    return context_length - prompt_tokens


def reject_unsupported(body: ChatCompletionRequest | CompletionRequest) -> None:
    if body.logprobs:
        raise InvalidRequest("logprobs are not supported by this server", param="logprobs")
    if body.stream and body.n > 1:
        raise InvalidRequest("n > 1 is supported only without streaming", param="n")


# ---------------------------------------------------------------- helpers for both endpoints


def resolve(request: Request, model: str) -> tuple[routing.Resolution, TierConfig]:
    settings: Settings = request.app.state.settings
    resolution = routing.resolve(model, "chat", settings)
    request_context.note_tier(resolution.tier)
    if resolution.fallback_from:
        log.info("tier %s is not configured: serving %r with %s", resolution.fallback_from, model, resolution.tier)
    return resolution, settings.tiers[resolution.tier]


def tier_headers(resolution: routing.Resolution) -> dict[str, str]:
    headers = {"X-Tier": resolution.tier}
    if resolution.fallback_from:
        headers["X-Tier-Fallback"] = f"{resolution.fallback_from}->{resolution.tier}"
    return headers


# ---------------------------------------------------------------- chat completions


def message_dicts(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for message in body.messages:
        entry: dict[str, Any] = {"role": message.role, "content": message.text()}
        if message.name:
            entry["name"] = message.name
        if message.tool_calls:
            entry["tool_calls"] = [call.model_dump() for call in message.tool_calls]
        if message.tool_call_id:
            entry["tool_call_id"] = message.tool_call_id
        out.append(entry)
    return out


@router.post("/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    reject_unsupported(body)
    plan = tools.plan_tools(body.tools, body.tool_choice, body.parallel_tool_calls)
    if plan is not None and plan.forced:
        schema: dict[str, Any] | None = tools.call_schema(plan)
    else:
        schema = structured_output.schema_from_response_format(body.response_format)
    resolution, tier = resolve(request, body.model)
    cached = await cache_lookup.lookup(request, "chat.completions", tier, body)
    if cached.hit is not None:
        return _chat_replay(body, resolution, cached, plan)
    stack = contextlib.AsyncExitStack()
    scheduler: ChatScheduler = await stack.enter_async_context(request.app.state.manager.lease(resolution.tier))
    try:
        model = scheduler.model
        messages = tools.prepare_messages(message_dicts(body), plan)
        prompt_text = await asyncio.to_thread(model.render_chat, messages, None)
        prompt = await asyncio.to_thread(model.tokenize, prompt_text)
        params = sampling_params(body, tier, check_context(len(prompt), model.context_length))
        if schema is not None:
            params = replace(params, json_schema=structured_output.canonical(schema))
        return await _chat_response(body, resolution, cached, scheduler, prompt, params, stack, plan)
    except BaseException:
        await stack.aclose()
        raise


def chat_choice(index: int, text: str, done: DoneEvent | None, plan: tools.ToolPlan | None) -> dict[str, Any]:
    calls = tools.parse_tool_calls(text, plan) if plan is not None else None
    if calls:
        message: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": calls}
        return {"index": index, "message": message, "logprobs": None, "finish_reason": "tool_calls"}
    message = {"role": "assistant", "content": text}
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish_reason(done)}


def _chat_chunk_maker(body: ChatCompletionRequest, include_usage: bool) -> Any:
    def choice(
        role: bool = False, text: str | None = None, finish: str | None = None, delta: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        if delta is None:
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    return chunk_maker("chatcmpl", "chat.completion.chunk", body.model, include_usage, choice)


def _chat_stream(
    body: ChatCompletionRequest,
    running: Any,
    headers: dict[str, str],
    release: Callable[[], Awaitable[None]],
    plan: tools.ToolPlan | None,
    on_complete: OnComplete | None = None,
) -> StreamingResponse:
    """The SSE response of a live job or of a cache replay (the same shaping either way)."""
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    shaper = tools.ToolStreamShaper(plan) if plan is not None else None
    return StreamingResponse(
        stream_events(running, _chat_chunk_maker(body, include_usage), include_usage, release, shaper, on_complete),
        media_type="text/event-stream",
        headers={**SSE_HEADERS, **headers},
    )


def _chat_payload(body: ChatCompletionRequest, choices: list[dict[str, Any]], usage_: dict[str, int]) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": choices,
        "usage": usage_,
    }


def _chat_replay(
    body: ChatCompletionRequest,
    resolution: routing.Resolution,
    cached: cache_lookup.CacheLookup,
    plan: tools.ToolPlan | None,
) -> Any:
    assert cached.hit is not None
    runs = cache_lookup.cached_runs(cached.hit)
    headers = {**tier_headers(resolution), **cached.headers}
    if body.stream:
        return _chat_stream(body, runs[0], headers, cache_lookup.no_release, plan)
    choices = [chat_choice(i, "".join(run.pieces), run.done, plan) for i, run in enumerate(runs)]
    counts = cached.hit.get("usage", {})
    usage_ = usage(int(counts.get("prompt_tokens", 0)), int(counts.get("completion_tokens", 0)))
    return JSONResponse(_chat_payload(body, choices, usage_), headers=headers)


async def _chat_response(
    body: ChatCompletionRequest,
    resolution: routing.Resolution,
    cached: cache_lookup.CacheLookup,
    scheduler: ChatScheduler,
    prompt: list[int],
    params: SamplingParams,
    stack: contextlib.AsyncExitStack,
    plan: tools.ToolPlan | None,
) -> Any:
    headers = {**tier_headers(resolution), **cached.headers}
    if body.stream:
        running = submit(scheduler, prompt, params)
        return _chat_stream(body, running, headers, stack.aclose, plan, cache_lookup.filler(cached))
    jobs = [submit(scheduler, prompt, _seeded(params, i)) for i in range(body.n)]
    async with stack, cancel_on_exit(jobs):
        texts = await asyncio.gather(*(running.collect() for running in jobs))
    await cache_lookup.store_jobs(cached, jobs, len(prompt))
    done = [running.done for running in jobs if running.done is not None]
    choices = [
        chat_choice(i, text, running.done, plan) for i, (text, running) in enumerate(zip(texts, jobs, strict=True))
    ]
    payload = _chat_payload(body, choices, usage(len(prompt), sum(d.completion_tokens for d in done)))
    return JSONResponse(payload, headers={**headers, **timing_headers(done)})


def _seeded(params: SamplingParams, index: int) -> SamplingParams:
    """The i-th of n choices: a different seed each, so choices differ but stay reproducible."""
    if index == 0 or params.seed is None:
        return params
    return replace(params, seed=params.seed + index)


# ---------------------------------------------------------------- text completions


@router.post("/completions")
async def completions(body: CompletionRequest, request: Request) -> Any:
    reject_unsupported(body)
    if body.suffix:
        raise InvalidRequest("suffix (fill-in-the-middle) is not supported", param="suffix")
    resolution, tier = resolve(request, body.model)
    several = isinstance(body.prompt, list) and len(body.prompt) > 1 and isinstance(body.prompt[0], (str, list))
    if body.stream and several:
        raise InvalidRequest("several prompts are supported only without streaming", param="prompt")
    cached = await cache_lookup.lookup(request, "completions", tier, body)
    if cached.hit is not None:
        runs = cache_lookup.cached_runs(cached.hit)
        return _completion_result(body, resolution, cached, runs, None, cache_lookup.no_release)
    stack = contextlib.AsyncExitStack()
    scheduler: ChatScheduler = await stack.enter_async_context(request.app.state.manager.lease(resolution.tier))
    try:
        prompts = await asyncio.to_thread(_prompt_tokens, scheduler.model, body.prompt)
        room = min(check_context(len(p), scheduler.model.context_length) for p in prompts)
        params = sampling_params(body, tier, room)
        if body.stream:
            running = submit(scheduler, prompts[0], params)
            return _completion_result(body, resolution, cached, [running], cache_lookup.filler(cached), stack.aclose)
        jobs = [submit(scheduler, prompt, _seeded(params, i)) for prompt in prompts for i in range(body.n)]
    except BaseException:
        await stack.aclose()
        raise
    async with stack, cancel_on_exit(jobs):
        await asyncio.gather(*(running.collect() for running in jobs))
    await cache_lookup.store_jobs(cached, jobs, sum(len(p) for p in prompts) * body.n)
    return _completion_result(body, resolution, cached, jobs, None, cache_lookup.no_release)


def _prompt_tokens(model: Any, prompt: Any) -> list[list[int]]:
    if isinstance(prompt, str):
        return [model.tokenize(prompt)]
    if prompt and isinstance(prompt[0], int):
        return [list(prompt)]
    if prompt and isinstance(prompt[0], list):
        return [list(p) for p in prompt]
    return [model.tokenize(p) for p in prompt]


def _completion_chunk_maker(body: CompletionRequest, include_usage: bool) -> Any:
    echo_text = body.prompt if body.echo and isinstance(body.prompt, str) else ""

    def choice(role: bool = False, text: str | None = None, finish: str | None = None) -> dict[str, Any]:
        return {"index": 0, "text": echo_text if role else (text or ""), "logprobs": None, "finish_reason": finish}

    return chunk_maker("cmpl", "text_completion", body.model, include_usage, choice)


def _completion_result(
    body: CompletionRequest,
    resolution: routing.Resolution,
    cached: cache_lookup.CacheLookup,
    runs: list[Any],
    on_complete: OnComplete | None,
    release: Callable[[], Awaitable[None]],
) -> Any:
    """Shape finished (or, when streaming, running) choices, live or replayed from the cache."""
    headers = {**tier_headers(resolution), **cached.headers}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            stream_events(
                runs[0], _completion_chunk_maker(body, include_usage), include_usage, release, on_complete=on_complete
            ),
            media_type="text/event-stream",
            headers={**SSE_HEADERS, **headers},
        )
    choices = []
    for i, running in enumerate(runs):
        text = "".join(running.chunks if isinstance(running, RunningJob) else running.pieces)
        if body.echo:
            prompt_text = body.prompt if isinstance(body.prompt, str) else None
            if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], str):
                prompt_text = body.prompt[i // body.n]
            text = (prompt_text or "") + text
        choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": finish_reason(running.done)})
    if cached.hit is not None:
        counts = cached.hit.get("usage", {})
        usage_ = usage(int(counts.get("prompt_tokens", 0)), int(counts.get("completion_tokens", 0)))
        done: list[DoneEvent] = []
    else:
        done = [running.done for running in runs if running.done is not None]
        usage_ = usage(sum(d.prompt_tokens for d in done), sum(d.completion_tokens for d in done))
    payload = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": body.model,
        "choices": choices,
        "usage": usage_,
    }
    return JSONResponse(payload, headers={**headers, **timing_headers(done)})


# ---------------------------------------------------------------- models


def _owned_by(tier: TierConfig) -> str:
    return f"llmservice:{tier.backend}"


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    settings: Settings = request.app.state.settings
    created = int(request.app.state.started)
    cards = [ModelCard(id=t.model_id, created=created, owned_by=_owned_by(t)) for t in settings.tiers.values()]
    return ModelList(data=cards).model_dump()


@router.get("/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> dict[str, Any]:
    settings: Settings = request.app.state.settings
    resolution = None
    for kind in ("chat", "embedding", "rerank"):
        try:
            resolution = routing.resolve(model_id, kind, settings)
            break
        except ServiceError as exc:
            if exc.status == 404:
                raise
    assert resolution is not None
    tier = settings.tiers[resolution.tier]
    return ModelCard(id=tier.model_id, created=int(request.app.state.started), owned_by=_owned_by(tier)).model_dump()
