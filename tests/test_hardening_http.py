"""Hardening of the HTTP face (issue 10, items 5, 7 and 8), each defect tested as a class.

- A request's head has a deadline: a slowloris socket (a byte at a time, or nothing at all) is closed,
  while a request whose head is complete may take as long as it needs.
- Oversized heads and malformed requests get the OpenAI envelope, whichever layer refuses them (h11's
  buffer limit, or the parsed-head check), never uvicorn's plain text.
- A body over `MAX_BODY_BYTES` is a 413, with or without Content-Length.
- Control characters in request fields never forge log lines.
- With `API_KEYS`, an unauthenticated `/health` is liveness only.

Connection-level tests run the real `server.py` (over the fakes) as a subprocess, since the head
deadline and h11's limits live in the uvicorn protocol that `ops/lifecycle.py` configures.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from core.protocols import Factory
from middleware.connection import MAX_HEADER_BYTES, MAX_HEADERS
from middleware.request_context import ControlCharacterFilter, escape_control
from tests.conftest import FAKE_ENV
from tests.processes import ServerProcess
from tests.waiting import DEADLINE_S, wait_for

HEADER_TIMEOUT = "0.5"
CHAT = {"model": "light", "messages": [{"role": "user", "content": "hi"}]}
KEYED = {**FAKE_ENV, "API_KEYS": "sk-first"}
PACE_S = 0.05  # how often a slowloris client sends its next byte (the attack's pace, not a wait)


def assert_envelope(body: dict[str, Any], code: str) -> dict[str, Any]:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    return body["error"]


# ---------------------------------------------------------------- raw HTTP/1.1 over a socket


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    def json(self) -> dict[str, Any]:
        assert self.headers.get("content-type", "").startswith("application/json"), self.headers
        return json.loads(self.body)


def parse_head(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, rest = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return status, headers, rest


def read_response(sock: socket.socket) -> Response:
    """One response, framed by Content-Length (the connection may stay open after it)."""
    raw = b""
    while b"\r\n\r\n" not in raw:
        chunk = sock.recv(65536)
        assert chunk, f"the server closed the connection before a whole response: {raw!r}"
        raw += chunk
    status, headers, body = parse_head(raw)
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "the server closed the connection inside a response body"
        body += chunk
    return Response(status, headers, body)


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:  # closing with our unread bytes makes the kernel send a reset
            return received
        if not chunk:
            return received
        received += chunk


def exchange_then_closed(port: int, request: bytes) -> Response:
    """Send `request` while reading: the server may answer and close before it has read it all."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:

        def send() -> None:
            try:
                sock.sendall(request)
            except OSError:  # reset or broken pipe once the server has answered and closed
                pass

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        raw = read_until_closed(sock)
        sender.join(DEADLINE_S)
    assert raw, "the server closed the connection without an answer"
    status, headers, body = parse_head(raw)
    return Response(status, headers, body)


