"""A chat tier's worker process: the real LocalChat over its ChatScheduler, serving turns over a pipe.

`serve_chat` is the child's entry point (isolation/chat.py spawns it). The scheduler's owner thread
generates as in process; an asyncio loop here starts turns and forwards each choice's events up the
pipe, and a reader thread hands the parent's messages to that loop. Only the loop writes to the pipe.
When the parent goes away (its end of the pipe closes), the child stops.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import signal
import threading
from multiprocessing.connection import Connection

from chat.local import STOPPED_BY_SERVER, LocalChat
from chat.scheduler import ChatScheduler
from config import Settings, TierConfig
from core.errors import RequestCancelled
from core.events import ErrorEvent, TextEvent
from core.protocols import Factory
from core.turns import Choice
from isolation.supervisor import portable
from isolation.wire import Cancel, Down, Emitted, Ended, LoadFailed, Ready, Refused, Start, Started, Stop, Up

log = logging.getLogger("llmservice.isolation")


def quiet_child(settings: Settings) -> None:
    """A worker process leaves Ctrl-C to its parent (which stops it) and logs like it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    level = settings.log_level.upper()
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else "INFO",
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )


def serve_chat(conn: Connection, factory: Factory, config: TierConfig, settings: Settings) -> None:
    quiet_child(settings)
    asyncio.run(_ChatServer(conn, factory, config, settings).run())


class _ChatServer:
    def __init__(self, conn: Connection, factory: Factory, config: TierConfig, settings: Settings) -> None:
        self.conn = conn
        loader = lambda: factory(config, settings)  # noqa: E731
        self.local = LocalChat(ChatScheduler(loader, config.name, config.max_queue, config.queue_timeout), config)
        self.choices: dict[int, tuple[Choice, asyncio.Task[None]]] = {}  # the choices whose Ended is not sent
        self.starting: set[asyncio.Task[None]] = set()
        self.ids = itertools.count()

    def _send(self, message: Up) -> None:
        try:
            self.conn.send(message)
        except (OSError, ValueError):  # the parent is gone; the reader sees it too and stops us
            pass

    async def run(self) -> None:
        try:
            await asyncio.wrap_future(self.local.ready)
        except BaseException as exc:  # noqa: BLE001 - the parent reports it as the load's failure
            self._send(LoadFailed(portable(exc)))
            return
        self._send(Ready(self.local.status()))
        inbox: asyncio.Queue[Down] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, args=(loop, inbox), name="parent-reader", daemon=True).start()
        while True:
            message = await inbox.get()
            if isinstance(message, Start):
                task = asyncio.create_task(self._start(message))
                self.starting.add(task)
                task.add_done_callback(self.starting.discard)
            elif isinstance(message, Cancel):
                self._cancel(message.choice)
            elif isinstance(message, Stop):
                await self._stop(message.timeout)
                return

    def _read(self, loop: asyncio.AbstractEventLoop, inbox: asyncio.Queue[Down]) -> None:
        while True:
            try:
                message: Down = self.conn.recv()
            except (EOFError, OSError):  # the parent is gone: stop at once
                message = Stop(0.0)
            loop.call_soon_threadsafe(inbox.put_nowait, message)
            if isinstance(message, Stop):
                return

    async def _start(self, message: Start) -> None:
        try:
            turn = await self.local.start_turn(message.request)
        except BaseException as exc:  # noqa: BLE001 - the parent raises it from its start_turn
            self._send(Refused(message.turn, portable(exc)))
            return
        ids = tuple(next(self.ids) for _ in turn.choices)
        self._send(Started(message.turn, turn.prompt_tokens, ids, self.local.status()))
        for choice_id, choice in zip(ids, turn.choices, strict=True):
            task = asyncio.create_task(self._forward(choice_id, choice))
            task.add_done_callback(lambda _, choice_id=choice_id: self._cancelled(choice_id))
            self.choices[choice_id] = (choice, task)

    async def _forward(self, choice_id: int, choice: Choice) -> None:
        async for event in choice.events():
            if isinstance(event, TextEvent):
                self._send(Emitted(choice_id, event))
            else:
                self.choices.pop(choice_id, None)
                self._send(Ended(choice_id, event, self.local.status()))
                return

    def _cancelled(self, choice_id: int) -> None:
        """A forwarder ended without its choice's last event (cancelled by the parent, or stopping):
        a choice still queued never gets an event of its own, so its end is said here."""
        if self.choices.pop(choice_id, None) is not None:
            self._send(Ended(choice_id, ErrorEvent(RequestCancelled(STOPPED_BY_SERVER)), self.local.status()))

    def _cancel(self, choice_id: int) -> None:
        entry = self.choices.get(choice_id)
        if entry is not None:
            choice, task = entry
            choice.cancel()
            task.cancel()

    async def _stop(self, timeout: float) -> None:
        """Stop the scheduler (running choices end as cancelled), let their last events out, exit."""
        await asyncio.to_thread(self.local.shutdown, timeout)
        tasks = [task for _, task in self.choices.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
