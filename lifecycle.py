"""Process lifecycle: bind the socket, publish `.port`, run uvicorn, exit on inactivity.

`.port` is written only once the socket is bound (so a reader can always connect), atomically
(temp file + rename), and removed on exit only if it still names this process.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import tempfile
from pathlib import Path
from typing import Any

from config import Settings

log = logging.getLogger("llmservice.lifecycle")
PORT_SEARCH = 100  # how many ports above PORT to try when it is taken


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
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{port}\n")
    os.replace(tmp, target)


def remove_port_file(path: str, port: int) -> None:
    """Remove `.port` only if it still names our port (another instance may have replaced it)."""
    target = Path(path)
    try:
        if target.read_text().strip() == str(port):
            target.unlink()
    except FileNotFoundError:
        pass


def read_port_file(path: str) -> int | None:
    try:
        return int(Path(path).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


async def watch_inactivity(server: Any, manager: Any, timeout: float, poll: float = 1.0) -> None:
    """Ask uvicorn to exit after `timeout` seconds with nothing in flight."""
    loop = asyncio.get_running_loop()
    idle_since = loop.time()
    while not server.should_exit:
        await asyncio.sleep(poll)
        if manager.in_flight > 0:
            idle_since = loop.time()
            continue
        last_use = max((t.last_use for t in manager.tiers.values()), default=0.0)
        idle_since = max(idle_since, last_use if last_use else idle_since)
        if loop.time() - idle_since >= timeout:
            log.info("no requests for %.0fs: shutting down", timeout)
            server.should_exit = True


def serve(app: Any, settings: Settings) -> int:
    import uvicorn

    sock = bind_socket(settings.host, settings.port)
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level=settings.log_level if settings.log_level != "trace" else "debug",
        timeout_graceful_shutdown=30,
        access_log=False,
    )
    server = uvicorn.Server(config)

    async def run() -> None:
        watcher = None
        if settings.shutdown_timeout > 0:
            watcher = asyncio.ensure_future(watch_inactivity(server, app.state.manager, settings.shutdown_timeout))
        write_port_file(settings.port_file, port)
        log.info("llmservice listening on http://%s:%d (port written to %s)", settings.host, port, settings.port_file)
        try:
            await server.serve(sockets=[sock])
        finally:
            if watcher is not None:
                watcher.cancel()
            remove_port_file(settings.port_file, port)

    asyncio.run(run())
    return 0
