"""Pydantic v2 wire models for the OpenAI-compatible endpoints, with bounds on every field.

Unknown fields are ignored (clients send vendor extras), except on chat and text completions, which
keep them for remote tiers' upstreams; known fields are validated strictly and a
violation becomes a 400 in the OpenAI envelope (see api/error_handlers.py). Before any field, every
request body is walked once (`check_json`): a string anywhere in it holding a lone UTF-16 surrogate
(JSON's "\\ud800" escape decodes to one) or nesting deeper than `MAX_JSON_DEPTH` is refused, since
either breaks code far downstream (UTF-8 encoding in tokenizers and the cache key digest, recursion in
schema checks and serialisers).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

MAX_TOKENS_LIMIT = 131072
MAX_STOP = 16
MAX_STOP_LENGTH = 512
MAX_MESSAGES = 2048
MAX_TEXT_CHARS = 2_000_000
MAX_N = 8
# Containers (objects, arrays) nested in a body. The deepest real bodies are JSON schemas (tools, response_format);
# structured output bounds those more tightly (chat/structured_output.MAX_SCHEMA_DEPTH).
MAX_JSON_DEPTH = 64
MAX_ID_LENGTH = 128  # session and response ids (ours are 37 characters)

ModelName = Annotated[str, Field(min_length=1, max_length=256)]

JsonPath = tuple[str | int, ...]
_SCALARS = frozenset({int, float, bool, type(None)})
_SURROGATE = "holds a lone UTF-16 surrogate (an unpaired \\ud800-\\udfff escape), which is not text"


def _has_surrogate(text: str) -> bool:
    if text.isascii():
        return False
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _dotted(path: JsonPath) -> str:
    # A key may hold the surrogate itself: escape it, or the error body could not be encoded either.
    return ".".join(str(part).encode("utf-8", "backslashreplace").decode("utf-8") for part in path) or "body"


def _refuse(kind: str, message: str, path: JsonPath) -> PydanticCustomError:
    # `param` travels in ctx: a model validator cannot set the error's loc (api/error_handlers.py reads it).
    return PydanticCustomError(kind, message, {"param": _dotted(path)})


def check_json(value: object) -> None:
    """Refuse lone surrogates in any string (keys included) and nesting deeper than MAX_JSON_DEPTH.

    Iterative, so a hostile body cannot exhaust the stack here either.
    """
    stack: list[tuple[object, JsonPath]] = [(value, ())]
    while stack:
        node, path = stack.pop()
        if isinstance(node, str):
            if _has_surrogate(node):
                raise _refuse("lone_surrogate", f"the text {_SURROGATE}", path)
            continue
        if len(path) >= MAX_JSON_DEPTH:
            raise _refuse("too_deep", f"nested more than {MAX_JSON_DEPTH} levels deep", path[:1])
        if isinstance(node, dict):
            for key, item in node.items():
                if isinstance(key, str) and _has_surrogate(key):
                    raise _refuse("lone_surrogate", f"a key {_SURROGATE}", path)
                if isinstance(item, str | dict | list):
                    stack.append((item, (*path, key)))
        elif isinstance(node, list):
            kinds = set(map(type, node))  # token-id lists hold millions of ints: skip them without a Python loop
            if kinds <= _SCALARS:
                continue
            if kinds == {str} and not _has_surrogate("".join(node)):
                continue
            stack.extend((item, (*path, i)) for i, item in enumerate(node) if type(item) not in _SCALARS)


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _plain_json(cls, data: object) -> object:
        check_json(data)
        return data


class _Request(_Body):
    """A request whose answer may be cached: core/cache_keys.py classifies every field (keyed or ignored)."""

    # high, normal or low (api/priority.py checks it); left out of dumps: not part of the cache key, and
    # never passed to an upstream (vLLM reads its own integer `priority`)
    priority: str | None = Field(default=None, max_length=64, exclude=True)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


MAX_IMAGE_URL_CHARS = 64 * 1024 * 1024  # a base64 data URI; MAX_BODY_BYTES and MAX_IMAGE_BYTES bound it first


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str = Field(min_length=1, max_length=MAX_IMAGE_URL_CHARS)
    detail: Literal["auto", "low", "high"] | None = None


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    image_url: ImageUrl | None = None

    @model_validator(mode="before")
    @classmethod
    def _url_as_string(cls, data: object) -> object:
        # Some clients send `"image_url": "<url>"` rather than OpenAI's object.
        if isinstance(data, dict) and isinstance(data.get("image_url"), str):
            return {**data, "image_url": {"url": data["image_url"]}}
        return data


class ToolCallFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(max_length=256)
    arguments: str = Field(default="", max_length=MAX_TEXT_CHARS)


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str = Field(default="", max_length=256)
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = Field(default=None)
    name: str | None = Field(default=None, max_length=256)
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=128)
    tool_call_id: str | None = Field(default=None, max_length=256)

    @field_validator("content")
    @classmethod
    def _bounded_text(cls, value: str | list[ContentPart] | None) -> str | list[ContentPart] | None:
        if isinstance(value, str) and len(value) > MAX_TEXT_CHARS:
            raise ValueError(f"message content is longer than {MAX_TEXT_CHARS} characters")
        if isinstance(value, list):
            for part in value:
                if part.type == "image_url" and part.image_url is None:
                    raise ValueError("an image_url content part needs an image_url object with a url")
                if part.type not in ("text", "input_text", "image_url"):
                    raise ValueError(f"content part type {part.type!r} is not supported (only text and image_url)")
        return value

    def images(self) -> list[ImageUrl]:
        """The image parts' URLs, in order."""
        if not isinstance(self.content, list):
            return []
        return [part.image_url for part in self.content if part.type == "image_url" and part.image_url is not None]

    def text(self) -> str:
        """The content as plain text (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content if part.type != "image_url")

    def text_with_images(self, marker: str) -> str:
        """The content as text with `marker` where each image goes."""
        if not isinstance(self.content, list):
            return self.text()
        return "".join(marker if part.type == "image_url" else part.text or "" for part in self.content)


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=256)
    description: str | None = Field(default=None, max_length=100_000)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: FunctionDef


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


Stop = str | Annotated[list[Annotated[str, Field(max_length=MAX_STOP_LENGTH)]], Field(max_length=MAX_STOP)] | None


class _SamplingFields(_Request):
    """Fields shared by chat and text completions; None means the tier's default.

    Fields we do not know are kept (`model_extra`) rather than dropped: a remote tier passes them to
    its upstream (vLLM's `guided_json`, `min_tokens`, ...), a local tier ignores them, and the cache
    keys them like any other field (chat/recording.py keys the whole dump)."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    model: ModelName
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0, le=100_000)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    stop: Stop = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    repeat_penalty: float | None = Field(default=None, ge=0.0, le=10.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    logprobs: bool | int | None = None
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_bounds(cls, value: Stop) -> Stop:
        if isinstance(value, str) and len(value) > MAX_STOP_LENGTH:
            raise ValueError(f"a stop sequence is longer than {MAX_STOP_LENGTH} characters")
        return value

    def stop_list(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        if isinstance(self.stop, str):
            return (self.stop,) if self.stop else ()
        return tuple(s for s in self.stop if s)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    session_id: str | None = Field(default=None, max_length=MAX_ID_LENGTH)  # or the X-Session-ID header

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


TokenList = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=MAX_TOKENS_LIMIT)]