def trickle_head(port: int) -> bytes:
    """A slowloris client: start a request's head, then add a byte to it every PACE_S, never finishing it.

    Returns what the server answered once it ended the connection (fails at DEADLINE_S if it never does).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        sock.settimeout(PACE_S)
        received = b""

        def answered() -> bool:
            nonlocal received
            try:
                sock.send(b"a")
                chunk = sock.recv(65536)
            except TimeoutError:
                return False  # nothing yet: the next byte goes out on the next poll
            except (ConnectionResetError, BrokenPipeError):
                return True
            received += chunk
            return not chunk  # b"" once the server has closed

        wait_for(answered, "the server ending a slowloris connection")
        return received


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """The real server.py over the fakes, with a short head deadline."""
    process = ServerProcess(tmp_path_factory.mktemp("hardening"), HEADER_TIMEOUT=HEADER_TIMEOUT)
    try:
        process.wait_port()
        yield process
    finally:
        process.stop()


# ---------------------------------------------------------------- the head deadline


def test_slowloris_heads_are_cut_off_with_a_408_envelope(server: ServerProcess) -> None:
    port = server.wait_port()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: trickle_head(port), range(8)))
    for raw in answers:
        status, headers, body = parse_head(raw)
        assert status == 408 and headers["connection"] == "close"
        assert_envelope(json.loads(body), "header_timeout")
    assert httpx.get(f"{server.url}/health", timeout=DEADLINE_S).status_code == 200  # others are served


def test_a_connection_that_never_sends_a_byte_is_closed(server: ServerProcess) -> None:
    with socket.create_connection(("127.0.0.1", server.wait_port()), timeout=DEADLINE_S) as sock:
        assert read_until_closed(sock) == b""  # closed without an answer: there was no request to answer


def test_a_complete_head_is_not_cut_off_however_long_the_request_takes(server: ServerProcess) -> None:
    port = server.wait_port()
    body = json.dumps(CHAT).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        sock.sendall(head + b"Content-Length: %d\r\n\r\n" % len(body))
        # A slowloris socket opened after our head was sent is cut off: the deadline has passed for us too.
        assert parse_head(trickle_head(port))[0] == 408
        sock.sendall(body)
        response = read_response(sock)
        assert response.status == 200 and response.json()["choices"][0]["message"]["content"] == "echo: hi"
        # The same connection serves its next request (the deadline restarts with each head).
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(sock).status == 200


# ---------------------------------------------------------------- heads the server refuses


def many_headers(count: int) -> bytes:
    return b"".join(b"X-Header-%d: v\r\n" % i for i in range(count))


@pytest.mark.parametrize(
    "extra",
    [b"X-Big: " + b"a" * 1024 * 1024 + b"\r\n", many_headers(10_000), many_headers(MAX_HEADERS + 1)],
    ids=["one-1MB-header", "10000-headers", "one-header-too-many"],
)
def test_oversized_heads_get_a_431_envelope(server: ServerProcess, extra: bytes) -> None:
    request = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra + b"\r\n"
    response = exchange_then_closed(server.wait_port(), request)
    assert response.status == 431
    assert_envelope(response.json(), "headers_too_large")


@pytest.mark.parametrize(
    "request_bytes",
    [b"NOT HTTP AT ALL\r\n\r\n", b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header\r\n\r\n", b"\x00\x01\r\n\r\n"],
    ids=["request-line", "header-line", "binary"],
)
def test_malformed_requests_get_a_400_envelope(server: ServerProcess, request_bytes: bytes) -> None:
    response = exchange_then_closed(server.wait_port(), request_bytes)
    assert response.status == 400
    assert_envelope(response.json(), "invalid_http_request")


def test_the_parsed_head_is_limited_in_count_and_size(make_client: Any) -> None:
    """The same limits in ASGI, for a head that arrived whole (h11 checks only an incomplete one)."""
    client = make_client()
    at_limit = {f"x-h-{i}": "v" for i in range(MAX_HEADERS - 10)}  # plus the client's own few
    assert client.get("/health", headers=at_limit).status_code == 200
    too_many = {f"x-h-{i}": "v" for i in range(MAX_HEADERS + 1)}
    assert_envelope(client.get("/health", headers=too_many).json(), "headers_too_large")
    big = client.get("/health", headers={"x-big": "a" * MAX_HEADER_BYTES})
    assert big.status_code == 431 and assert_envelope(big.json(), "headers_too_large")
    long_path = client.get("/health?" + "q" * MAX_HEADER_BYTES)
    assert long_path.status_code == 431


# ---------------------------------------------------------------- bodies over MAX_BODY_BYTES


def chunks_of(data: bytes, size: int = 1000) -> Iterator[bytes]:
    """`data` as a generator: the client then sends it chunked, without Content-Length."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/rerank"])
def test_a_body_over_the_limit_is_413_with_or_without_content_length(make_client: Any, path: str) -> None:
    client = make_client({**FAKE_ENV, "MAX_BODY_BYTES": "2048"})
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "z" * 4000}]}).encode()
    headers = {"Content-Type": "application/json"}
    sized = client.post(path, content=big, headers=headers)
    chunked = client.post(path, content=chunks_of(big), headers=headers)
    assert "content-length" not in chunked.request.headers
    for response in (sized, chunked):
        assert response.status_code == 413
        assert_envelope(response.json(), "payload_too_large")


