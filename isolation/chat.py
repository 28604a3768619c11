"""A chat tier whose model runs in a worker process: the parent's side (the child is chat_child.py).

`IsolatedChat` is a `ChatBackend`. `start_turn` sends the `TurnRequest` down the pipe; the child runs
the real LocalChat and ChatScheduler and answers with the turn's choice ids, then streams each
choice's events. One reader thread here takes every message off the pipe and hands it to the event
loop, which puts the events in each choice's queue, as LocalChat's owner thread does in process.

The messages are isolation/wire.py's.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator, Mapping
from concurrent.futures import Future

from chat.local import STOPPED_BY_SERVER
from config import Settings, TierConfig
from core.errors import RequestCancelled, ServiceError
from core.events import ErrorEvent, Event, TextEvent
from core.protocols import Factory
from core.turns import JsonValue, Turn, TurnRequest
from isolation import chat_child
from isolation.supervisor import CrashReport, TierCrashed, spawn
from isolation.wire import Cancel, Down, Emitted, Ended, LoadFailed, Ready, Refused, Start, Started, Status, Stop, Up

log = logging.getLogger("llmservice.isolation")


class IsolatedChoice:
    """One choice running in the child: its events arrive through the backend's reader."""

    def __init__(self, backend: IsolatedChat, choice_id: int) -> None:
        self.backend = backend
        self.choice_id = choice_id
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.ended = False
        self.cancelled = False

    def cancel(self) -> None:
        if not self.ended and not self.cancelled:
            self.cancelled = True
            self.backend.send_quietly(Cancel(self.choice_id))

    async def events(self) -> AsyncIterator[Event]:
        while not self.ended:
            event = await self.queue.get()
            self.ended = not isinstance(event, TextEvent)
            yield event


class IsolatedChat:
    """A `ChatBackend` whose LocalChat runs in a spawned worker process."""

    def __init__(self, factory: Factory, config: TierConfig, settings: Settings, on_crash: CrashReport) -> None:
        self.config = config
        self.ready: Future[None] = Future()
        self._on_crash = on_crash
        self._loop = asyncio.get_running_loop()
        self._starting: dict[int, asyncio.Future[tuple[int, list[IsolatedChoice]]]] = {}
        self._choices: dict[int, IsolatedChoice] = {}
        self._turn_ids = itertools.count()
        self._status: Status = {}
        self._send_lock = threading.Lock()
        self._stopping = False
        self._dead: ServiceError | None = None
        self._child = spawn(chat_child.serve_chat, factory, config, settings)
        self._reader = threading.Thread(target=self._read, name=f"isolated-{config.name}", daemon=True)
        self._reader.start()

    # ------------------------------------------------------------ the ChatBackend surface

    async def start_turn(self, request: TurnRequest) -> Turn:
        if self._dead is not None:
            raise self._dead
        turn_id = next(self._turn_ids)
        started: asyncio.Future[tuple[int, list[IsolatedChoice]]] = self._loop.create_future()
        self._starting[turn_id] = started
        try:
            self._send(Start(turn_id, request))
        except TierCrashed:
            self._starting.pop(turn_id, None)
            raise
        prompt_tokens, choices = await started  # a cancelled wait leaves the choices to _dispatch to cancel
        return Turn(list(choices), prompt_tokens)

    def status(self) -> Mapping[str, JsonValue]:
        return {**self._status, "isolation": "process", "pid": self._child.process.pid}

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the child: its running choices end as after an unload in process (request_cancelled)."""
        self._stopping = True
        self.send_quietly(Stop(timeout))
        self._child.stop(timeout + 5)
        self._reader.join(5)

    # ------------------------------------------------------------ the pipe

    def _send(self, message: Down) -> None:
        try:
            with self._send_lock:  # cancels come from the loop, "stop" from the manager's thread
                self._child.conn.send(message)
        except (OSError, ValueError):  # the child is gone (a broken pipe) or the pipe closed
            raise self._dead or TierCrashed(f"The {self.config.name} tier's worker process is not running") from None

    def send_quietly(self, message: Down) -> None:
        """Best effort: a child that is gone needs no cancel or stop."""
        try:
            self._send(message)
        except TierCrashed:
            pass

    def _read(self) -> None:
        """The reader thread: the load's outcome first, then every message in order to the loop."""
        while True:
            try:
                message: Up = self._child.conn.recv()
            except (EOFError, OSError):
                break
            if isinstance(message, Ready):
                self._status = message.status
                self.ready.set_result(None)
            elif isinstance(message, LoadFailed):
                self.ready.set_exception(message.error)
            else:
                try:
                    self._loop.call_soon_threadsafe(self._dispatch, message)
                except RuntimeError:  # the loop is closed: nobody is left to read the answers
                    break
        self._child.conn.close()
        self._gone(self._child.reason())

    def _gone(self, reason: str) -> None:
        """The child exited: asked to (shutdown, failed load) or not (a crash)."""
        crashed = not self._stopping and not (self.ready.done() and self.ready.exception() is not None)
        if crashed:
            log.error("tier %s: %s", self.config.name, reason)
        if not self.ready.done():
            self.ready.set_exception(TierCrashed(f"The {self.config.name} tier's worker died while loading ({reason})"))
        if crashed:
            self._on_crash(reason)
        error: ServiceError = (
            TierCrashed(f"The {self.config.name} tier's worker process died ({reason}); retry")
            if crashed
            else RequestCancelled(STOPPED_BY_SERVER)
        )
        try:
            self._loop.call_soon_threadsafe(self._end_all, error)
        except RuntimeError:  # the loop is closed: nobody waits on these choices any more
            pass

    def _dispatch(self, message: Up) -> None:
        """On the loop: route one message from the child."""
        if isinstance(message, Emitted):
            choice = self._choices.get(message.choice)
            if choice is not None:
                choice.queue.put_nowait(message.event)
        elif isinstance(message, Ended):
            self._status = message.status
            choice = self._choices.pop(message.choice, None)
            if choice is not None:
                choice.queue.put_nowait(message.event)
        elif isinstance(message, Started):
            self._status = message.status
            choices = [IsolatedChoice(self, choice_id) for choice_id in message.choices]
            self._choices.update((choice.choice_id, choice) for choice in choices)
            started = self._starting.pop(message.turn)
            if started.done():  # its request went away while the child started it
                for choice in choices:
                    choice.cancel()
            else:
                started.set_result((message.prompt_tokens, choices))
        elif isinstance(message, Refused):
            started = self._starting.pop(message.turn)
            if not started.done():
                started.set_exception(message.error)

    def _end_all(self, error: ServiceError) -> None:
        """On the loop: every turn still starting and every choice still running ends with `error`."""
        self._dead = error
        self._status = {}
        for started in self._starting.values():
            if not started.done():
                started.set_exception(error)
        self._starting.clear()
        for choice in self._choices.values():
            choice.queue.put_nowait(ErrorEvent(error))
        self._choices.clear()
