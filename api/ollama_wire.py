"""Ollama's request bodies, and their translation into the OpenAI requests the turn seam already takes.

An Ollama chat or generate request becomes a `ChatCompletionRequest` (or a `CompletionRequest` for
`raw` generation), so it is validated with the same bounds, builds the same `TurnRequest` through
api/chat.py, shares cache entries with the same OpenAI request, and reaches a remote tier as OpenAI
JSON. `options` map onto our sampling fields; options with no counterpart here (num_ctx, mirostat,
num_thread, ...) are ignored, as Ollama ignores options a runner does not know.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from api.schemas import (
    MAX_EMBEDDING_INPUTS,
    MAX_MESSAGES,
    MAX_TEXT_CHARS,
    ChatCompletionRequest,
    CompletionRequest,
    ModelName,
    Tool,
    check_json,
)
from core.errors import InvalidRequest
from core.turns import JsonObject

# Ollama option -> our field (OpenAI's name where there is one).
OPTION_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "stop": "stop",
    "repeat_penalty": "repeat_penalty",
    "frequency_penalty": "frequency_penalty",
    "presence_penalty": "presence_penalty",
    "num_predict": "max_tokens",  # -1 (until the context is full) and -2 mean the tier's default here
}
_OLLAMA_PARAM = {ours: f"options.{theirs}" for theirs, ours in OPTION_FIELDS.items()}

Format = Literal["", "json"] | dict[str, Any] | None
KeepAlive = float | str | None
M = TypeVar("M", bound=BaseModel)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _plain_json(cls, data: object) -> object:
        check_json(data)  # lone surrogates and deep nesting, as for every OpenAI body
        return data


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(max_length=256)
    arguments: dict[str, Any] = Field(default_factory=dict)  # an object, where OpenAI sends JSON text


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = Field(default="", max_length=MAX_TEXT_CHARS)
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=128)
    tool_name: str | None = Field(default=None, max_length=256)


class Generation(_Body):
    model: ModelName
    format: Format = None
    options: dict[str, Any] | None = None
    stream: bool = True
    keep_alive: KeepAlive = None


class ChatBody(Generation):
    messages: list[Message] = Field(default_factory=list, max_length=MAX_MESSAGES)
    tools: list[Tool] | None = Field(default=None, max_length=128)


class GenerateBody(Generation):
    prompt: str = Field(default="", max_length=MAX_TEXT_CHARS)
    system: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    suffix: str | None = None
    raw: bool = False
    images: list[str] | None = None


EmbedText = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]


class EmbedBody(_Body):
    model: ModelName
    input: EmbedText | Annotated[list[EmbedText], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    truncate: bool = True
    dimensions: int | None = Field(default=None, ge=1, le=65_536)
    keep_alive: KeepAlive = None


class EmbeddingsBody(_Body):
    model: ModelName
    prompt: EmbedText = ""
    keep_alive: KeepAlive = None


class ShowBody(_Body):
    model: str | None = Field(default=None, max_length=256)
    name: str | None = Field(default=None, max_length=256)  # older clients

    def model_name(self) -> str:
        name = self.model or self.name
        if not name:
            raise InvalidRequest("Missing required parameter: 'model'", param="model")
        return name


# ---------------------------------------------------------------- parsing and translation


def parse(raw: bytes, model: type[M]) -> M:
    """A body validated into `model`. Read from bytes, not by content type: Ollama's own curl examples
    send JSON with `-d` alone (form-encoded by curl's default)."""
    try:
        data = json.loads(raw or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise InvalidRequest("The request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidRequest("The request body must be a JSON object")
    return validated(model, data)


def validated(model: type[M], data: object, names: dict[str, str] | None = None) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first.get("loc", ()))
        param = (names or {}).get(param, param)
        raise InvalidRequest(
            f"Invalid value for {param!r}: {first.get('msg', 'invalid')}", param=param or None
        ) from None


def sampling_fields(options: dict[str, Any] | None) -> JsonObject:
    out: JsonObject = {}
    for name, value in (options or {}).items():
        field = OPTION_FIELDS.get(name)
        if field is None or value is None:
            continue
        if field == "max_tokens" and isinstance(value, int) and not isinstance(value, bool) and value <= 0:
            continue
        out[field] = value
    return out


def response_format(value: Format) -> JsonObject | None:
    if value is None or value == "":
        return None
    if value == "json":
        return {"type": "json_object"}
    return {"type": "json_schema", "json_schema": {"name": "format", "schema": value}}


def _content(text: str, images: list[str] | None) -> str | list[JsonObject]:
    """Ollama sends images as bare base64 beside the text; OpenAI's wire has them as data: URI parts, which
    the vision path (api/images.py) decodes and checks, whatever the image's format."""
    if not images:
        return text
    parts: list[JsonObject] = [{"type": "text", "text": text}] if text else []
    parts += [{"type": "image_url", "image_url": {"url": f"data:image;base64,{image}"}} for image in images]
    return parts


def openai_messages(messages: list[Message]) -> list[JsonObject]:
    out: list[JsonObject] = []
    for index, message in enumerate(messages):
        entry: JsonObject = {"role": message.role, "content": _content(message.content, message.images)}
        if message.tool_calls:
            entry["tool_calls"] = [
                {
                    "id": f"call_{index}_{i}",
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": json.dumps(call.function.arguments)},
                }
                for i, call in enumerate(message.tool_calls)
            ]
        if message.role == "tool" and message.tool_name:
            entry["name"] = message.tool_name
        out.append(entry)
    return out


def _common(body: Generation) -> JsonObject:
    data: JsonObject = {"model": body.model, "stream": body.stream, **sampling_fields(body.options)}
    fmt = response_format(body.format)
    if fmt is not None:
        data["response_format"] = fmt
    return data


def chat_request(body: ChatBody) -> ChatCompletionRequest:
    data = {**_common(body), "messages": openai_messages(body.messages)}
    if body.tools:
        data["tools"] = [tool.model_dump(exclude_none=True) for tool in body.tools]
    return validated(ChatCompletionRequest, data, _OLLAMA_PARAM)


def generate_request(body: GenerateBody) -> ChatCompletionRequest | CompletionRequest:
    """`raw` sends the prompt as is (a completion); otherwise it is the user turn of a chat, under
    `system` when given, so the tier's chat template applies as Ollama's template would."""
    if body.suffix:
        raise InvalidRequest("suffix (fill-in-the-middle) is not supported", param="suffix")
    if body.raw:
        if body.format:
            raise InvalidRequest("format is supported only without raw", param="format")
        if body.images:
            raise InvalidRequest("images are supported only without raw (through the chat template)", param="images")
        return validated(CompletionRequest, {**_common(body), "prompt": body.prompt}, _OLLAMA_PARAM)
    messages: list[JsonObject] = [{"role": "system", "content": body.system}] if body.system else []
    messages.append({"role": "user", "content": _content(body.prompt, body.images)})
    return validated(ChatCompletionRequest, {**_common(body), "messages": messages}, _OLLAMA_PARAM)


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: KeepAlive) -> float | None:
    """Ollama's `keep_alive` in seconds: a number of seconds, or a Go duration ("5m", "1h30m", "300ms");
    negative means for ever (math.inf); None (or "") when not given. Anything else is a 400."""
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip()
        sign, text = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.removeprefix("+"))
        try:
            seconds = sign * float(text)
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if not parts or "".join(number + unit for number, unit in parts) != text:
                raise InvalidRequest(
                    f"keep_alive {value!r} is not a duration: give seconds (300) or a duration ('5m', '1h', '-1')",
                    param="keep_alive",
                ) from None
            seconds = sign * sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
    if math.isnan(seconds):
        raise InvalidRequest("keep_alive is not a number", param="keep_alive")
    return math.inf if seconds < 0 else seconds


def keep_alive_is_zero(value: KeepAlive) -> bool:
    """`keep_alive: 0` ("0", "0s", "0m") with no prompt is how Ollama clients unload a model."""
    return keep_alive_seconds(value) == 0
