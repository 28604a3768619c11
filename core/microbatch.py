"""Micro-batching owner thread for embedding and rerank tiers.

Concurrent requests to one tier are gathered for up to `{TIER}_BATCH_WAIT_MS` after the first one
arrives, or until `{TIER}_MAX_BATCH` inputs are waiting, and run as one batch on the model's owner
thread; the results are split back to each request in order. The window opens only while requests
overlap (the last batch merged some): a lone caller is not held for it. Requests only merge when they
share a key (the route puts everything that changes the computation in it: embedding types,
truncation), so merging never changes a result. When a merged batch fails, each request is retried alone, so one bad
input fails only its own request.

Requests wait higher priority first, without starving the rest (core/priority.py); the priority is the
request's own (`priority.current()`, read when it is queued).

The surface is `ready`, `shutdown` and `status` (from OwnerThread, like ChatScheduler), `submit(fn)`, plus
`submit_batch(key, items, run)` (a concurrent future) and `gather(key, items, run)` (awaited on an event loop).

`gather` settles all of a batch's requests from one event-loop callback. Resolving each request's own
future from this thread costs one `call_soon_threadsafe` each, and every one of those hands the GIL to the
event loop and waits to get it back while the loop writes a response: with 16 requests in a batch, the
model's thread stalled for milliseconds per batch (a third of its time was idle at 16 clients).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from core.errors import Overloaded
from core.owner_thread import OwnerThread
from core.priority import WaitingQueue
from core.priority import current as current_priority

log = logging.getLogger("llmservice.microbatch")

Run = Callable[[Any, Sequence[Any]], Sequence[Any]]


@dataclass
class _Work:
    key: Hashable | None  # None: a plain call, never merged
    items: Sequence[Any]
    run: Run
    future: Future[Any] | asyncio.Future[Any]
    enqueued_at: float
    loop: asyncio.AbstractEventLoop | None = None  # set when `future` is an asyncio future of that loop

    def start(self) -> bool:
        """False when the caller went away while the work waited (its future was cancelled)."""
        if self.loop is not None:
            return not self.future.cancelled()  # a read from this thread: at worst one batch too late
        assert isinstance(self.future, Future)
        return self.future.set_running_or_notify_cancel()


Outcome = tuple[_Work, Any, BaseException | None]


def _settle_now(outcomes: Sequence[Outcome]) -> None:
    """Runs on the event loop: each request's future gets its result (unless its caller left)."""
    for work, result, error in outcomes:
        if work.future.done():
            continue
        if error is not None:
            work.future.set_exception(error)
        else:
            work.future.set_result(result)


