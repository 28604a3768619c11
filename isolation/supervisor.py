"""Process isolation of a tier (`{TIER}_ISOLATION=process`): its model runs in a worker process.

llama.cpp and MLX abort the whole process on an internal assertion; in a worker process such a crash
takes down one tier, not the service. The worker sits behind the surface the model manager already
uses: a chat tier gets a `ChatBackend` (isolation/chat.py: turns go to the child, events come back),
an embedding or rerank tier gets the usual micro-batching `BatchWorker` whose model is a proxy over a
pipe (isolation/models.py). Children are started with the "spawn" context: no forked locks or threads.

When a worker dies unasked, its in-flight requests end with a 503 `tier_crashed`, the manager marks
the tier failed with the exit signal as the reason, and the next request starts a new worker; after
repeated crashes the restarts back off (`Restarts`).
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import pickle
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from config import Settings, TierConfig
from core.errors import BackendError, ModelUnavailable, ServiceError
from core.protocols import Factory

log = logging.getLogger("llmservice.isolation")

CrashReport = Callable[[str], None]  # called from any thread with the reason when a worker dies unasked
STABLE_SECONDS = 60.0  # a worker that ran this long before crashing starts the backoff over
MAX_BACKOFF_SECONDS = 60.0


class TierCrashed(ModelUnavailable):
    """The tier's worker process died (a crash in native code); the tier restarts on a later request."""

    code = "tier_crashed"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after))})


def exit_reason(exitcode: int | None) -> str:
    """What a worker's exit code says, for /health and the log: "killed by SIGABRT", "exited with 3"."""
    if exitcode is None:
        return "the worker process stopped answering"
    if exitcode < 0:
        try:
            return f"the worker process was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"the worker process was killed by signal {-exitcode}"
    return f"the worker process exited with status {exitcode}"


def portable(exc: BaseException) -> ServiceError:
    """An error a child can send back: a ServiceError as it is, anything else as a generic 500 (its
    text may hold paths, and an arbitrary exception may not survive pickling)."""
    if isinstance(exc, ServiceError):
        return exc
    log.error("worker process error", exc_info=exc)
    return BackendError("The model failed while serving this request")


def spawn(target: Callable[..., None], factory: Factory, config: TierConfig, settings: Settings) -> Child:
    """Start `target(conn, factory, config, settings)` in a spawned child; returns the parent's end."""
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    # daemon: multiprocessing ends a forgotten child when the service exits (and a child may not fork).
    process = context.Process(
        target=target, args=(theirs, factory, config, settings), name=f"llmservice-{config.name}", daemon=True
    )
    try:
        process.start()  # pickles the arguments here: a factory must be an importable module-level function
    except (pickle.PicklingError, AttributeError, TypeError) as exc:
        ours.close()
        env = f"{config.name.upper()}_ISOLATION"
        raise ModelUnavailable(
            f"The {config.name} tier's backend cannot run in a worker process ({env}=process): "
            "its loader is not an importable function"
        ) from exc
    finally:
        theirs.close()  # only the child holds its end now, so its death reads as EOF here
    log.info("tier %s: worker process %s started", config.name, process.pid)
    return Child(process, ours)


@dataclass
class Child:
    """A child process and the parent's end of its pipe."""

    process: BaseProcess
    conn: Connection
    _reaping: threading.Lock = field(default_factory=threading.Lock)

    def reason(self) -> str:
        with self._reaping:  # two threads reaping one child at once: the second would see no exit code
            self.process.join(5)  # the pipe closes as the process dies; its exit code follows at once
            return exit_reason(self.process.exitcode)

    def stop(self, timeout: float) -> None:
        """Wait for a child told to stop; kill it when it does not."""
        with self._reaping:
            self.process.join(timeout)
            if self.process.is_alive():
                log.warning("worker process %s did not stop within %.0fs: killing it", self.process.pid, timeout)
                self.process.kill()
                self.process.join(5)


@dataclass
class Restarts:
    """A tier's consecutive worker crashes and when it may start again: the first crash restarts on
    the next request, repeated ones wait 1 s, 2 s, 4 s ... (at most a minute)."""

    crashes: int = 0
    retry_at: float = 0.0
    reason: str = ""

    def crashed(self, now: float, uptime: float, reason: str) -> None:
        self.crashes = 1 if uptime >= STABLE_SECONDS else self.crashes + 1
        wait = 0.0 if self.crashes == 1 else min(2.0 ** (self.crashes - 2), MAX_BACKOFF_SECONDS)
        self.retry_at, self.reason = now + wait, reason

    def check(self, tier: str, now: float) -> None:
        """Refuse while the backoff lasts (503 with Retry-After)."""
        wait = self.retry_at - now
        if wait > 0:
            raise TierCrashed(
                f"The {tier} tier's worker process crashed {self.crashes} times in a row ({self.reason}); "
                f"it restarts in {math.ceil(wait)} s",
                retry_after=math.ceil(wait),
            )
