"""TLS for a directly exposed port: SSL_CERTFILE / SSL_KEYFILE handed to uvicorn, checked at start-up."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from config import ConfigError, load_settings
from tests.processes import ServerProcess
from tests.waiting import DEADLINE_S


def self_signed(folder: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=DEADLINE_S,
    )  # fmt: skip
    return cert, key


def test_tls_needs_both_files_and_readable_ones(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("-")
    with pytest.raises(ConfigError, match="SSL_CERTFILE is set but SSL_KEYFILE is empty"):
        load_settings({"SSL_CERTFILE": str(cert)})
    with pytest.raises(ConfigError, match="SSL_KEYFILE is set but SSL_CERTFILE is empty"):
        load_settings({"SSL_KEYFILE": str(cert)})
    with pytest.raises(ConfigError, match="SSL_KEYFILE has value .*missing.pem.*not a readable file"):
        load_settings({"SSL_CERTFILE": str(cert), "SSL_KEYFILE": str(tmp_path / "missing.pem")})
    settings = load_settings({"SSL_CERTFILE": str(cert), "SSL_KEYFILE": str(cert)})
    assert (settings.ssl_certfile, settings.ssl_keyfile) == (str(cert), str(cert))


def test_the_server_speaks_https_with_the_certificate(tmp_path: Path, processes: list[Any]) -> None:
    cert, key = self_signed(tmp_path)
    server = ServerProcess(tmp_path, SSL_CERTFILE=str(cert), SSL_KEYFILE=str(key))
    processes.append(server)
    port = server.wait_port()
    trusted = ssl.create_default_context(cafile=str(cert))
    response = httpx.get(f"https://127.0.0.1:{port}/health", verify=trusted, timeout=DEADLINE_S)
    assert response.status_code == 200 and response.json()["status"] == "ok"
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/health", timeout=DEADLINE_S)  # plain http is not spoken
    assert f"https://127.0.0.1:{port}" in server.log
