"""The remote tier's hop: latency it adds against calling the upstream directly, and failover costs.

    .venv/bin/python bench/bench_remote.py [--requests 200] [--rounds 4]

Loopback only, each server in its own process (in one process the GIL's 5 ms switch interval would
be what is measured): the stand-in upstream of the tests (tests/upstreams.py, an OpenAI chat server
that answers at once in three streamed pieces) and `server.py` with the medium tier served by it.
Sequential keep-alive requests (TCP_NODELAY), in alternating rounds (direct, through the hop, ...),
so drift on a shared machine hits both sides alike:
- non-streamed chat: latency of the whole request (p50, p90);
- streamed chat: time to the first text chunk (TTFT);
- failover: a pool of [broken, healthy] with breakers that never open, so every request tries the
  broken upstream first, against a pool of the healthy one alone. Broken is a dead port (connection
  refused) or a port that accepts and never answers (that costs FIRST_BYTE_TIMEOUT, here 1 s).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
BODY = {"model": "medium", "messages": [{"role": "user", "content": "SAY:abcdefghi"}], "max_tokens": 8}
UPSTREAM = (
    "import uvicorn; from tests.upstreams import StandIn, build; "
    "uvicorn.run(build(StandIn('gpu')), port={port}, log_level='warning')"
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(f"{url}/v1/models", timeout=1, trust_env=False)
            return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not start")


@contextlib.contextmanager
def upstream() -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", UPSTREAM.format(port=port)], cwd=REPO, env=env)
    try:
        wait_up(f"http://127.0.0.1:{port}", proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@contextlib.contextmanager
def front(urls: list[str], **extra: str) -> Iterator[str]:
    with tempfile.TemporaryDirectory() as work:
        port_file = Path(work) / ".port"
        env = {
            **os.environ,
            "PORT": "0",
            "PORT_FILE": str(port_file),
            "LOG_LEVEL": "error",
            "ENABLE_CACHE": "false",
            "LIGHT_MODEL_PATH": "",
            "EMBEDDING_MODEL_PATH": "",
            "RERANKER_MODEL_PATH": "",
            "MEDIUM_UPSTREAMS": ",".join(urls),
            "MEDIUM_UPSTREAM_MODEL": "upstream-model",
            **extra,
        }
        proc = subprocess.Popen([sys.executable, str(REPO / "server.py")], cwd=work, env=env)
        try:
            deadline = time.monotonic() + 120
            while not port_file.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            url = f"http://127.0.0.1:{port_file.read_text().strip()}"
            wait_up(url, proc)
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)


def client() -> httpx.Client:
    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    return httpx.Client(timeout=60, transport=transport, trust_env=False)


def whole(http: httpx.Client, url: str) -> float:
    start = time.perf_counter()
    http.post(f"{url}/v1/chat/completions", json=BODY).raise_for_status()
    return time.perf_counter() - start


def first_chunk(http: httpx.Client, url: str) -> float:
    start = time.perf_counter()
    ttft = 0.0
    with http.stream("POST", f"{url}/v1/chat/completions", json={**BODY, "stream": True}) as response:
        for line in response.iter_lines():
            if not ttft and '"content":"abc"' in line.replace(" ", ""):
                ttft = time.perf_counter() - start
    return ttft


def hop(requests: int, rounds: int) -> dict[str, Any]:
    samples: dict[str, dict[str, list[float]]] = {"whole": {"direct": [], "hop": []}, "ttft": {"direct": [], "hop": []}}
    with upstream() as direct, front([f"{direct}/v1"]) as ours, client() as http:
        for _ in range(20):  # warm-up: connections, first-call costs
            whole(http, direct), whole(http, ours)
        per_round = max(1, requests // rounds)
        for _ in range(rounds):
            for side, url in (("direct", direct), ("hop", ours)):
                samples["whole"][side] += [whole(http, url) for _ in range(per_round)]
                samples["ttft"][side] += [first_chunk(http, url) for _ in range(per_round)]
    summary: dict[str, Any] = {}
    for measure, sides in samples.items():
        direct_p50, hop_p50 = statistics.median(sides["direct"]), statistics.median(sides["hop"])
        summary[measure] = {
            "direct_p50_ms": round(direct_p50 * 1000, 2),
            "hop_p50_ms": round(hop_p50 * 1000, 2),
            "added_p50_ms": round((hop_p50 - direct_p50) * 1000, 2),
            "hop_p90_ms": round(percentile(sides["hop"], 90) * 1000, 2),
            "requests": len(sides["hop"]),
        }
    return summary


def failover(requests: int) -> dict[str, Any]:
    refusing = socket.socket()
    refusing.bind(("127.0.0.1", 0))  # bound, never listening: connection refused
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(256)  # the kernel accepts; nobody answers
    results: dict[str, Any] = {}
    with upstream() as live:
        pools = {
            "healthy": ([f"{live}/v1"], requests),
            "dead_port_first": ([f"http://127.0.0.1:{refusing.getsockname()[1]}/v1", f"{live}/v1"], requests),
            "silent_first": ([f"http://127.0.0.1:{silent.getsockname()[1]}/v1", f"{live}/v1"], 6),
        }
        for name, (urls, count) in pools.items():
            # Breakers that never open, so every request meets the broken upstream first (the pool's
            # rotation moves on by one per pick, and each request here picks twice).
            env = {"MEDIUM_BREAKER_FAILURES": "1000000", "MEDIUM_FIRST_BYTE_TIMEOUT": "1"}
            with front(urls, **env) as ours, client() as http:
                for _ in range(10 if name != "silent_first" else 0):
                    whole(http, ours)
                times = [whole(http, ours) for _ in range(count)]
            results[name] = {"p50_ms": round(statistics.median(times) * 1000, 2), "requests": count}
    refusing.close()
    silent.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    print(json.dumps({"hop": hop(args.requests, args.rounds), "failover": failover(args.requests)}, indent=2))


if __name__ == "__main__":
    main()
