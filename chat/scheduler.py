"""The owner thread of a chat model: a continuous-batching loop over its sequences.

Requests wait in a bounded queue, higher priority first without starving the rest (core/priority.py);
between decode steps the loop admits waiting requests while the
model has free sequence slots, drops cancelled ones, steps every active sequence by one token and
hands the text to each request's sink. Stop strings, token budgets and the context limit are handled
here, once for every backend.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.errors import BackendError, Overloaded, ServiceError
from core.events import DoneEvent, ErrorEvent, Sink, TextEvent
from core.owner_thread import OwnerThread
from core.priority import Priority, WaitingQueue
from core.protocols import ChatModel, GenerationJob, StepOutput

log = logging.getLogger("llmservice.scheduler")


@dataclass
class _Track:
    job: GenerationJob
    sink: Sink
    enqueued_at: float
    started_at: float = 0.0
    held: str = ""  # text held back because it may be the start of a stop string
    stop_prefixes: frozenset[str] = field(default_factory=frozenset)


def _stop_prefixes(stops: tuple[str, ...]) -> frozenset[str]:
    return frozenset(stop[:i] for stop in stops for i in range(1, len(stop)))


class ChatScheduler(OwnerThread):
    """Runs one ChatModel on one thread; `submit` may be called from any thread."""

    model: ChatModel

    def __init__(self, loader: Callable[[], ChatModel], name: str, max_queue: int, queue_timeout: float) -> None:
        super().__init__(loader, name, f"chat-{name}")
        self.max_queue = max_queue
        self.queue_timeout = queue_timeout
        self._pending: WaitingQueue[_Track] = WaitingQueue()
        self._active: dict[int, _Track] = {}
        self._thread.start()

    # ------------------------------------------------------------ called from other threads

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def active(self) -> int:
        return len(self._active)

    def submit(self, job: GenerationJob, sink: Sink, priority: Priority = Priority.NORMAL) -> None:
        """Queue a job; raise Overloaded at once when the queue is full."""
        with self._cond:
            if self._stopping:
                raise Overloaded(f"The {self.name} tier is shutting down", retry_after=5)
            free_slots = self.model.max_parallel - len(self._active)
            if len(self._pending) - free_slots >= self.max_queue:
                raise Overloaded(
                    f"The {self.name} tier has {len(self._pending)} requests waiting (limit {self.max_queue})",
                    retry_after=max(1, len(self._pending) // max(1, self.model.max_parallel)),
                )
            track = _Track(job, sink, time.monotonic(), stop_prefixes=_stop_prefixes(job.params.stop))
            self._pending.append(track, priority)
            self._cond.notify()

    def wake(self) -> None:
        """Make the loop look at cancel flags now (a waiting request was cancelled)."""
        with self._cond:
            self._cond.notify()

    def _on_stop(self) -> None:
        for track in self._pending:
            track.job.cancelled.set()
        for track in self._active.values():
            track.job.cancelled.set()

    # ------------------------------------------------------------ owner thread

    def _serve(self) -> None:
        try:
            while True:
                if not self._admit():
                    break
                if self._active:
                    self._step()
        finally:
            for track in list(self._active.values()):
                self._finish(track, "cancelled")
            try:
                self.model.close()
            except Exception:  # noqa: BLE001 - closing must not raise out of the thread
                log.exception("closing the %s model failed", self.name)

    def _admit(self) -> bool:
        """Move waiting jobs into free slots; block while there is nothing to do. False = stop."""
        with self._cond:
            while not self._active and not self._pending and not self._stopping:
                self._cond.wait()
            if self._stopping and not self._active:
                for track in self._pending:
                    track.sink(ErrorEvent(Overloaded(f"The {self.name} tier is shutting down", retry_after=5)))
                self._pending.clear()
                return False
            now = time.monotonic()
            waiting: list[_Track] = []
            while self._pending and len(self._active) + len(waiting) < self.model.max_parallel:
                track = self._pending.popleft()
                if track.job.cancelled.is_set():
                    continue
                waiting.append(track)
            expired = self._pending.remove_where(
                lambda t: now - t.enqueued_at > self.queue_timeout or t.job.cancelled.is_set()
            )
        for track in expired:
            if not track.job.cancelled.is_set():
                track.sink(ErrorEvent(Overloaded(f"Waited over {self.queue_timeout:g}s for the {self.name} tier")))
        for track in waiting:
            self._start(track)
        return True

    def _start(self, track: _Track) -> None:
        track.started_at = time.monotonic()
        try:
            self.model.insert(track.job)
        except ServiceError as exc:
            track.sink(ErrorEvent(exc))
            return
        except Exception:  # noqa: BLE001 - a backend failure ends this request, not the thread
            log.exception("starting a sequence on %s failed", self.name)
            track.sink(ErrorEvent(BackendError("The model failed to start this request")))
            return
        self._active[id(track.job)] = track

    def _step(self) -> None:
        for track in [t for t in self._active.values() if t.job.cancelled.is_set()]:
            self._finish(track, "cancelled")
        if not self._active:
            return
        try:
            outputs = self.model.step()
        except Exception:  # noqa: BLE001
            log.exception("decode step on %s failed", self.name)
            for track in list(self._active.values()):
                self._active.pop(id(track.job), None)
                self._remove(track)
                track.sink(ErrorEvent(BackendError("The model failed while generating")))
            return
        for output in outputs:
            track = self._active.get(id(output.job))
            if track is not None:
                self._consume(track, output)

    def _consume(self, track: _Track, output: StepOutput) -> None:
        job = track.job
        if output.error is not None:  # this sequence failed; the others of the step go on
            self._active.pop(id(job), None)
            self._remove(track)
            track.sink(ErrorEvent(output.error))
            return
        if output.end_of_generation:
            self._finish(track, "stop")
            return
        job.completion_tokens += 1
        if self._emit(track, output.text):
            self._finish(track, "stop", flush=False)
        elif job.completion_tokens >= job.params.max_tokens:
            self._finish(track, "length")
        elif len(job.prompt_tokens) + job.completion_tokens >= self.model.context_length:
            self._finish(track, "length")

    def _emit(self, track: _Track, text: str) -> bool:
        """Send text, holding back a possible stop-string start. True when a stop string was hit."""
        if not text:
            return False
        stops = track.job.params.stop
        if not stops:
            track.sink(TextEvent(text))
            return False
        buffer = track.held + text
        hits = [i for i in (buffer.find(stop) for stop in stops) if i >= 0]
        if hits:
            cut = min(hits)
            if cut:
                track.sink(TextEvent(buffer[:cut]))
            track.held = ""
            return True
        keep = 0
        for k in range(min(len(buffer), max(map(len, stops)) - 1), 0, -1):
            if buffer[-k:] in track.stop_prefixes:
                keep = k
                break
        out, track.held = (buffer[:-keep], buffer[-keep:]) if keep else (buffer, "")
        if out:
            track.sink(TextEvent(out))
        return False

    def _finish(self, track: _Track, reason: str, flush: bool = True) -> None:
        self._active.pop(id(track.job), None)
        self._remove(track)
        if flush and track.held and reason != "cancelled":
            track.sink(TextEvent(track.held))
        track.held = ""
        now = time.monotonic()
        track.sink(
            DoneEvent(
                finish_reason=reason,
                prompt_tokens=len(track.job.prompt_tokens),
                completion_tokens=track.job.completion_tokens,
                queue_seconds=track.started_at - track.enqueued_at,
                compute_seconds=now - track.started_at,
            )
        )

    def _remove(self, track: _Track) -> None:
        try:
            self.model.remove(track.job)
        except Exception:  # noqa: BLE001
            log.exception("removing a sequence from %s failed", self.name)

    def status(self) -> dict[str, Any]:
        with self._cond:
            waiting = self._pending.counts()
        status: dict[str, Any] = {"active": self.active, "queued": self.queued, "parallel": self.model.max_parallel}
        if waiting["high"] or waiting["low"]:
            status["queued_by_priority"] = waiting
        totals = getattr(self.model, "draft_totals", None)  # llama.cpp with SPECULATIVE=ngram
        if totals is not None and totals()[0]:
            proposed, accepted = totals()
            status["draft_tokens"] = {"proposed": proposed, "accepted": accepted}
        return status
