"""Turn events into OpenAI responses: server-sent events for streams, collected results otherwise.

A stream is one `data: {...}` chunk per event, a final chunk with the finish reason, usage when
asked, then `data: [DONE]`; an error after the stream started is one `data: {"error": ...}` event
and no [DONE]. The turn is closed (its choices cancelled, its tier released) when the stream ends
for any reason, the client leaving included.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import orjson
from fastapi import Request
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from core.errors import ClientGone
from core.events import DoneEvent, ErrorEvent, Event, TextEvent, ToolCallEvent
from core.turns import Choice, JsonObject, Turn
from middleware import request_context

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ChunkMaker(Protocol):
    def __call__(
        self,
        *,
        role: bool = False,
        text: str | None = None,
        finish: str | None = None,
        delta: JsonObject | None = None,
        usage: JsonObject | None = None,
        logprobs: JsonObject | None = None,
    ) -> JsonObject: ...


def chunk_maker(
    id_prefix: str, object_name: str, model: str, include_usage: bool, choice: Callable[..., JsonObject]
) -> ChunkMaker:
    """Builds the chunks of one stream: one id and `created`, the endpoint's choice shape, and `usage`
    on every chunk when the client asked for it (null except on the final `choices: []` chunk)."""
    completion_id = f"{id_prefix}-{uuid.uuid4().hex}"
    created = int(time.time())

    def make_chunk(
        *,
        role: bool = False,
        text: str | None = None,
        finish: str | None = None,
        delta: JsonObject | None = None,
        usage: JsonObject | None = None,
        logprobs: JsonObject | None = None,
    ) -> JsonObject:
        chunk: JsonObject = {"id": completion_id, "object": object_name, "created": created, "model": model}
        if usage is not None:
            chunk["choices"] = []
        else:
            args = {"role": role, "text": text, "finish": finish} | ({"delta": delta} if delta is not None else {})
            made = choice(**args)
            if logprobs is not None:  # an upstream's, passed through (only remote tiers have them)
                made["logprobs"] = logprobs
            chunk["choices"] = [made]
        if include_usage:
            chunk["usage"] = usage
        return chunk

    return make_chunk


def sse(data: JsonObject) -> bytes:
    # orjson writes the compact UTF-8 of json.dumps(ensure_ascii=False) in ~1/40 of its time per token chunk
    try:
        return b"data: " + orjson.dumps(data) + b"\n\n"
    except TypeError:  # what orjson refuses (an upstream's integer past 64 bits) json.dumps still writes
        return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


def usage(prompt_tokens: int, completion_tokens: int) -> JsonObject:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def finish_reason(done: DoneEvent) -> str:
    return done.finish_reason if done.finish_reason in ("length", "tool_calls") else "stop"


def tool_call_deltas(call: ToolCallEvent) -> list[JsonObject]:
    """OpenAI's streamed form of a call: the head (index, id, type, name), then the arguments."""
    head: JsonObject = {
        "index": call.index,
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": ""},
    }
    rest: JsonObject = {"index": call.index, "function": {"arguments": call.arguments}}
    return [{"tool_calls": [head]}, {"tool_calls": [rest]}]


def note(event: Event, turn: Turn) -> None:
    """Tell the request's context (access log, metrics) what a live turn produced."""
    if turn.replayed:
        return
    if isinstance(event, TextEvent | ToolCallEvent):
        request_context.mark_first_token()
    elif isinstance(event, DoneEvent):
        request_context.add_tokens(event.prompt_tokens, event.completion_tokens, event.compute_seconds)


class TurnStream(StreamingResponse):
    """A streamed turn that is closed however the response ends: also when the client left before
    the first byte, when the body's generator never starts (and its `finally` never runs), which
    would leave the tier's slot and a session's turn lock held."""

    def __init__(self, turn: Turn, body: AsyncIterator[bytes], headers: dict[str, str]) -> None:
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self.turn = turn

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.turn.aclose()


def stream_response(
    turn: Turn, make_chunk: ChunkMaker, include_usage: bool, headers: dict[str, str]
) -> StreamingResponse:
    return TurnStream(turn, stream(turn, make_chunk, include_usage), {**SSE_HEADERS, **headers})


