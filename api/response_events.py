"""A chat turn's events as a Responses API response: one Response object, or the Responses event stream.

The stream is what the OpenAI SDK's `responses.stream` / `create(stream=True)` reads: `response.created`,
`response.in_progress`, then for a text answer `response.output_item.added`, `response.content_part.added`,
`response.output_text.delta`..., `response.output_text.done`, `response.content_part.done`,
`response.output_item.done`; for each function call `response.output_item.added`,
`response.function_call_arguments.delta`, `response.function_call_arguments.done`,
`response.output_item.done`; last `response.completed` (`response.incomplete` when the answer hit
`max_output_tokens`). An error after the stream started is one `response.failed` event carrying it.
Every event has a `sequence_number`, counted from 0.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from api.schemas import ResponsesRequest
from api.sse import ChoiceResult, note
from core.errors import ServiceError
from core.events import DoneEvent, ErrorEvent, TextEvent, ToolCallEvent
from core.turns import JsonObject, JsonValue, Message, Turn
from sessions.conversations import new_id
from sessions.history import reply_message

Keep = Callable[[JsonObject, Message], Awaitable[None]]  # stores a finished response and its reply


def usage(prompt_tokens: int, completion_tokens: int) -> JsonObject:
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {"cached_tokens": 0},
        "output_tokens": completion_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": prompt_tokens + completion_tokens,
    }


def message_item(item_id: str, text: str | None, status: str) -> JsonObject:
    """An assistant message item; `text` None: still empty (no content part yet)."""
    content: list[JsonValue] = [] if text is None else [_text_part(text)]
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def _text_part(text: str) -> JsonObject:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(item_id: str, call: ToolCallEvent, arguments: str, status: str) -> JsonObject:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call.id,
        "name": call.name,
        "arguments": arguments,
        "status": status,
    }


class Draft:
    """One response being made: its id, its time and the request fields it echoes."""

    def __init__(self, body: ResponsesRequest, response_id: str) -> None:
        self.body = body
        self.id = response_id
        self.created_at = int(time.time())

    def snapshot(self, status: str, output: list[JsonValue], used: JsonObject | None = None) -> JsonObject:
        body = self.body
        text_format = body.text.format if body.text is not None else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "background": False,
            "error": None,
            "incomplete_details": None,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "model": body.model,
            "output": output,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "previous_response_id": body.previous_response_id,
            "reasoning": {"effort": None, "summary": None},
            "store": body.store,
            "temperature": body.temperature,
            "text": {
                "format": text_format.model_dump(by_alias=True, exclude_none=True) if text_format else {"type": "text"}
            },
            "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",
            "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or []],
            "top_p": body.top_p,
            "truncation": body.truncation or "disabled",
            "usage": used,
            "user": body.user,
            "metadata": body.metadata or {},
        }

    def finished(self, output: list[JsonValue], done: DoneEvent, used: JsonObject) -> JsonObject:
        if done.finish_reason != "length":
            response = self.snapshot("completed", output, used)
        else:
            response = self.snapshot("incomplete", output, used)
            response["incomplete_details"] = {"reason": "max_output_tokens"}
        response["completed_at"] = int(time.time())
        return response

    # ------------------------------------------------------------ whole

    def whole(self, result: ChoiceResult, used: JsonObject) -> tuple[JsonObject, Message]:
        """The finished response for a collected choice, and the reply message it amounts to."""
        output: list[JsonValue] = []
        if result.text or not result.calls:
            output.append(message_item(new_id("msg"), result.text, "completed"))
        output += [call_item(new_id("fc"), call, call.arguments, "completed") for call in result.calls]
        usage_json: JsonObject = usage(_int(used.get("prompt_tokens")), _int(used.get("completion_tokens")))
        return self.finished(output, result.done, usage_json), reply_message(result.text, result.calls)

    # ------------------------------------------------------------ streamed

    async def stream(self, turn: Turn, keep: Keep) -> AsyncIterator[bytes]:
        """The event stream of the turn's choice; the turn is closed when it ends, however it ends."""
        events = _Stream(self)
        try:
            yield events.emit("response.created", response=self.snapshot("in_progress", []))
            yield events.emit("response.in_progress", response=self.snapshot("in_progress", []))
            async for event in turn.choices[0].events():
                note(event, turn)
                if isinstance(event, TextEvent):
                    for chunk in events.text(event.text):
                        yield chunk
                elif isinstance(event, ToolCallEvent):
                    for chunk in events.call(event):
                        yield chunk
                elif isinstance(event, DoneEvent):
                    for chunk in events.end():
                        yield chunk
                    used = usage(event.prompt_tokens, event.completion_tokens)
                    response = self.finished(events.output, event, used)
                    try:
                        await keep(response, reply_message("".join(events.pieces), events.calls))
                    except ServiceError as exc:
                        yield events.failed(exc)
                        return
                    kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
                    yield events.emit(kind, response=response)
                    return
                elif isinstance(event, ErrorEvent):
                    yield events.failed(event.error)
                    return
        finally:
            await turn.aclose()


