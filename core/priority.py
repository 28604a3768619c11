"""Request priorities, and the waiting queue that serves them without starving anyone.

A request carries `high`, `normal` (the default) or `low` (an `X-Priority` header or a `priority` body
field; api/priority.py reads them). The route puts it in a contextvar for the rest of the request, and
the queues that requests wait in (chat/scheduler.py, core/microbatch.py) read it when they enqueue.

`WaitingQueue` admits the highest priority first, first come first served within one priority, with
one rule against starvation: the oldest waiting request is overtaken by at most `OVERTAKE_LIMIT` others,
then it goes next. A low request that reaches the head of the queue therefore waits at most that many
admissions more, however many high ones keep arriving. Counting admissions instead of seconds keeps the
bound independent of how fast the model is (and testable without clocks).
"""

from __future__ import annotations

import contextvars
import enum
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from core.errors import InvalidRequest

OVERTAKE_LIMIT = 3  # admissions that may pass the oldest waiting request before it goes next


class Priority(enum.IntEnum):
    LOW = 0
    NORMAL = 1
    HIGH = 2

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: str, param: str = "priority") -> Priority:
        """`high`, `normal` or `low` (any case); anything else is a 400 naming the accepted values."""
        try:
            return cls[value.strip().upper()]
        except KeyError:
            raise InvalidRequest(f"Unknown priority {value[:40]!r}: use high, normal or low", param=param) from None


_current: contextvars.ContextVar[Priority] = contextvars.ContextVar("llmservice_priority", default=Priority.NORMAL)


def current() -> Priority:
    """The priority of the request being served (NORMAL outside a request)."""
    return _current.get()


def use(priority: Priority) -> None:
    """Set the priority of the request this task serves (a route calls it once, before it leases)."""
    _current.set(priority)


T = TypeVar("T")


@dataclass
class _Entry(Generic[T]):
    item: T
    priority: Priority
    order: int  # arrival order: lower is older


@dataclass
class WaitingQueue(Generic[T]):
    """Requests waiting for a model, admitted by priority with a bound on overtaking. Not thread-safe:
    its owner calls it under its own lock."""

    overtake_limit: int = OVERTAKE_LIMIT
    _entries: list[_Entry[T]] = field(default_factory=list)  # in arrival order
    _counter: Iterator[int] = field(default_factory=itertools.count)
    _overtaken: int = 0  # admissions that passed the current oldest entry

    def __len__(self) -> int:
        return len(self._entries)

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __iter__(self) -> Iterator[T]:
        return iter([entry.item for entry in self._entries])

    def append(self, item: T, priority: Priority = Priority.NORMAL) -> None:
        self._entries.append(_Entry(item, priority, next(self._counter)))

    def popleft(self) -> T:
        """The next request to admit: the oldest one once it has been overtaken `overtake_limit` times,
        else the oldest of the highest priority waiting."""
        if not self._entries:
            raise IndexError("pop from an empty WaitingQueue")
        best = max(range(len(self._entries)), key=lambda i: (self._entries[i].priority, -i))
        if best != 0 and self._overtaken >= self.overtake_limit:
            best = 0
        self._overtaken = self._overtaken + 1 if best != 0 else 0
        return self._entries.pop(best).item

    def remove(self, item: T) -> None:
        for index, entry in enumerate(self._entries):
            if entry.item is item:
                del self._entries[index]
                if index == 0:
                    self._overtaken = 0  # a new oldest entry starts its own count
                return
        raise ValueError("not waiting")

    def remove_where(self, predicate: Callable[[T], bool]) -> list[T]:
        """Take out (and return) every waiting item `predicate` holds for."""
        gone = [entry.item for entry in self._entries if predicate(entry.item)]
        for item in gone:
            self.remove(item)
        return gone

    def clear(self) -> None:
        self._entries.clear()
        self._overtaken = 0

    def counts(self) -> dict[str, int]:
        """Waiting requests per priority (for status)."""
        out = {p.label: 0 for p in sorted(Priority, reverse=True)}
        for entry in self._entries:
            out[entry.priority.label] += 1
        return out
