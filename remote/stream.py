"""One upstream answer read as events: the SSE stream of an OpenAI chat or completion request, each
choice's events demultiplexed by index (remote/chat.py opens it, with failover, and hands it over).

Before the first event (`start`), anything wrong is an `UpstreamFault`, which the caller turns into
another attempt, or the upstream's refusal of the request. After it (`advance`), faults end every
open choice with one error event: our client already has bytes, so nothing is retried and no `[DONE]`
is faked. Tool-call deltas are assembled into one `ToolCallEvent` per call; usage (the upstream's)
arrives with the end, so `DoneEvent`s are queued when the stream ends.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field

import httpx

from config import TierConfig
from core.errors import ClientGone, ServiceError
from core.events import DoneEvent, ErrorEvent, Event, TextEvent, ToolCallEvent
from core.turns import JsonObject, JsonValue, Turn, TurnRequest
from remote import faults
from remote.pool import Attempt, UpstreamBroke

log = logging.getLogger("llmservice.remote")
DRAIN_S = 0.25  # what follows [DONE] is the body's end, at once; a server that holds it only costs its connection


@dataclass
class ChoiceState:
    """What one choice of the upstream's answer has produced so far."""

    queue: collections.deque[Event] = field(default_factory=collections.deque)
    finish_reason: str | None = None
    ended: bool = False
    pieces: int = 0
    calls: dict[int, dict[str, str]] = field(default_factory=dict)  # tool-call index -> id, name, arguments

    def end(self, event: DoneEvent | ErrorEvent) -> None:
        if not self.ended:
            self.ended = True
            self.queue.append(event)


