"""The one thread that owns a loaded model (chat schedulers and micro-batching workers share it)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any


class OwnerThread:
    """The one thread that owns a model: it creates the model (so every library call happens on it),
    reports through `ready`, then runs the subclass's `_serve` loop until `shutdown`.

    MLX streams are thread-local and llama.cpp contexts are not thread-safe, hence one owner each.
    """

    def __init__(self, loader: Callable[[], Any], name: str, thread_name: str) -> None:
        self.model: Any = None  # set on the owner thread by the loader
        self.ready: Future[None] = Future()  # done when the model is loaded (or failed to load)
        self.name = name
        self._loader = loader
        self._cond = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._main, name=thread_name, daemon=True)

    def _main(self) -> None:
        try:
            self.model = self._loader()
        except BaseException as exc:  # noqa: BLE001 - reported through the future
            self._stopping = True
            self.ready.set_exception(exc)
            return
        self.ready.set_result(None)
        self._serve()

    def _serve(self) -> None:
        raise NotImplementedError

    def _on_stop(self) -> None:
        """Called under the lock when shutdown begins (cancel what is running)."""

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._on_stop()
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
