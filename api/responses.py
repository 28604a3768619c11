"""Routes for OpenAI's Responses API: create, retrieve and delete a response, and list its input items.

A Responses request becomes a chat request: the instructions, the conversation behind
`previous_response_id` and the input items become its messages; function tools, `tool_choice` and
`text.format` its tools and `response_format`. It runs as any chat turn (chat/turn.py: cache, lease,
tool shaping), and its events are formatted as one Response object or as the Responses event stream
(api/response_events.py). With `store` (the default) the response, its input items and the
conversation up to it are kept with the sessions (sessions/conversations.py), for
`previous_response_id`, `GET /v1/responses/{id}` and its `input_items`.
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from api.chat import chat_turn_request, resolve, response_headers, start
from api.response_events import Draft
from api.schemas import (
    MAX_ID_LENGTH,
    ChatCompletionRequest,
    ResponseContent,
    ResponseInputItem,
    ResponsesRequest,
)
from api.sessions import conversations, owner_of, page_view
from api.sse import SSE_HEADERS, collect, disconnected, timing_headers, usage_of
from core.errors import InvalidRequest
from core.turns import JsonObject, JsonValue, Message, Turn
from sessions import history
from sessions.conversations import new_id

router = APIRouter()

TEXT_PARTS = frozenset({"input_text", "output_text", "text"})


# ---------------------------------------------------------------- Responses request -> chat request


def _text(content: ResponseContent | None, param: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    for i, part in enumerate(content):
        if part.type not in TEXT_PARTS:
            raise InvalidRequest(f"content of type {part.type!r} is not supported (only text)", param=f"{param}.{i}")
    return "".join(part.text or "" for part in content)


def input_messages(body: ResponsesRequest) -> tuple[list[Message], list[JsonValue]]:
    """The input as chat messages, and as the input items kept for `input_items` (each with an id)."""
    items = [ResponseInputItem(role="user", content=body.input)] if isinstance(body.input, str) else body.input
    messages: list[Message] = []
    kept: list[JsonValue] = []
    for i, item in enumerate(items):
        kind, param = item.type or "message", f"input.{i}"
        if kind == "message":
            if item.role is None:
                raise InvalidRequest("A message item needs a role", param=f"{param}.role")
            text = _text(item.content, f"{param}.content")
            messages.append({"role": item.role, "content": text})
            part = "output_text" if item.role == "assistant" else "input_text"
            kept.append(_item(item, "msg", role=item.role, content=[{"type": part, "text": text}]))
        elif kind == "function_call":
            if not item.call_id or not item.name:
                raise InvalidRequest("A function_call item needs a call_id and a name", param=param)
            arguments = item.arguments or "{}"
            call: JsonObject = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":  # calls after the text of the same reply
                last["tool_calls"] = [*last.get("tool_calls", []), call]
                last["content"] = last.get("content") or None
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            kept.append(_item(item, "fc", call_id=item.call_id, name=item.name, arguments=arguments))
        elif kind == "function_call_output":
            if not item.call_id or item.output is None:
                raise InvalidRequest("A function_call_output item needs a call_id and an output", param=param)
            output = _text(item.output, f"{param}.output")
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": output})
            kept.append(_item(item, "fco", call_id=item.call_id, output=output))
        elif kind != "reasoning":  # we never make reasoning items; one from elsewhere carries nothing for us
            raise InvalidRequest(
                f"Input items of type {kind!r} are not supported (message, function_call, function_call_output)",
                param=f"{param}.type",
            )
    return messages, kept


def _item(item: ResponseInputItem, prefix: str, **fields: JsonValue) -> JsonObject:
    return {"id": item.id or new_id(prefix), "type": item.type or "message", **fields, "status": "completed"}


def chat_body(body: ResponsesRequest, messages: tuple[Message, ...]) -> ChatCompletionRequest:
    """The chat request a Responses request amounts to, on `messages`; a bad field is a 400 naming it."""
    tools: list[JsonValue] = []
    for i, tool in enumerate(body.tools or []):
        if tool.type != "function":
            raise InvalidRequest(f"Tools of type {tool.type!r} are not supported (only function)", param=f"tools.{i}")
        function = tool.model_dump(include={"name", "description", "parameters", "strict"}, exclude_none=True)
        tools.append({"type": "function", "function": function})
    wire: JsonObject = {
        "model": body.model,
        "messages": list(messages),  # type: ignore[dict-item]
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_completion_tokens": body.max_output_tokens,
        "tools": tools or None,
        "tool_choice": _tool_choice(body.tool_choice),
        "parallel_tool_calls": body.parallel_tool_calls,
        "response_format": _response_format(body),
        "stream": body.stream,
    }
    try:
        return ChatCompletionRequest.model_validate(wire)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from None


def _tool_choice(choice: str | dict[str, object] | None) -> JsonValue:
    if not isinstance(choice, dict):
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise InvalidRequest('tool_choice must be a mode or {"type": "function", "name": "..."}', param="tool_choice")
    return {"type": "function", "function": {"name": choice["name"]}}


def _response_format(body: ResponsesRequest) -> JsonValue:
    spec = body.text.format if body.text is not None else None
    if spec is None or spec.type == "text":
        return None
    if spec.type == "json_object":
        return {"type": "json_object"}
    if spec.json_schema is None:
        raise InvalidRequest("text.format of type json_schema needs a 'schema'", param="text.format.schema")
    return {"type": "json_schema", "json_schema": {"name": spec.name or "output", "schema": spec.json_schema}}


# ---------------------------------------------------------------- routes


@router.post("/responses")
async def create_response(body: ResponsesRequest, request: Request) -> Response:
    owner, keeper = owner_of(request), conversations(request)
    previous = await keeper.response_history(owner, body.previous_response_id) if body.previous_response_id else []
    new, items = input_messages(body)
    if not new:
        raise InvalidRequest("The input has no message", param="input")
    head: list[Message] = [{"role": "system", "content": body.instructions}] if body.instructions else []
    chat_turn_request(chat_body(body, (*head, *previous, *new)))  # bad tools or formats: a 400 before routing
    resolution, tier = resolve(request, body.model, body.priority)

    async def begin(messages: tuple[Message, ...]) -> Turn:
        return await start(request, tier, "chat.completions", chat_turn_request(chat_body(body, messages)))

    turn, kept, _ = await history.start_fitting(head, previous, new, begin, trim=body.truncation == "auto")

    async def keep(response: JsonObject, reply: Message) -> None:
        if body.store:
            await keeper.save_response(owner, str(response["id"]), response, items, [*kept, *new, reply])

    draft = Draft(body, new_id("resp"))
    headers = response_headers(resolution, turn)
    if body.stream:
        return StreamingResponse(
            draft.stream(turn, keep), media_type="text/event-stream", headers={**SSE_HEADERS, **headers}
        )
    results = await collect(turn, disconnected(request))
    response, reply = draft.whole(results[0], usage_of(turn, results))
    await keep(response, reply)
    return JSONResponse(response, headers={**headers, **timing_headers(turn, results)})


@router.get("/responses/{response_id}")
async def get_response(response_id: str, request: Request) -> JSONResponse:
    record = await conversations(request).find(owner_of(request), "response", response_id)
    return JSONResponse(record.body.get("response"))


@router.delete("/responses/{response_id}")
async def delete_response(response_id: str, request: Request) -> JSONResponse:
    await conversations(request).delete(owner_of(request), "response", response_id)
    return JSONResponse({"id": response_id, "object": "response", "deleted": True})


@router.get("/responses/{response_id}/input_items")
async def list_input_items(
    response_id: str,
    request: Request,
    limit: int = Query(default=20, ge=1, le=100),
    order: Literal["asc", "desc"] = "desc",
    after: str | None = Query(default=None, max_length=MAX_ID_LENGTH),
) -> JSONResponse:
    record = await conversations(request).find(owner_of(request), "response", response_id)
    stored = record.body.get("input_items")
    items = [item for item in (stored if isinstance(stored, list) else []) if isinstance(item, dict)]
    if order == "desc":
        items.reverse()
    ids = [item.get("id") for item in items]
    if after is not None and after not in ids:
        raise InvalidRequest(f"No input item with id {after!r} to list after", param="after")
    start_at = ids.index(after) + 1 if after is not None else 0
    chosen: list[JsonValue] = list(items[start_at : start_at + limit])
    return JSONResponse(page_view(chosen, start_at + limit < len(items)))