async def stream(turn: Turn, make_chunk: ChunkMaker, include_usage: bool) -> AsyncIterator[bytes]:
    """The SSE body of the turn's first (only) choice."""
    try:
        yield sse(make_chunk(role=True))
        async for event in turn.choices[0].events():
            note(event, turn)
            if isinstance(event, TextEvent):
                yield sse(make_chunk(text=event.text, logprobs=event.logprobs))
            elif isinstance(event, ToolCallEvent):
                for delta in tool_call_deltas(event):
                    yield sse(make_chunk(delta=delta))
            elif isinstance(event, DoneEvent):
                yield sse(make_chunk(finish=finish_reason(event)))
                if include_usage:
                    yield sse(make_chunk(usage=usage(event.prompt_tokens, event.completion_tokens)))
                yield b"data: [DONE]\n\n"
                return
            else:
                yield sse(event.error.body())
                return
    finally:
        await turn.aclose()


# ---------------------------------------------------------------- whole responses


@dataclass
class ChoiceResult:
    text: str
    done: DoneEvent
    calls: list[ToolCallEvent] = field(default_factory=list)
    logprobs: JsonObject | None = None  # an upstream's, its pieces' lists joined


def merge_logprobs(whole: JsonObject | None, piece: JsonObject) -> JsonObject:
    """The logprobs of a whole answer from its pieces': each list field joined (chat's `content`,
    completions' `tokens`, `token_logprobs`, `top_logprobs`, `text_offset`); other fields kept."""
    if whole is None:
        return {k: list(v) if isinstance(v, list) else v for k, v in piece.items()}
    for name, value in piece.items():
        held = whole.get(name)
        if isinstance(held, list) and isinstance(value, list):
            held.extend(value)
        elif name not in whole or held is None:
            whole[name] = list(value) if isinstance(value, list) else value
    return whole


async def collect(turn: Turn, client_gone: Awaitable[None] | None = None) -> list[ChoiceResult]:
    """Every choice's result; the first error is raised and the other choices are cancelled. When
    `client_gone` finishes first (the client disconnected), the turn is cancelled at once."""
    results = asyncio.ensure_future(asyncio.gather(*(_collect(choice, turn) for choice in turn.choices)))
    watcher = asyncio.ensure_future(client_gone) if client_gone is not None else None
    try:
        if watcher is not None:
            await asyncio.wait({results, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if not results.done():
                results.cancel()
                results.add_done_callback(_retrieved)  # a cancelled gather unread logs a stack when collected
                raise ClientGone("The client disconnected before the answer was ready")
        return list(await results)
    finally:
        if watcher is not None:
            watcher.cancel()
        await turn.aclose()


def _retrieved(future: asyncio.Future[list[ChoiceResult]]) -> None:
    if not future.cancelled():
        future.exception()


async def disconnected(request: Request) -> None:
    """Returns when the client of a request whose body was read disconnects (never for a live one)."""
    while (await request.receive())["type"] != "http.disconnect":
        continue


async def _collect(choice: Choice, turn: Turn) -> ChoiceResult:
    pieces: list[str] = []
    calls: list[ToolCallEvent] = []
    logprobs: JsonObject | None = None
    async for event in choice.events():
        note(event, turn)
        if isinstance(event, TextEvent):
            pieces.append(event.text)
            if event.logprobs is not None:
                logprobs = merge_logprobs(logprobs, event.logprobs)
        elif isinstance(event, ToolCallEvent):
            calls.append(event)
        elif isinstance(event, ErrorEvent):
            raise event.error
        else:
            return ChoiceResult("".join(pieces), event, calls, logprobs)
    raise RuntimeError("a choice ended without a done or error event")


def usage_of(turn: Turn, results: list[ChoiceResult]) -> JsonObject:
    completion = turn.recorded_completion_tokens if turn.replayed else sum(r.done.completion_tokens for r in results)
    return usage(turn.prompt_tokens, completion)


def timing_headers(turn: Turn, results: list[ChoiceResult]) -> dict[str, str]:
    if turn.replayed or not results:
        return {}
    done = [r.done for r in results]
    return {
        "X-Queue-Time-Ms": f"{max(d.queue_seconds for d in done) * 1000:.1f}",
        "X-Compute-Time-Ms": f"{max(d.compute_seconds for d in done) * 1000:.1f}",
    }
