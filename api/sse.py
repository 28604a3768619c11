"""Streams between a model's owner thread and the event loop, and their SSE framing.

A job's events (text, done, error) cross from the scheduler thread through a per-request asyncio
queue; `RunningJob` reads them, `stream_events` turns them into `data: {...}` chunks ending with
`data: [DONE]` (or one error event), and the cancel flag is set whenever the reader leaves early.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from chat.scheduler import ChatScheduler, DoneEvent, ErrorEvent, Event, TextEvent
from core.errors import RequestCancelled, ServiceError
from core.protocols import GenerationJob, SamplingParams
from middleware import request_context

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class RunningJob:
    """A submitted job plus the asyncio side of its event stream."""

    job: GenerationJob
    queue: asyncio.Queue[Event]
    scheduler: ChatScheduler
    done: DoneEvent | None = None
    chunks: list[str] = field(default_factory=list)

    def cancel(self) -> None:
        if self.done is None:
            self.job.cancelled.set()
            self.scheduler.wake()

    async def events(self) -> AsyncIterator[str]:
        """Text pieces until the job ends; raises the job's error."""
        while self.done is None:
            event = await self.queue.get()
            if isinstance(event, TextEvent):
                self.chunks.append(event.text)
                request_context.mark_first_token()
                yield event.text
            elif isinstance(event, DoneEvent):
                self.done = event
                request_context.add_tokens(event.prompt_tokens, event.completion_tokens, event.compute_seconds)
                if event.finish_reason == "cancelled":
                    raise RequestCancelled("The request was stopped by the server (tier unloaded or shutting down)")
            elif isinstance(event, ErrorEvent):
                self.done = DoneEvent("error", len(self.job.prompt_tokens), self.job.completion_tokens, 0.0, 0.0)
                raise event.error

    async def collect(self) -> str:
        return "".join([piece async for piece in self.events()])


def submit(scheduler: ChatScheduler, prompt: list[int], params: SamplingParams) -> RunningJob:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()
    job = GenerationJob(prompt_tokens=prompt, params=params)
    scheduler.submit(job, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event))
    return RunningJob(job, queue, scheduler)


@contextlib.asynccontextmanager
async def cancel_on_exit(jobs: list[RunningJob]) -> AsyncIterator[None]:
    """Jobs still running when the handler leaves (client gone, error) are cancelled at once."""
    try:
        yield
    finally:
        for running in jobs:
            running.cancel()


def timing_headers(done: list[DoneEvent]) -> dict[str, str]:
    if not done:
        return {}
    return {
        "X-Queue-Time-Ms": f"{max(d.queue_seconds for d in done) * 1000:.1f}",
        "X-Compute-Time-Ms": f"{max(d.compute_seconds for d in done) * 1000:.1f}",
    }


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def sse(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()


class TextShaper:
    """Turns text pieces into chunk arguments one to one (tool_calling.ToolStreamShaper buffers calls)."""

    def feed(self, piece: str) -> list[dict[str, Any]]:
        return [{"text": piece}]

    def end(self, done: DoneEvent) -> tuple[list[dict[str, Any]], str]:
        return [], finish_reason(done)


OnComplete = Callable[[Any], Awaitable[None]]


async def stream_events(
    running: Any,
    make_chunk: Any,
    include_usage: bool,
    release: Any,
    shaper: Any = None,
    on_complete: OnComplete | None = None,
) -> AsyncIterator[bytes]:
    """The SSE body: one chunk per text piece, a final chunk, usage if asked, then [DONE].

    `running` is a RunningJob or a cache replay (http_cache.CachedRun); `on_complete` sees a stream
    that ran to its end (it fills the cache). An error after the stream started is one
    `data: {"error": ...}` event and no [DONE].
    """
    shaper = shaper or TextShaper()
    try:
        yield sse(make_chunk(role=True))
        async for piece in running.events():
            for kwargs in shaper.feed(piece):
                yield sse(make_chunk(**kwargs))
        done = running.done
        assert done is not None
        if on_complete is not None:
            await on_complete(running)
        tail, finish = shaper.end(done)
        for kwargs in tail:
            yield sse(make_chunk(**kwargs))
        yield sse(make_chunk(finish=finish))
        if include_usage:
            yield sse(make_chunk(usage=usage(done.prompt_tokens, done.completion_tokens)))
        yield b"data: [DONE]\n\n"
    except ServiceError as exc:
        yield sse(exc.body())
    finally:
        running.cancel()
        await release()


def finish_reason(done: DoneEvent | None) -> str:
    reason = done.finish_reason if done else "stop"
    return "length" if reason == "length" else "stop"


def chunk_maker(
    id_prefix: str, object_name: str, model: str, include_usage: bool, choice: Callable[..., dict[str, Any]]
) -> Callable[..., dict[str, Any]]:
    """Builds the chunks of one stream: one id and `created`, the endpoint's choice shape, and `usage`
    on every chunk when the client asked for it (null except on the final `choices: []` chunk)."""
    completion_id = f"{id_prefix}-{uuid.uuid4().hex}"
    created = int(time.time())

    def make_chunk(usage: Any = None, **kwargs: Any) -> dict[str, Any]:
        chunk: dict[str, Any] = {"id": completion_id, "object": object_name, "created": created, "model": model}
        chunk["choices"] = [] if usage is not None else [choice(**kwargs)]
        if include_usage:
            chunk["usage"] = usage
        return chunk

    return make_chunk