class Exchange:
    """One upstream response: SSE lines in, each choice's events out (demultiplexed by index)."""

    def __init__(
        self,
        config: TierConfig,
        client: httpx.AsyncClient,
        headers: Mapping[str, str],
        attempt: Attempt,
        request: TurnRequest,
        forget: Callable[[Exchange], None],
    ) -> None:
        self.config = config
        self.client = client
        self.headers = headers
        self.attempt = attempt
        self.forget = forget  # called once the exchange needs no shutting down
        self.kind = request.kind
        prompts = len(request.prompts) if request.kind == "completion" else 1
        self.states = [ChoiceState() for _ in range(request.n * max(1, prompts))]  # upstream's order
        self.turn: Turn | None = None
        self.response: httpx.Response | None = None
        self.lines: AsyncIterator[bytes] | None = None
        self.usage: JsonObject = {}
        self.prompt_tokens = 0
        self.lock = asyncio.Lock()  # one reader at a time; the others find their events queued
        self.started_at = time.perf_counter()
        self.opened = False  # some choice has an event: from now on, faults end the choices
        self.complete = False  # the upstream sent its whole answer
        self.closed = False  # we closed it: a read that breaks now is no fault

    # ------------------------------------------------------------ before the first event: faults fail over

    async def start(self, url: httpx.URL, body: bytes) -> None:
        """Send, and read until some choice has an event; raises `UpstreamFault` or the upstream's refusal."""
        config = self.config
        try:
            async with asyncio.timeout(config.first_byte_timeout):
                # Built by hand: the client's build_request (merging URLs, headers, cookies) costs more than the hop.
                timeouts = {"connect": min(10.0, config.first_byte_timeout), "read": None, "write": None, "pool": None}
                request = httpx.Request(
                    "POST", url, headers=self.headers, content=body, extensions={"timeout": timeouts}
                )
                self.response = response = await self.client.send(request, stream=True)
                if response.status_code != 200:
                    data = await _read_error(response)
                    if faults.is_fault(response.status_code):
                        after = faults.retry_after_seconds(response.headers.get("retry-after"))
                        raise faults.UpstreamFault(faults.fault_text(response.status_code, data), after)
                    raise faults.refusal(response.status_code, data)
                if not response.headers.get("content-type", "").startswith("text/event-stream"):
                    await self._whole(await response.aread())  # an upstream that does not stream
                    self.opened = True
                    return
                self.lines = self._lines(response)
                while not any(state.queue for state in self.states):
                    if not await self._read() and not self.complete:
                        raise faults.UpstreamFault("the stream ended before its first event")
                self.opened = True
        except TimeoutError:
            await self._close_response()
            raise faults.UpstreamFault(f"no first event within {config.first_byte_timeout:g}s") from None
        except httpx.HTTPError as exc:
            await self._close_response()
            raise faults.UpstreamFault(f"{type(exc).__name__}: {exc}".rstrip(": ")) from None
        except BaseException:
            await self._close_response()
            raise

    # ------------------------------------------------------------ after it: pass events through

    async def advance(self, state: ChoiceState) -> None:
        """Read until `state` has an event (errors become error events: our client got bytes already)."""
        async with self.lock:
            while not state.queue and not state.ended:
                try:
                    more = await self._read()
                except faults.UpstreamFault as fault:
                    await self._fail(fault.message)
                    return
                except TimeoutError:
                    await self._fail(f"the upstream stayed silent over {self.config.stream_idle_timeout:g}s")
                    return
                except Exception as exc:  # noqa: BLE001 - a cut connection raises whatever the transport raises
                    await self._fail(f"the upstream connection broke ({type(exc).__name__})")
                    return
                if not more:
                    return

    async def _lines(self, response: httpx.Response) -> AsyncIterator[bytes]:
        """The body's lines as bytes (SSE is line-based and its JSON parses from bytes). Once the first
        event is in, each network read may wait `STREAM_IDLE_TIMEOUT` (before it, `start`'s deadline
        bounds them all): a timeout per read, not per line, as one read often holds several lines."""
        chunks = response.aiter_bytes()
        pending = b""
        while True:
            if self.opened:
                async with asyncio.timeout(self.config.stream_idle_timeout):
                    chunk = await anext(chunks, None)
            else:
                chunk = await anext(chunks, None)
            if chunk is None:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line
        if pending:
            yield pending

    async def _read(self) -> bool:
        """Handle the next SSE data line; False once the stream is over."""
        assert self.lines is not None
        while True:
            line = await anext(self.lines, None)
            if line is None:
                if all(state.finish_reason is not None for state in self.states):
                    self._done()  # some servers end without [DONE]
                    return False
                raise faults.UpstreamFault("the upstream stream ended mid-answer")
            field_name, _, data = line.rstrip(b"\r").partition(b":")
            if field_name not in (b"data", b"error") or not data.strip():
                continue  # comments, event names, blank separators
            data = data.strip()
            if data == b"[DONE]":
                self._done()
                return False
            try:
                chunk = json.loads(data)
            except ValueError:
                raise faults.UpstreamFault("the upstream sent a chunk that is not JSON") from None
            if field_name == b"error" or (isinstance(chunk, dict) and "error" in chunk):
                self._upstream_error(chunk)
                return False
            if isinstance(chunk, dict):
                self._dispatch(chunk)
                return True

    def _dispatch(self, chunk: JsonObject) -> None:
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]  # type: ignore[assignment]
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", 0)
            if not isinstance(index, int) or not 0 <= index < len(self.states):
                continue
            state = self.states[index]
            delta = choice.get("delta") if self.kind == "chat" else choice
            delta = delta if isinstance(delta, dict) else {}
            text = delta.get("content") if self.kind == "chat" else delta.get("text")
            text = text if isinstance(text, str) else ""
            logprobs = choice.get("logprobs")
            logprobs = logprobs if isinstance(logprobs, dict) and logprobs else None
            if text or logprobs is not None:
                state.pieces += 1 if text else 0
                state.queue.append(TextEvent(text, logprobs))
            calls = delta.get("tool_calls")
            for call in calls if isinstance(calls, list) else []:
                _add_call_fragment(state, call)
            finish = choice.get("finish_reason")
            if isinstance(finish, str) and state.finish_reason is None:
                state.finish_reason = finish
                _emit_calls(state)

    async def _whole(self, raw: bytes) -> None:
        """A plain JSON answer (the upstream ignored `stream`): the same events, all at once."""
        try:
            answer = json.loads(raw)
        except ValueError:
            raise faults.UpstreamFault("the upstream's answer is not JSON") from None
        if not isinstance(answer, dict):
            raise faults.UpstreamFault("the upstream's answer is not a JSON object")
        for choice in answer.get("choices") or []:
            if isinstance(choice, dict) and self.kind == "chat":
                choice = {**choice, "delta": choice.get("message") or {}}
            self._dispatch({"choices": [choice]})
        if isinstance(answer.get("usage"), dict):
            self.usage = answer["usage"]
        self._done()

    def _done(self) -> None:
        """The upstream finished: each choice ends with its finish reason and the upstream's usage."""
        prompt = self.prompt_tokens = _count(self.usage.get("prompt_tokens"))
        completion = self.usage.get("completion_tokens")
        elapsed = time.perf_counter() - self.started_at
        if self.turn is not None:
            self.turn.prompt_tokens = prompt
        self.complete = True
        for index, state in enumerate(self.states):
            _emit_calls(state)
            # The upstream counts all choices together: the total goes on the first, so sums stay right.
            tokens = (_count(completion) if index == 0 else 0) if isinstance(completion, int) else state.pieces
            state.end(DoneEvent(state.finish_reason or "stop", prompt, tokens, compute_seconds=elapsed))
        self.attempt.finish("ok")
        self.forget(self)

    def _upstream_error(self, chunk: JsonValue) -> None:
        """An error event from the upstream: its message and code, passed on. Before the first event it
        is a fault (another upstream may do better); after it, the choices end with it."""
        error = faults.refusal(500, json.dumps(chunk).encode())
        if not self.opened:
            raise faults.UpstreamFault(f"error event: {error.message[:200]}")
        for state in self.states:
            state.end(ErrorEvent(error))
        self.attempt.finish("fault", f"error event: {error.message[:200]}")
        self.forget(self)

    async def _fail(self, reason: str) -> None:
        if self.closed:
            return  # we closed it ourselves (our client left): nothing to report
        log.warning("tier %s: upstream %s failed mid-answer: %s", self.config.name, self.attempt.upstream.label, reason)
        self.attempt.finish("fault", reason)
        await self.stop(UpstreamBroke(f"The upstream failed mid-answer: {reason}"))

    async def stop(self, error: ServiceError) -> None:
        """End every open choice with `error` and drop the connection (a reader waiting on it wakes)."""
        for state in self.states:
            state.end(ErrorEvent(error))
        self.closed = True
        self.attempt.finish("neutral")
        await self._close_response()

    async def aclose(self) -> None:
        """The turn is over (answer sent, client gone, server stopping): release the upstream."""
        self.closed = True
        self.attempt.finish("neutral")  # a no-op when the answer already settled it
        for state in self.states:  # a reader still waiting (it should not be) ends too
            state.end(ErrorEvent(ClientGone("The request was closed")))
        if self.complete and self.lines is not None:
            await self._drain()
        await self._close_response()

    async def _drain(self) -> None:
        """Read what follows [DONE] (the end of the chunked body), so the connection is kept for reuse."""
        assert self.lines is not None
        try:
            async with asyncio.timeout(DRAIN_S):
                while await anext(self.lines, None) is not None:
                    pass
        except Exception:  # noqa: BLE001 - it only decides whether the connection is reused
            return

    async def _close_response(self) -> None:
        self.forget(self)
        if self.response is not None:
            await self.response.aclose()


