"""A real `server.py` process over the fake backends, with its own `.port` file and log."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import FAKE_ENV
from tests.waiting import DEADLINE_S, wait_for

REPO = Path(__file__).resolve().parent.parent


class ServerProcess:
    """`python -m tests.serve_fakes` in `workdir` with PORT=0 and PORT_FILE=<workdir>/.port by default."""

    def __init__(self, workdir: Path, port_file: Path | None = None, **env: str) -> None:
        self.workdir = workdir
        self.port_file = port_file or workdir / ".port"
        self.log_path = workdir / f"server-{time.monotonic_ns()}.log"
        full_env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": os.environ.get("HOME", str(workdir)),
            "PYTHONPATH": str(REPO),
            "HF_HUB_OFFLINE": "1",
            "LOG_LEVEL": "info",
            **FAKE_ENV,
            "PORT": "0",
            "PORT_FILE": str(self.port_file),
            "CACHE_DIR": str(workdir / "cache"),
            **env,
        }
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.serve_fakes"],
            cwd=workdir,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def read_port(self) -> int | None:
        try:
            return int(self.port_file.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def wait_port(self, timeout: float = DEADLINE_S) -> int:
        """The published port, once `.port` names it (fails early if the process died)."""

        def published() -> bool:
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}:\n{self.log}"
            return self.read_port() is not None

        wait_for(published, "the .port file", timeout)
        port = self.read_port()
        assert port is not None
        return port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.read_port()}"

    def signal(self, sig: int = signal.SIGTERM) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = DEADLINE_S) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()