class _Stream:
    """The stream's state: the sequence number, the output items so far, the open message if any."""

    def __init__(self, draft: Draft) -> None:
        self.draft = draft
        self.sequence = 0
        self.output: list[JsonValue] = []
        self.message_id: str | None = None  # the open message item
        self.message_text: list[str] = []
        self.pieces: list[str] = []  # all text, for the reply that is kept
        self.calls: list[ToolCallEvent] = []

    def emit(self, kind: str, **fields: JsonValue) -> bytes:
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n".encode()

    def _where(self) -> JsonObject:
        return {"item_id": self.message_id, "output_index": len(self.output), "content_index": 0}

    def text(self, text: str) -> list[bytes]:
        if not text:
            return []
        chunks = [] if self.message_id is not None else self._open()
        self.message_text.append(text)
        self.pieces.append(text)
        return [*chunks, self.emit("response.output_text.delta", **self._where(), delta=text, logprobs=[])]

    def _open(self) -> list[bytes]:
        self.message_id = new_id("msg")
        self.message_text = []
        item = message_item(self.message_id, None, "in_progress")
        return [
            self.emit("response.output_item.added", output_index=len(self.output), item=item),
            self.emit("response.content_part.added", **self._where(), part=_text_part("")),
        ]

    def _close(self) -> list[bytes]:
        if self.message_id is None:
            return []
        text = "".join(self.message_text)
        where = self._where()
        item = message_item(self.message_id, text, "completed")
        chunks = [
            self.emit("response.output_text.done", **where, text=text, logprobs=[]),
            self.emit("response.content_part.done", **where, part=_text_part(text)),
            self.emit("response.output_item.done", output_index=len(self.output), item=item),
        ]
        self.output.append(item)
        self.message_id = None
        return chunks

    def call(self, call: ToolCallEvent) -> list[bytes]:
        chunks = self._close()
        self.calls.append(call)
        item_id = new_id("fc")
        index = len(self.output)
        done = call_item(item_id, call, call.arguments, "completed")
        chunks += [
            self.emit(
                "response.output_item.added", output_index=index, item=call_item(item_id, call, "", "in_progress")
            ),
            self.emit(
                "response.function_call_arguments.delta", item_id=item_id, output_index=index, delta=call.arguments
            ),
            self.emit(
                "response.function_call_arguments.done",
                item_id=item_id,
                output_index=index,
                name=call.name,
                arguments=call.arguments,
            ),
            self.emit("response.output_item.done", output_index=index, item=done),
        ]
        self.output.append(done)
        return chunks

    def end(self) -> list[bytes]:
        """Close the open message; an answer with no output at all still gets one (empty) message."""
        if self.message_id is None and not self.output:
            return [*self._open(), *self._close()]
        return self._close()

    def failed(self, error: ServiceError) -> bytes:
        response = self.draft.snapshot("failed", self.output)
        response["error"] = {"code": error.code, "message": error.message}
        return self.emit("response.failed", response=response)


def _int(value: JsonValue) -> int:
    return value if isinstance(value, int) else 0