class BatchWorker(OwnerThread):
    """Owns one embedding/rerank model on one thread; merges compatible concurrent requests."""

    def __init__(
        self,
        loader: Callable[[], Any],
        name: str,
        max_queue: int,
        wait_ms: float = 5.0,
        max_batch: int = 64,
        queue_timeout: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(loader, name, f"model-{name}")
        self.max_queue = max_queue
        self.wait_seconds = max(0.0, wait_ms) / 1000.0
        self.max_batch = max(1, max_batch)
        self.queue_timeout = queue_timeout  # seconds a request may wait before it gets a 503
        self.clock = clock
        self.batches_run = 0  # batches the model ran (status and tests)
        self.largest_batch = 0  # the most requests merged into one batch so far
        # Whether the last batch merged requests. Until requests overlap, a batch runs at once: waiting
        # would only add the window to every sequential request (5 ms on a ~10 ms MiniLM call).
        self._overlapping = False
        self._pending: WaitingQueue[_Work] = WaitingQueue()
        self._busy = False
        self._thread.start()

    # ------------------------------------------------------------ any thread

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return int(self._busy)

    def submit(self, fn: Callable[[Any], Any]) -> Future[Any]:
        """Run `fn(model)` alone on the owner thread."""
        future: Future[Any] = Future()
        self._enqueue(None, (), lambda model, _items: fn(model), future)
        return future

    def submit_batch(self, key: Hashable, items: Sequence[Any], run: Run) -> Future[list[Any]]:
        """Run `run(model, items)` (it returns one result per item), possibly merged with other
        requests of the same key; the future gets this request's results in order."""
        future: Future[list[Any]] = Future()
        self._enqueue(key, list(items), run, future, None)
        return future

    async def gather(self, key: Hashable, items: Sequence[Any], run: Run) -> list[Any]:
        """`submit_batch`, awaited on the running loop; a batch's requests are settled together."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        self._enqueue(key, list(items), run, future, loop)
        return await future

    def _enqueue(
        self,
        key: Hashable | None,
        items: Sequence[Any],
        run: Run,
        future: Future[Any] | asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        with self._cond:
            if self._stopping:
                raise Overloaded(f"The {self.name} tier is shutting down", retry_after=5)
            if len(self._pending) >= self.max_queue + 1:
                raise Overloaded(
                    f"The {self.name} tier has {len(self._pending)} requests waiting (limit {self.max_queue})"
                )
            self._pending.append(_Work(key, items, run, future, self.clock(), loop), current_priority())
            self._cond.notify()

    def status(self) -> dict[str, Any]:
        return {
            "active": self.active,
            "queued": self.queued,
            "batch_wait_ms": round(self.wait_seconds * 1000, 3),
            "max_batch": self.max_batch,
            "batches_run": self.batches_run,
            "largest_batch": self.largest_batch,
        }

    # ------------------------------------------------------------ owner thread

    def _serve(self) -> None:
        while True:
            group = self._next_group()
            if group is None:
                break
            self._busy = True
            try:
                self._execute(group)
            finally:
                self._busy = False
        try:
            close = getattr(self.model, "close", None)
            if close is not None:
                close()
        except Exception:  # noqa: BLE001
            log.exception("closing the %s model failed", self.name)

    def _next_group(self) -> list[_Work] | None:
        """The next request plus every compatible one that arrives within the batching window."""
        with self._cond:
            while not self._pending and not self._stopping:
                self._cond.wait()
            if not self._pending:
                return None
            first = self._pending.popleft()
            group = [first]
            if first.key is None:
                return group
            count = len(first.items)
            deadline = first.enqueued_at + (self.wait_seconds if self._overlapping else 0.0)
            while count < self.max_batch:
                count += self._take_matching(first.key, group, self.max_batch - count)
                remaining = deadline - self.clock()
                if count >= self.max_batch or remaining <= 0 or self._stopping:
                    break
                self._cond.wait(remaining)  # woken by the next submit, or the window closes
            return group

    def _take_matching(self, key: Hashable, group: list[_Work], room: int) -> int:
        taken = 0
        for work in list(self._pending):
            if work.key == key and taken + len(work.items) <= room:
                self._pending.remove(work)
                group.append(work)
                taken += len(work.items)
        return taken

    def _execute(self, group: list[_Work]) -> None:
        outcomes: list[Outcome] = []
        try:
            self._execute_into(group, outcomes)
        finally:
            self._settle(outcomes)

    def _execute_into(self, group: list[_Work], outcomes: list[Outcome]) -> None:
        now = self.clock()
        live = []
        for work in group:
            if not work.start():
                continue  # the client went away while waiting
            if now - work.enqueued_at > self.queue_timeout:
                outcomes.append(
                    (work, None, Overloaded(f"Waited over {self.queue_timeout:g}s for the {self.name} tier"))
                )
                continue
            live.append(work)
        if not live:
            return
        if len(live) == 1 or live[0].key is None:
            for work in live:
                outcomes.append(self._run_alone(work))
            return
        items = [item for work in live for item in work.items]
        try:
            results = list(live[0].run(self.model, items))
            if len(results) != len(items):
                raise RuntimeError(f"batch returned {len(results)} results for {len(items)} inputs")
        except BaseException:  # noqa: BLE001 - retried one by one so only the bad request fails
            log.debug("a merged batch on %s failed; retrying its %d requests alone", self.name, len(live))
            for work in live:
                outcomes.append(self._run_alone(work))
            return
        self._count(len(live))
        start = 0
        for work in live:
            outcomes.append((work, results[start : start + len(work.items)], None))
            start += len(work.items)

    def _run_alone(self, work: _Work) -> Outcome:
        try:
            result = work.run(self.model, work.items)
            outcome: Outcome = (work, result if work.key is None else list(result), None)
        except BaseException as exc:  # noqa: BLE001 - the caller gets it
            outcome = (work, None, exc)
        self._count(1)
        return outcome

    @staticmethod
    def _settle(outcomes: Sequence[Outcome]) -> None:
        """Concurrent futures directly; asyncio futures with one call into each loop for the whole batch."""
        by_loop: dict[asyncio.AbstractEventLoop, list[Outcome]] = defaultdict(list)
        for work, result, error in outcomes:
            if work.loop is not None:
                by_loop[work.loop].append((work, result, error))
                continue
            assert isinstance(work.future, Future)
            if error is not None:
                work.future.set_exception(error)
            else:
                work.future.set_result(result)
        for loop, settled in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle_now, settled)
            except RuntimeError:  # the loop has closed: nobody waits for these any more
                pass

    def _count(self, requests: int) -> None:
        self.batches_run += 1
        self.largest_batch = max(self.largest_batch, requests)
        self._overlapping = requests > 1
