"""An embedding or rerank model in a worker process, behind the tier's usual micro-batching worker.

The tier keeps its `BatchWorker` (core/microbatch.py) in the parent: requests are gathered and merged
there as in process, and each merged batch's `run(model, items)` gets a `ModelProxy` as its model.
The proxy sends each model call (`embed`, `score`, `count_tokens`) down a pipe to the child, which
runs it on the real model and sends the result back. Only the worker's owner thread calls the proxy,
one call at a time, as it would call the model.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection, wait

from config import Settings, TierConfig
from core.microbatch import BatchWorker
from core.protocols import EmbeddingResult, Factory, LoadedModel
from isolation.chat_child import quiet_child
from isolation.supervisor import Child, CrashReport, TierCrashed, portable, spawn
from isolation.wire import Call, LoadFailed, Raised, Ready, Returned, Status, Stop, Up

log = logging.getLogger("llmservice.isolation")

_ATTRIBUTES = ("dimension", "max_input_tokens", "supported_types", "scores_are_logits")
_METHODS = frozenset({"embed", "score", "count_tokens"})


def isolated_batch_worker(
    factory: Factory, config: TierConfig, settings: Settings, on_crash: CrashReport
) -> BatchWorker:
    """The tier's micro-batching worker over a model in a worker process (loaded on its owner thread)."""
    loader = lambda: ModelProxy(spawn(serve_model, factory, config, settings), config.name, on_crash)  # noqa: E731
    return BatchWorker(
        loader, config.name, config.max_queue, config.batch_wait_ms, config.max_batch, config.queue_timeout
    )


class ModelProxy:
    """An Embedder and Reranker whose calls run in the child. Made on the worker's owner thread: it
    waits there for the child's model to load."""

    dimension: int = 0
    max_input_tokens: int = 0
    supported_types: tuple[str, ...] = ()
    scores_are_logits: bool = False

    def __init__(self, child: Child, tier: str, on_crash: CrashReport) -> None:
        self.child = child
        self.tier = tier
        self.stopping = False
        self.dead = ""  # the exit reason, once the child is gone
        try:
            ready = self._receive()
        except TierCrashed:  # died while loading: counts towards the restart backoff
            on_crash(self.dead)
            raise
        if isinstance(ready, LoadFailed):
            child.stop(5)
            child.conn.close()
            raise ready.error
        assert isinstance(ready, Ready)
        for name, value in ready.status.items():
            setattr(self, name, tuple(value) if isinstance(value, list) else value)
        self._on_crash = on_crash
        threading.Thread(target=self._watch, name=f"isolated-{tier}", daemon=True).start()

    def embed(self, texts: Sequence[str], types: Sequence[str], truncate: bool) -> EmbeddingResult:
        result = self._call("embed", list(texts), tuple(types), truncate)
        assert isinstance(result, EmbeddingResult)
        return result

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        scores = self._call("score", list(pairs))
        assert isinstance(scores, list)
        return scores

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        counts = self._call("count_tokens", list(texts))
        assert isinstance(counts, list)
        return counts

    def close(self) -> None:
        self.stopping = True
        if not self.dead:
            try:
                self.child.conn.send(Stop(5.0))
            except (OSError, ValueError):
                pass
        self.child.stop(10)
        self.child.conn.close()

    def _call(self, method: str, *args: object) -> object:
        try:
            self.child.conn.send(Call(method, args))
        except (OSError, ValueError):
            raise self._crashed() from None
        answer = self._receive()
        if isinstance(answer, Raised):
            raise answer.error
        assert isinstance(answer, Returned)
        return answer.value

    def _receive(self) -> Up:
        try:
            message: Up = self.child.conn.recv()
        except (EOFError, OSError):
            raise self._crashed() from None
        return message

    def _crashed(self) -> TierCrashed:
        self.dead = self.dead or self.child.reason()
        return TierCrashed(f"The {self.tier} tier's worker process died ({self.dead}); retry")

    def _watch(self) -> None:
        """Report a death even while idle: /health shows the tier failed without waiting for a request."""
        wait([self.child.process.sentinel])
        if not self.stopping:
            self.dead = self.dead or self.child.reason()
            log.error("tier %s: %s", self.tier, self.dead)
            self._on_crash(self.dead)


# ---------------------------------------------------------------- the child


def serve_model(conn: Connection, factory: Factory, config: TierConfig, settings: Settings) -> None:
    """The child's entry point: load the model, then answer calls until told to stop."""
    quiet_child(settings)
    try:
        model = factory(config, settings)
    except BaseException as exc:  # noqa: BLE001 - the parent raises it as the load's failure
        conn.send(LoadFailed(portable(exc)))
        return
    conn.send(Ready(_attributes(model)))
    try:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                return
            if not isinstance(message, Call) or message.method not in _METHODS:
                return
            try:
                conn.send(Returned(getattr(model, message.method)(*message.args)))
            except BaseException as exc:  # noqa: BLE001 - the request that made it fails, not the worker
                conn.send(Raised(portable(exc)))
    finally:
        model.close()


def _attributes(model: LoadedModel) -> Status:
    values = {name: getattr(model, name) for name in _ATTRIBUTES if hasattr(model, name)}
    return {name: list(value) if isinstance(value, tuple) else value for name, value in values.items()}