class RemoteChoice:
    """One choice of a remote turn: reads the shared upstream response when its own queue is empty."""

    def __init__(self, exchange: Exchange, state: ChoiceState) -> None:
        self.exchange = exchange
        self.state = state

    async def events(self) -> AsyncIterator[Event]:
        while True:
            while self.state.queue:
                event = self.state.queue.popleft()
                yield event
                if isinstance(event, DoneEvent | ErrorEvent):
                    return
            if self.state.ended:
                return
            await self.exchange.advance(self.state)

    def cancel(self) -> None:
        """The turn's closer (`Exchange.aclose`) drops the connection, which stops the upstream."""


def _add_call_fragment(state: ChoiceState, call: JsonValue) -> None:
    if not isinstance(call, dict):
        return
    index = call.get("index", len(state.calls))
    slot = state.calls.setdefault(index if isinstance(index, int) else 0, {"id": "", "name": "", "arguments": ""})
    function = call.get("function")
    function = function if isinstance(function, dict) else {}
    if isinstance(call.get("id"), str) and not slot["id"]:
        slot["id"] = str(call["id"])
    if isinstance(function.get("name"), str) and not slot["name"]:
        slot["name"] = str(function["name"])
    if isinstance(function.get("arguments"), str):
        slot["arguments"] += str(function["arguments"])


def _emit_calls(state: ChoiceState) -> None:
    for index in sorted(state.calls):
        slot = state.calls[index]
        state.queue.append(ToolCallEvent(index, slot["id"] or f"call_{index}", slot["name"], slot["arguments"]))
    state.calls.clear()


def _count(value: JsonValue | None) -> int:
    return int(value) if isinstance(value, int | float) else 0


async def _read_error(response: httpx.Response) -> bytes:
    data = b""
    async for part in response.aiter_bytes():
        data += part
        if len(data) >= faults.MAX_ERROR_BYTES:
            break
    await response.aclose()
    return data