def test_a_chunked_body_under_the_limit_is_served(make_client: Any) -> None:
    client = make_client({**FAKE_ENV, "MAX_BODY_BYTES": "2048"})
    body = json.dumps(CHAT).encode()
    response = client.post(
        "/v1/chat/completions", content=chunks_of(body, 7), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "echo: hi"


def test_a_chunked_body_over_the_limit_is_413_over_a_real_socket(server: ServerProcess) -> None:
    big = json.dumps({**CHAT, "messages": [{"role": "user", "content": "z" * 9_000_000}]}).encode()  # > 8 MiB
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    step = 65536
    body = b"".join(b"%x\r\n%s\r\n" % (len(big[i : i + step]), big[i : i + step]) for i in range(0, len(big), step))
    with socket.create_connection(("127.0.0.1", server.wait_port()), timeout=DEADLINE_S) as sock:
        sock.sendall(head + body + b"0\r\n\r\n")
        response = read_response(sock)
    assert response.status == 413
    assert_envelope(response.json(), "payload_too_large")


# ---------------------------------------------------------------- log injection

CONTROL_PATHS = ["/v1/%0aFORGED 200", "/v1/%0d%0aFORGED", "/%1b[31mred", "/a%e2%80%a8FORGED", "/a%c2%85FORGED", "/%00"]


@pytest.mark.parametrize("path", CONTROL_PATHS)
def test_control_characters_in_the_path_stay_on_one_access_log_line(
    make_client: Any, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    client = make_client()
    with caplog.at_level(logging.INFO, logger="llmservice.access"):
        client.get(path)
    lines = [r.getMessage() for r in caplog.records if r.name == "llmservice.access"]
    assert len(lines) == 1
    line = lines[0]
    assert line.isprintable(), line  # no newline, carriage return, escape, NUL or Unicode line break
    assert "\\x" in line or "\\u" in line


def test_a_quote_in_the_path_cannot_close_the_quoted_request_field(
    make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="llmservice.access"):
        make_client().get("/v1/models%22 200 fake")
    line = next(r.getMessage() for r in caplog.records if r.name == "llmservice.access")
    assert line.count('"') == 2 and '\\x22 200 fake"' in line


def test_escape_control_keeps_text_and_escapes_every_control_character() -> None:
    assert escape_control("plain /v1/chat/completions é 東京") == "plain /v1/chat/completions é 東京"
    assert escape_control("a\nb\rc\td\x1b\x7f\x85\u2028\u2029") == "a\\x0ab\\x0dc\\x09d\\x1b\\x7f\\x85\\u2028\\u2029"
    assert escape_control('say "hi"\\', quoted=True) == "say \\x22hi\\x22\\x5c"


def test_every_log_record_has_control_characters_escaped_in_its_arguments() -> None:
    """The filter `configure_logging` puts on every handler: request text logged anywhere stays on one line."""
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Collect()
    handler.addFilter(ControlCharacterFilter())
    logger = logging.getLogger("llmservice.test-escape")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("unknown model %s on %r", "x\nFORGED", "y\r\n")
        logger.warning("%(name)s asked", {"name": "z\nFORGED"})
        logger.warning("a message\nof two lines written by us")  # our own text is ours: left alone
    finally:
        logger.removeHandler(handler)
    assert records[0].startswith("unknown model x\\x0aFORGED on ") and "\n" not in records[0]
    assert records[1] == "z\\x0aFORGED asked"
    assert records[2] == "a message\nof two lines written by us"


def test_a_forged_line_never_reaches_the_server_log(server: ServerProcess) -> None:
    httpx.get(f"{server.url}/v1/%0aFORGED-LINE%0d%0aFORGED-TOO", timeout=DEADLINE_S)
    log = wait_for(lambda: server.log if "FORGED-TOO" in server.log else "", "the access line in the log")
    assert not [line for line in log.splitlines() if line.startswith("FORGED")]
    assert "/v1/\\x0aFORGED-LINE\\x0d\\x0aFORGED-TOO" in log


# ---------------------------------------------------------------- /health with API_KEYS


def test_with_keys_an_anonymous_health_is_liveness_only(make_client: Any) -> None:
    client = make_client(KEYED)
    for headers in ({}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": "Basic x"}):
        response = client.get("/health", headers=headers)
        assert response.status_code == 200 and response.json() == {"status": "ok"}
    detailed = client.get("/health", headers={"Authorization": "Bearer sk-first"}).json()
    assert detailed["status"] == "ok" and detailed["tiers"]["light"]["state"] == "unloaded"
    assert "uptime_seconds" in detailed


def test_without_keys_health_keeps_its_details(make_client: Any) -> None:
    data = make_client().get("/health").json()
    assert data["status"] == "ok" and set(data["tiers"]) == {"light", "medium"}


def test_with_keys_a_failed_tier_shows_degraded_but_no_reason_without_a_key(make_client: Any) -> None:
    secret = "/very/secret/models/light.gguf"

    def failing(tier: Any, settings: Any) -> Any:
        raise FileNotFoundError(f"no model file at {secret}")

    class Registry:
        def factories(self) -> dict[str, Factory]:
            return {"chat:llamacpp": failing}

    client = make_client(KEYED, registry=Registry())
    key = {"Authorization": "Bearer sk-first"}
    assert client.post("/v1/chat/completions", json=CHAT, headers=key).status_code == 503
    public = client.get("/health")
    assert public.json() == {"status": "degraded"} and "light" not in public.text and "secret" not in public.text
    detailed = client.get("/health", headers=key).json()
    assert detailed["status"] == "degraded" and detailed["tiers"]["light"]["state"] == "failed"


def test_dashboard_page_is_still_public_and_health_keeps_the_envelope_on_a_bad_host(make_client: Any) -> None:
    client = make_client(KEYED)
    assert client.get("/admin").status_code == 200
    refused = client.get("/health", headers={"Host": "evil.example"})
    assert refused.status_code == 400 and assert_envelope(refused.json(), "host_not_allowed")
