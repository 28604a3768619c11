"""Process lifecycle: one instance per `.port`, bind, publish the port, serve, drain, exit.

`.port` is written only once the socket is bound and listening (so a reader can always connect),
atomically (temp file + rename), and removed on exit only if it still names this instance. An
exclusive lock next to it (`<PORT_FILE>.lock`, held for the life of the process and released by the
kernel even on a crash) decides which of two instances started at once serves; the other exits
naming the running one's port and never touches `.port`.

Exit paths share one drain: SIGTERM, Ctrl-C and `SHUTDOWN_TIMEOUT` inactivity. While draining, new
requests get 503 (`shutting_down`); requests in flight (a stream until its last byte) get up to
`DRAIN_TIMEOUT` seconds to finish, then are cancelled; then uvicorn stops, the models unload, the
disk cache closes and `.port` is removed. A second Ctrl-C exits at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO

from starlette.applications import Starlette

from config import Settings
from middleware.activity import Activity
from middleware.connection import MAX_HEADER_BYTES, head_guard
from model_manager import ModelManager

log = logging.getLogger("llmservice.lifecycle")
PORT_SEARCH = 100  # how many ports above PORT to try when it is taken
PORT_FILE_WAIT = 30.0  # seconds a second instance waits for the first one's .port to name it
CANCEL_GRACE = 5.0  # seconds cancelled requests get to send their last event after the drain deadline


# ---------------------------------------------------------------- inactivity


async def watch_inactivity(activity: Activity, timeout: float, on_idle: Callable[[], None], poll: float = 1.0) -> None:
    """Call `on_idle` once nothing has been in flight for `timeout` seconds."""
    while True:
        await asyncio.sleep(min(poll, timeout))
        if activity.in_flight == 0 and activity.clock() - activity.last_activity >= timeout:
            log.info("no requests for %.0fs: shutting down", timeout)
            on_idle()
            return


# ---------------------------------------------------------------- socket and .port


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind `port`, or the next free one above it; port 0 lets the OS choose."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    candidates = [0] if port == 0 else range(port, min(port + PORT_SEARCH, 65536))
    last_error: OSError | None = None
    for candidate in candidates:
        # IPPROTO_TCP (not 0) so asyncio sets TCP_NODELAY on accepted connections: without it every
        # small write (an SSE chunk, a keep-alive response) waits ~40 ms on Nagle + delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, candidate))
        except OSError as exc:
            sock.close()
            if exc.errno not in (errno.EADDRINUSE, errno.EACCES):
                raise
            last_error = exc
            continue
        sock.listen(2048)
        sock.setblocking(False)
        if candidate != port and port != 0:
            log.warning("port %d is taken; listening on %d instead", port, candidate)
        return sock
    raise OSError(f"no free port in {port}..{port + PORT_SEARCH - 1}") from last_error


def write_port_file(path: str, port: int) -> None:
    target = Path(path).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".port.", dir=target.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(f"{port}\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def remove_port_file(path: str, port: int) -> None:
    """Remove `.port` only if it still names our port (another instance may have replaced it)."""
    if read_port_file(path) == port:
        with contextlib.suppress(FileNotFoundError):
            Path(path).unlink()


def read_port_file(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def acquire_instance_lock(port_file: str) -> IO[bytes] | None:
    """An exclusive lock on `<port_file>.lock`, or None when another live instance holds it."""
    import fcntl

    lock_path = Path(port_file).resolve().with_name(Path(port_file).name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_path, "a+b")  # noqa: SIM115 - held open for the life of the process
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def wait_for_port_file(path: str, timeout: float = PORT_FILE_WAIT) -> int | None:
    """The port the running instance publishes (it may still be binding when we look)."""
    deadline = time.monotonic() + timeout
    while True:
        port = read_port_file(path)
        if port is not None or time.monotonic() >= deadline:
            return port
        time.sleep(0.05)  # another process is starting: nothing to wait on but the file itself


# ---------------------------------------------------------------- serving


class DrainingServer:
    """uvicorn's Server with a drain before exit, started by a signal or by inactivity."""

    def __init__(self, app: Starlette, settings: Settings) -> None:
        import uvicorn

        class _Server(uvicorn.Server):
            def handle_exit(inner, sig: int, frame: FrameType | None) -> None:  # noqa: N805
                self.on_signal(sig)

            async def on_tick(inner, counter: int) -> bool:  # noqa: N805
                if self.reason and self._drain is None:
                    self._drain = asyncio.ensure_future(self.drain())
                return await super().on_tick(counter)

        config = uvicorn.Config(
            app,
            log_level=settings.log_level if settings.log_level != "trace" else "debug",
            timeout_graceful_shutdown=int(CANCEL_GRACE),
            access_log=False,
            # One protocol whether or not httptools is installed: h11 with a deadline on each head.
            http=head_guard(settings.header_timeout),
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            ssl_certfile=settings.ssl_certfile or None,
            ssl_keyfile=settings.ssl_keyfile or None,
        )
        self.server = _Server(config)
        # ops sits beside api and does not import it (api.state imports ops), so the typed state is
        # read here, once, into typed fields.
        self.activity: Activity = app.state.llm.activity
        self.manager: ModelManager = app.state.llm.manager
        self.settings = settings
        self.reason = ""
        self._drain: asyncio.Future[None] | None = None

    def on_signal(self, sig: int) -> None:
        """Called in the signal handler: only set flags; the drain starts on uvicorn's next tick."""
        if self.reason and sig == signal.SIGINT:
            self.server.force_exit = True
            self.server.should_exit = True
            return
        self.reason = self.reason or signal.Signals(sig).name

    def request_exit(self, reason: str) -> None:
        self.reason = self.reason or reason

    async def drain(self) -> None:
        activity = self.activity
        activity.draining = True
        timeout = self.settings.drain_timeout
        log.info("draining (%s): %d request(s) in flight, up to %.0fs", self.reason, activity.in_flight, timeout)
        if not await activity.wait_idle(timeout):
            log.warning("drain deadline passed: cancelling %d request(s)", activity.in_flight)
            await self.manager.close()
            await activity.wait_idle(CANCEL_GRACE)
        self.server.should_exit = True

    async def serve(self, sock: socket.socket, port: int) -> None:
        watcher = None
        if self.settings.shutdown_timeout > 0:
            activity = self.activity
            on_idle = lambda: self.request_exit("inactivity")  # noqa: E731
            watcher = asyncio.ensure_future(watch_inactivity(activity, self.settings.shutdown_timeout, on_idle))
        write_port_file(self.settings.port_file, port)
        log.info(
            "llmservice listening on %s://%s:%d (port written to %s)",
            "https" if self.settings.ssl_certfile else "http",
            self.settings.host,
            port,
            self.settings.port_file,
        )
        try:
            await self.server.serve(sockets=[sock])
        finally:
            if watcher is not None:
                watcher.cancel()
            remove_port_file(self.settings.port_file, port)


@contextlib.contextmanager
def single_instance(port_file: str) -> Iterator[bool]:
    """True while this process is the one instance for `port_file`."""
    lock = acquire_instance_lock(port_file)
    try:
        yield lock is not None
    finally:
        if lock is not None:
            lock.close()


def serve(app: Starlette, settings: Settings, run: Callable[[Awaitable[None]], None] = asyncio.run) -> int:
    """Serve until drained; 0 on a clean exit, 1 when another instance already serves `PORT_FILE`
    or no port could be bound."""
    with single_instance(settings.port_file) as alone:
        if not alone:
            port = wait_for_port_file(settings.port_file)
            where = f"on port {port}" if port is not None else "(it has not published its port yet)"
            log.error(
                "another llmservice instance is already running %s, per %s; not starting a second one",
                where,
                settings.port_file,
            )
            return 1
        try:
            sock = bind_socket(settings.host, settings.port)
        except OSError as exc:
            log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
            return 1
        port = sock.getsockname()[1]
        run(DrainingServer(app, settings).serve(sock, port))
    return 0
