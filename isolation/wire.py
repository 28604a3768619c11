"""The messages between a tier's parent and its worker process (pickled inside our own pipe).

Chat: down `Start`, `Cancel`, `Stop`; up `Ready` or `LoadFailed` once, then for each turn `Started`
or `Refused`, and for each choice its `Emitted` events and one `Ended`. Embedding and rerank: down
`Call` (one model method), up `Ready`/`LoadFailed` once, then one `Returned` or `Raised` per call.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from core.errors import ServiceError
from core.events import Event
from core.turns import JsonValue, TurnRequest

Status = Mapping[str, JsonValue]


@dataclass(frozen=True)
class Start:
    turn: int
    request: TurnRequest


@dataclass(frozen=True)
class Cancel:
    choice: int


@dataclass(frozen=True)
class Stop:
    timeout: float


@dataclass(frozen=True)
class Call:
    method: str  # "embed", "score" or "count_tokens"
    args: tuple[object, ...]


@dataclass(frozen=True)
class Ready:
    status: Status  # chat: the scheduler's status; a model: its protocol attributes


@dataclass(frozen=True)
class LoadFailed:
    error: ServiceError


@dataclass(frozen=True)
class Started:
    turn: int
    prompt_tokens: int
    choices: tuple[int, ...]
    status: Status


@dataclass(frozen=True)
class Refused:
    turn: int
    error: ServiceError


@dataclass(frozen=True)
class Emitted:
    choice: int
    event: Event


@dataclass(frozen=True)
class Ended:
    choice: int
    event: Event  # its DoneEvent or ErrorEvent
    status: Status


@dataclass(frozen=True)
class Returned:
    value: object


@dataclass(frozen=True)
class Raised:
    error: ServiceError


Down = Start | Cancel | Stop | Call
Up = Ready | LoadFailed | Started | Refused | Emitted | Ended | Returned | Raised
