"""The chat-turn seam: what a chat or completion request asks of a tier, and what it gets back.

A route turns its wire request into a `TurnRequest`; the tier's `ChatBackend` starts a `Turn`, whose
choices yield `core.events` events. Two kinds of backend sit behind it: a local one that renders,
tokenizes and drives a token engine on its owner thread (chat/turn.py), and one that speaks OpenAI
to an upstream server. Routes only format events; the response cache records and replays them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypedDict

from core.events import Event

JsonValue = str | int | float | bool | None | list["JsonValue"] | dict[str, "JsonValue"]
JsonObject = dict[str, JsonValue]


class Message(TypedDict, total=False):
    """A chat message as the template sees it (content already flattened to text)."""

    role: str
    content: str | None
    name: str
    tool_calls: list[JsonObject]
    tool_call_id: str


@dataclass(frozen=True)
class ToolPlan:
    """What a request asks of tools (chat/tools.py builds and enforces it)."""

    tools: tuple[JsonObject, ...]  # the OpenAI "function" objects offered
    forced: bool  # "required" or a named function: the output must be a call
    parallel: bool

    @property
    def names(self) -> set[str]:
        return {str(tool["name"]) for tool in self.tools}


@dataclass(frozen=True)
class SamplingRequest:
    """The request's sampling fields; None means the tier's default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repeat_penalty: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: Mapping[str, float] | None = None


Prompt = str | tuple[int, ...]


@dataclass(frozen=True)
class ImageInput:
    """One image of a chat request, decoded and checked (api/images.py): its file bytes and their digest."""

    data: bytes  # the image file as sent (PNG, JPEG, ...), base64 decoded or fetched
    digest: str  # SHA-256 of `data`: the response cache keys the image by it
    width: int
    height: int

    def rgb(self) -> bytes:
        """The pixels as packed RGB rows (width * height * 3 bytes)."""
        import io

        from PIL import Image

        with Image.open(io.BytesIO(self.data)) as image:
            return image.convert("RGB").tobytes()


@dataclass(frozen=True)
class TurnRequest:
    """One chat or completion request, independent of the wire format it came in."""

    kind: Literal["chat", "completion"]
    sampling: SamplingRequest
    messages: tuple[Message, ...] = ()  # chat
    prompts: tuple[Prompt, ...] = ()  # completions: each prompt runs `n` times
    n: int = 1
    tools: ToolPlan | None = None
    json_schema: JsonObject | None = None  # the output must follow it (response_format or a forced call)
    stream: bool = False  # a streamed turn shows text as it comes; a whole one may hold it back to parse calls
    wire: JsonObject = field(default_factory=dict)  # the request as sent (an upstream may take it as is)
    images: tuple[ImageInput, ...] = ()  # chat: in order; each message's text holds `image_marker` where one goes
    image_marker: str = ""  # a random string per request, so no text a client sends can pass for an image


class Choice(Protocol):
    """One running choice: its events end with one DoneEvent or ErrorEvent; `cancel` stops it."""

    def events(self) -> AsyncIterator[Event]: ...

    def cancel(self) -> None: ...


@dataclass
class Turn:
    """A started turn. Its choices run together and end together: `aclose` cancels what still runs
    and releases the tier (a stream calls it after its last byte)."""

    choices: list[Choice]
    prompt_tokens: int  # for `usage`: counted once per chat turn, once per choice for completions; an
    # upstream reports it with its last event, so a remote backend fills it in then
    cache_status: str | None = None  # "HIT", "MISS", or None when the turn is not cacheable
    replayed: bool = False  # the events come from the cache: no model ran
    recorded_completion_tokens: int = 0  # a replay's usage (its choices' own counts are not kept)
    native_tools: bool = False  # the backend makes tool calls itself (an upstream does): no local shaping
    upstream: str | None = None  # the remote upstream that answered (URL without credentials): X-Upstream
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)  # run in order by aclose
    _closed: bool = False

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for choice in self.choices:
            choice.cancel()
        for close in self.closers:
            await close()


class ChatBackend(Protocol):
    """What a chat tier's lease gives the routes: a way to start turns, plus the worker surface the
    model manager needs (ready when loaded, status, shutdown)."""

    ready: Future[None]

    async def start_turn(self, request: TurnRequest) -> Turn: ...

    def status(self) -> Mapping[str, JsonValue]: ...

    def shutdown(self, timeout: float = 10.0) -> None: ...
