"""A fault-injecting OpenAI/TEI upstream for remote-tier tests: a small FastAPI app a test runs with
`LiveServer` on 127.0.0.1 and steers through its fields (status to answer, where to stall or die).

It answers chat "<name>: <last message>" (or the text after "SAY:") in three streamed pieces, with
a role chunk first and a usage chunk before `[DONE]`, as vLLM does; with tools offered it calls the
first one, its arguments streamed in two fragments. It records every request body it was sent.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests.waiting import DEADLINE_S

STALL_S = 3600.0  # "forever": the proxy gives up first and drops the connection, which ends the stall


@dataclass
class StandIn:
    name: str
    status: int | None = None  # answer every request with this status (and an OpenAI error body)
    error_code: str = "upstream_says_no"
    retry_after: str | None = None
    stall_before_first: bool = False  # 200 and a role chunk, then nothing
    stall_after_first: bool = False  # one piece, then nothing
    die_after_first: bool = False  # one piece, then the connection drops
    error_after_first: bool = False  # one piece, then an error event
    error_event_first: bool = False  # an error event before any piece
    gate: threading.Event | None = None  # when set by a test, answers wait for it
    requests: list[dict[str, Any]] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    models: tuple[str, ...] = ("upstream-model",)
    held: int = 0  # requests waiting on the gate now
    pace_tokens: int = 0  # > 0: chat streams this many one-word chunks instead (bench/bench_remote.py) ...
    pace_s: float = 0.0  # ... one every `pace_s` seconds, as a GPU server generates
    health: int | None = None  # GET /health answers this status (None: no such route, 404)
    health_probes: int = 0
    context_chars: int | None = None  # chat messages longer than this in all get a context-length 400
    context_style: str = "openai"  # that 400's body: "openai" (code) or "llama-server" (type)

    def reply(self, body: dict[str, Any]) -> str:
        if "messages" in body:
            last = str(body["messages"][-1].get("content") or "")
        else:
            prompt = body.get("prompt")
            last = str(prompt[0] if isinstance(prompt, list) else prompt)
        return last[len("SAY:") :] if last.startswith("SAY:") else f"{self.name}: {last}"


def _too_long(stand_in: StandIn, body: dict[str, Any]) -> Response | None:
    if stand_in.context_chars is None:
        return None
    used = sum(len(str(m.get("content") or "")) for m in body.get("messages") or [])
    if used <= stand_in.context_chars:
        return None
    message = f"{used} characters, but this model's context holds {stand_in.context_chars}"
    if stand_in.context_style == "llama-server":
        error = {"code": 400, "message": message, "type": "exceed_context_size_error"}
    else:
        error = {
            "message": message,
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    return JSONResponse({"error": error}, status_code=400)


def _pieces(text: str) -> list[str]:
    third = max(1, len(text) // 3)
    return [p for p in (text[:third], text[third : 2 * third], text[2 * third :]) if p]


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def build(stand_in: StandIn) -> FastAPI:
    app = FastAPI()

    async def admitted(request: Request) -> tuple[dict[str, Any], Response | None]:
        body = await request.json()
        stand_in.requests.append(body)
        stand_in.paths.append(request.url.path)
        if stand_in.gate is not None:
            stand_in.held += 1
            try:
                await anyio.to_thread.run_sync(stand_in.gate.wait, DEADLINE_S)
            finally:
                stand_in.held -= 1
        too_long = _too_long(stand_in, body)
        if too_long is not None:
            return body, too_long
        if stand_in.status is not None:
            error = {"error": {"message": f"{stand_in.name} refuses", "type": "x", "code": stand_in.error_code}}
            headers = {"Retry-After": stand_in.retry_after} if stand_in.retry_after else {}
            return body, JSONResponse(error, status_code=stand_in.status, headers=headers)
        return body, None

    @app.get("/health")
    async def health() -> Response:
        stand_in.health_probes += 1
        return JSONResponse({"status": "ok"}, status_code=stand_in.health or 404)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": m, "object": "model"} for m in stand_in.models]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        body, refused = await admitted(request)
        if refused is not None:
            return refused
        if not body.get("stream"):
            message = {"role": "assistant", "content": stand_in.reply(body)}
            usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
            return JSONResponse(
                {"choices": [{"index": 0, "message": message, "finish_reason": "stop"}], "usage": usage}
            )
        return StreamingResponse(_chat_stream(stand_in, body), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body, refused = await admitted(request)
        if refused is not None:
            return refused
        return StreamingResponse(_completion_stream(stand_in, body), media_type="text/event-stream")

    @app.post("/v1/embeddings")
    async def embeddings(request: Request) -> Response:
        body, refused = await admitted(request)
        if refused is not None:
            return refused
        data = [{"object": "embedding", "index": i, "embedding": _vector(t)} for i, t in enumerate(body["input"])]
        usage = {"prompt_tokens": 2 * len(body["input"]), "total_tokens": 2 * len(body["input"])}
        return JSONResponse({"object": "list", "data": data, "model": body.get("model"), "usage": usage})

    @app.post("/v1/rerank")
    async def rerank(request: Request) -> Response:
        body, refused = await admitted(request)
        if refused is not None:
            return refused
        scores = [_overlap(body["query"], doc) for doc in body["documents"]]
        results = [{"index": i, "relevance_score": s} for i, s in enumerate(scores)]
        return JSONResponse({"results": sorted(results, key=lambda r: -r["relevance_score"])})

    @app.post("/embed")
    async def tei_embed(request: Request) -> Response:
        body, refused = await admitted(request)
        if refused is not None:
            return refused
        return JSONResponse([_vector(t) for t in body["inputs"]])

    @app.post("/rerank")
    async def tei_rerank(request: Request) -> Response:
        body, refused = await admitted(request)
        if refused is not None:
            return refused
        scores = [_overlap(body["query"], text) for text in body["texts"]]
        return JSONResponse([{"index": i, "score": s} for i, s in enumerate(scores)])

    return app


def _vector(text: str) -> list[float]:
    return [float(len(text)), float(text.count("a")), 1.0]


def _overlap(query: str, document: str) -> float:
    """A relevance in [0, 1]: the share of the query's words the document has."""
    words = set(query.lower().split())
    return len(words & set(document.lower().split())) / max(1, len(words))