class CompletionRequest(_SamplingFields):
    prompt: (
        Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
        | Annotated[list[Annotated[str, Field(max_length=MAX_TEXT_CHARS)]], Field(min_length=1, max_length=MAX_N)]
        | TokenList
        | Annotated[list[TokenList], Field(min_length=1, max_length=MAX_N)]
    )
    echo: bool = False
    suffix: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)

    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


# ---------------------------------------------------------------- sessions and the Responses API

MetadataKey = Annotated[str, Field(max_length=64)]
MetadataValue = Annotated[str, Field(max_length=512)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Field(max_length=16)]  # OpenAI's bounds
MAX_TTL_SECONDS = 30 * 24 * 3600.0


class SessionCreateRequest(_Body):
    system: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)  # the session's system prompt
    model: ModelName | None = None  # what the session is for (shown in listings); each turn names its model
    metadata: Metadata | None = None
    ttl_seconds: float | None = Field(default=None, gt=0, le=MAX_TTL_SECONDS)  # else SESSIONS_TTL_SECONDS


class ResponseContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = Field(max_length=64)
    text: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)


ResponseContent = (
    Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
    | Annotated[list[ResponseContentPart], Field(max_length=MAX_MESSAGES)]
)


class ResponseInputItem(BaseModel):
    """One input item, whatever its type (api/responses.py checks which fields each type needs):
    a message (`type` "message" or absent), a `function_call` or a `function_call_output`."""

    model_config = ConfigDict(extra="ignore")
    type: str | None = Field(default=None, max_length=64)
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: ResponseContent | None = None
    call_id: str | None = Field(default=None, max_length=256)
    name: str | None = Field(default=None, max_length=256)
    arguments: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    output: ResponseContent | None = None
    id: str | None = Field(default=None, max_length=256)


