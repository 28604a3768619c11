"""A real `redis-server` for the tests, on a free loopback port, with no persistence.

Debian's `redis-server` package provides the binary (.ci/run installs it); without it the Redis tests
skip, naming the package. Tests may freeze the server (SIGSTOP), kill it and start it again on the
same port, to see the service fail open and come back.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest
import redis

from tests.waiting import wait_for

BINARY = shutil.which("redis-server")
MISSING = "redis-server is not installed (apt-get install redis-server; .ci/run does it)"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    def __init__(self, folder: Path) -> None:
        if BINARY is None:
            pytest.skip(MISSING)
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        assert BINARY is not None
        command = [BINARY, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        self.log = open(self.folder / f"redis-{self.port}.log", "ab")  # noqa: SIM115 - closed in kill()
        self.proc = subprocess.Popen([*command, "--dir", str(self.folder)], stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(lambda: self._dead() or _pong(self.port), f"redis-server answering on port {self.port}")
        assert not self._dead(), f"redis-server exited: {(self.folder / f'redis-{self.port}.log').read_text()}"

    def _dead(self) -> bool:
        return self.proc is None or self.proc.poll() is not None

    def freeze(self) -> None:
        """SIGSTOP: connections are still accepted by the kernel, and never answered."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.thaw()
            self.proc.kill()
            self.proc.wait(30)
        self.proc = None
        self.log.close()

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=10)


class SilentServer:
    """A TCP server that accepts connections and never answers: a Redis frozen in the network."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = int(self.sock.getsockname()[1])
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self.sock.close()