def _chunk(content: dict[str, Any] | None, finish: str | None = None, logprobs: bool = False) -> dict[str, Any]:
    choice: dict[str, Any] = {"index": 0, "delta": content or {}, "finish_reason": finish}
    text = (content or {}).get("content")
    if logprobs and text:  # OpenAI's shape: one entry per token (here, per piece)
        choice["logprobs"] = {"content": [{"token": text, "logprob": -0.5, "bytes": None, "top_logprobs": []}]}
    return {"id": "chatcmpl-up", "object": "chat.completion.chunk", "model": "upstream-model", "choices": [choice]}


async def _faults(stand_in: StandIn, first: bytes) -> AsyncIterator[bytes]:
    """The scripted failures around the first piece."""
    if stand_in.error_event_first:
        yield _sse({"error": {"message": "the upstream hit a snag", "type": "server_error", "code": "snag"}})
        return
    if stand_in.stall_before_first:
        await asyncio.sleep(STALL_S)
    yield first
    if stand_in.stall_after_first:
        await asyncio.sleep(STALL_S)
    if stand_in.die_after_first:
        raise RuntimeError("the upstream died mid-stream")  # uvicorn drops the connection mid-body
    if stand_in.error_after_first:
        yield _sse({"error": {"message": "the upstream ran out of memory", "type": "server_error", "code": "oom"}})
        await asyncio.sleep(STALL_S)  # and says nothing more: the error event is what counts


async def _chat_stream(stand_in: StandIn, body: dict[str, Any]) -> AsyncIterator[bytes]:
    yield _sse(_chunk({"role": "assistant", "content": ""}))
    if body.get("tools"):
        name = body["tools"][0]["function"]["name"]
        head = {"index": 0, "id": "call_up1", "type": "function", "function": {"name": name, "arguments": ""}}
        yield _sse(_chunk({"tool_calls": [head]}))
        for part in ('{"city": ', '"Paris"}'):
            yield _sse(_chunk({"tool_calls": [{"index": 0, "function": {"arguments": part}}]}))
        yield _sse(_chunk(None, "tool_calls"))
    elif stand_in.pace_tokens:
        for _ in range(stand_in.pace_tokens):
            await asyncio.sleep(stand_in.pace_s)
            yield _sse(_chunk({"content": "tok "}))
        yield _sse(_chunk(None, "length"))
    else:
        pieces = _pieces(stand_in.reply(body)) or [""]
        logprobs = bool(body.get("logprobs"))
        async for data in _faults(stand_in, _sse(_chunk({"content": pieces[0]}, logprobs=logprobs))):
            yield data
        if stand_in.error_event_first:
            return
        for piece in pieces[1:]:
            yield _sse(_chunk({"content": piece}, logprobs=logprobs))
        yield _sse(_chunk(None, "stop"))
    usage = {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    yield _sse({"id": "chatcmpl-up", "object": "chat.completion.chunk", "choices": [], "usage": usage})
    yield b"data: [DONE]\n\n"


async def _completion_stream(stand_in: StandIn, body: dict[str, Any]) -> AsyncIterator[bytes]:
    n = int(body.get("n", 1))
    for index in range(n):
        for piece in _pieces(stand_in.reply(body)):
            choice: dict[str, Any] = {"index": index, "text": piece, "finish_reason": None}
            if body.get("logprobs") is not None:
                choice["logprobs"] = {"tokens": [piece], "token_logprobs": [-0.25], "top_logprobs": [None]}
            yield _sse({"object": "text_completion", "choices": [choice]})
        yield _sse({"object": "text_completion", "choices": [{"index": index, "text": "", "finish_reason": "length"}]})
    yield _sse({"object": "text_completion", "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 6}})
    yield b"data: [DONE]\n\n"