class ResponseTool(BaseModel):
    """A Responses tool: only `function` ones are served (their fields sit at the top, not under `function`)."""

    model_config = ConfigDict(extra="ignore")
    type: str = Field(max_length=64)
    name: str | None = Field(default=None, min_length=1, max_length=256)
    description: str | None = Field(default=None, max_length=100_000)
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseTextFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = Field(default=None, max_length=256)
    description: str | None = Field(default=None, max_length=100_000)
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseTextConfig(BaseModel):
    model_config = ConfigDict(extra="ignore")
    format: ResponseTextFormat | None = None


class ResponsesRequest(_Request):
    """OpenAI's `POST /v1/responses`; unknown fields (reasoning, include, service_tier...) are ignored."""

    model: ModelName
    input: (
        Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
        | Annotated[list[ResponseInputItem], Field(max_length=MAX_MESSAGES)]
    )
    instructions: str | None = Field(default=None, max_length=MAX_TEXT_CHARS)
    previous_response_id: str | None = Field(default=None, max_length=MAX_ID_LENGTH)
    store: bool = True
    stream: bool = False
    max_output_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    tools: list[ResponseTool] | None = Field(default=None, max_length=128)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: ResponseTextConfig | None = None
    truncation: Literal["auto", "disabled"] | None = None  # auto: drop the oldest turns that do not fit
    metadata: Metadata | None = None
    user: str | None = Field(default=None, max_length=256)


# ---------------------------------------------------------------- responses


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ---------------------------------------------------------------- embeddings and rerank

MAX_EMBEDDING_INPUTS = 2048
MAX_RERANK_DOCUMENTS = 10_000  # the tier's {TIER}_MAX_DOCUMENTS (default 1000) is checked in the route
MAX_EMBEDDING_DIMENSION = 65_536

EmbeddingText = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
EmbeddingTokens = Annotated[list[Annotated[int, Field(ge=0, le=1_000_000)]], Field(min_length=1, max_length=65_536)]
EmbeddingInput = (
    EmbeddingText
    | Annotated[list[EmbeddingText], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    | EmbeddingTokens
    | Annotated[list[EmbeddingTokens], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
)


class EmbeddingRequest(_Request):
    """OpenAI's embeddings request plus the seed's extensions (embedding_type, return_sparse)."""

    model: ModelName
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1, le=MAX_EMBEDDING_DIMENSION)
    user: str | None = Field(default=None, max_length=256)
    embedding_type: Literal["dense", "sparse", "colbert"] | None = None
    return_sparse: bool = False
    return_colbert: bool = False
    truncate: bool = False


class TeiEmbedRequest(_Request):
    """text-embeddings-inference's `/embed` and `/embed_sparse` body."""

    model: ModelName = "embedding"
    inputs: EmbeddingText | Annotated[list[EmbeddingText], Field(min_length=1, max_length=MAX_EMBEDDING_INPUTS)]
    normalize: bool = True
    truncate: bool = False
    dimensions: int | None = Field(default=None, ge=1, le=MAX_EMBEDDING_DIMENSION)


class RerankDocument(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: EmbeddingText


RerankDocuments = Annotated[list[EmbeddingText | RerankDocument], Field(max_length=MAX_RERANK_DOCUMENTS)]


class RerankRequest(_Request):
    """One body for the seed, Cohere v1/v2, Jina, Infinity and TEI rerank clients.

    Unknown fields (Cohere's max_tokens_per_doc, rank_fields, max_chunks_per_doc) are ignored, and so is
    Cohere's integer `priority`; a string one is ours (high, normal, low).
    """

    priority: str | int | None = Field(default=None, exclude=True)  # type: ignore[assignment]

    model: ModelName = "reranker"
    query: EmbeddingText
    documents: RerankDocuments | None = None
    texts: Annotated[list[EmbeddingText], Field(max_length=MAX_RERANK_DOCUMENTS)] | None = None  # TEI
    top_n: int | None = Field(default=None, ge=0, le=MAX_RERANK_DOCUMENTS)
    top_k: int | None = Field(default=None, ge=0, le=MAX_RERANK_DOCUMENTS)
    return_documents: bool | None = None
    return_text: bool = False  # TEI
    raw_scores: bool = False
    truncate: bool = True

    def document_texts(self) -> list[str]:
        docs = self.documents if self.documents is not None else (self.texts or [])
        return [d if isinstance(d, str) else d.text for d in docs]

    def limit(self) -> int | None:
        return self.top_n if self.top_n is not None else self.top_k
