"""Replicas: the Redis cache tier (hits, and what a dead or frozen Redis costs) and the Ray Serve hop.

    .venv/bin/python bench/bench_replicas.py [--requests 300] [--ray]

Loopback only, each server in its own process over the tests' fake models (`python -m tests.serve_fakes`),
sequential keep-alive requests, non-streamed chat at temperature 0:
- cache hits: from memory (default), from Redis (CACHE_MAX_SIZE=0, so every lookup goes there), and
  the cache off (the fake model computes every answer) for scale;
- Redis away: distinct requests (each a miss that asks Redis) with Redis healthy, on a closed port,
  behind a server that accepts and never answers, and SIGSTOPped; with the default cooldown (5 s:
  one request pays the timeout, the rest bypass) and with REDIS_COOLDOWN_SECONDS=0 (every request
  probes: the worst case, REDIS_TIMEOUT_MS each);
- `--ray`: a local Ray (2 CPUs, loopback) with 2 replicas: start-up time, the memory (USS) of Ray's
  processes, and the Serve proxy's hop against a direct server process.
Prints Markdown tables; writes the raw numbers to bench/results/bench_replicas.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.report import table  # noqa: E402
from tests.conftest import FAKE_ENV  # noqa: E402

RESULTS = REPO / "bench" / "results" / "bench_replicas.json"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_up(url: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1, trust_env=False).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not start")


@contextlib.contextmanager
def server(**env: str) -> Iterator[str]:
    port = free_port()
    with tempfile.TemporaryDirectory() as work:
        full = {**os.environ, "PYTHONPATH": str(REPO), **FAKE_ENV, "PORT": str(port), "LOG_LEVEL": "error"}
        full |= {"PORT_FILE": f"{work}/.port", "CACHE_DIR": f"{work}/cache", **env}
        proc = subprocess.Popen([sys.executable, "-m", "tests.serve_fakes"], cwd=work, env=full)
        try:
            wait_up(f"http://127.0.0.1:{port}", proc)
            yield f"http://127.0.0.1:{port}"
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


@contextlib.contextmanager
def redis_server() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    break
            time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0", proc
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait(10)


def body(text: str) -> dict[str, Any]:
    return {"model": "light", "temperature": 0, "messages": [{"role": "user", "content": text}]}


def timed(url: str, bodies: list[dict[str, Any]]) -> list[float]:
    """Milliseconds per request, sequential, one keep-alive connection."""
    out = []
    with httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
        client.get("/health")
        for payload in bodies:
            start = time.perf_counter()
            response = client.post("/v1/chat/completions", json=payload)
            out.append((time.perf_counter() - start) * 1000)
            assert response.status_code == 200, response.text
    return out


def summary(name: str, values: list[float], base: float | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "case": name,
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values),
    }
    if base is not None:
        row["extra_p50"] = row["p50"] - base
    return row


def hits(requests: int, rounds: int = 4) -> list[dict[str, Any]]:
    """The three servers side by side, measured in alternating rounds: drift on a shared machine hits
    each alike."""
    same = [body("the same question")] * (requests // rounds)
    cases: dict[str, list[float]] = {}
    with (
        redis_server() as (url, _),
        server() as memory,
        server(CACHE_REDIS_URL=url, CACHE_MAX_SIZE="0") as shared,
        server(ENABLE_CACHE="false") as off,
    ):
        targets = {"memory hit": memory, "Redis hit (no memory tier)": shared, "cache off (fake model computes)": off}
        for url_of in targets.values():
            timed(url_of, same[:1])  # the entry exists before any round
        for _ in range(rounds):
            for name, target in targets.items():
                cases.setdefault(name, []).extend(timed(target, same))
    return [summary(name, values) for name, values in cases.items()]


def redis_away(requests: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    fresh = iter(range(10**9))

    def misses() -> list[dict[str, Any]]:
        return [body(f"question {next(fresh)}") for _ in range(requests)]

    with server() as alone:
        base = percentile(timed(alone, misses()), 50)
        rows.append({"case": "no Redis configured (misses)", "p50": base})
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1024)
    try:
        with redis_server() as (url, proc):
            cases = [
                ("Redis healthy", url, None),
                ("closed port", f"redis://127.0.0.1:{free_port()}/0", None),
                ("never answers", f"redis://127.0.0.1:{silent.getsockname()[1]}/0", None),
                ("SIGSTOPped", url, proc),
            ]
            for cooldown in ("5", "0"):
                for name, target, frozen in cases:
                    if frozen is not None:
                        os.kill(frozen.pid, signal.SIGSTOP)
                    try:
                        with server(CACHE_REDIS_URL=target, REDIS_COOLDOWN_SECONDS=cooldown) as front:
                            values = timed(front, misses())
                    finally:
                        if frozen is not None:
                            os.kill(frozen.pid, signal.SIGCONT)
                    rows.append(summary(f"{name}, cooldown {cooldown} s", values, base))
    finally:
        silent.close()
    return rows


def ray_hop(requests: int) -> dict[str, Any]:
    os.environ.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"})
    import psutil
    import ray
    from ray import serve

    from scale.ray_serve import deployment

    result: dict[str, Any] = {}
    start = time.monotonic()
    ray.init(
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        num_cpus=2,
        object_store_memory=100 * 1024 * 1024,
        runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},
        log_to_driver=False,
    )
    result["ray_init_s"] = time.monotonic() - start
    me = psutil.Process()
    result["ray_uss_mb"] = sum(p.memory_full_info().uss for p in me.children(recursive=True)) / 2**20
    port = free_port()
    start = time.monotonic()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(deployment(2, env=dict(FAKE_ENV), factories="tests.ray_fakes:factories", num_cpus=0.5), name="bench")
    url = f"http://127.0.0.1:{port}"
    wait_up(url)
    result["serve_up_s"] = time.monotonic() - start
    result["with_replicas_uss_mb"] = sum(p.memory_full_info().uss for p in me.children(recursive=True)) / 2**20
    plain = [{**body("hop"), "temperature": 0.5}] * requests  # never cached: the fake model answers each
    via_serve: list[float] = []
    direct: list[float] = []
    with server() as alone:
        for _ in range(4):  # alternating rounds: drift on a shared machine hits both alike
            via_serve += timed(url, plain[: requests // 4])
            direct += timed(alone, plain[: requests // 4])
    result["direct_p50_ms"] = percentile(direct, 50)
    result["serve_p50_ms"] = percentile(via_serve, 50)
    result["hop_p50_ms"] = result["serve_p50_ms"] - result["direct_p50_ms"]
    serve.shutdown()
    ray.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--ray", action="store_true", help="also measure Ray Serve (needs ray[serve])")
    args = parser.parse_args()
    results: dict[str, Any] = {"hits": hits(args.requests), "redis_away": redis_away(args.requests)}
    columns = [("case", "case"), ("p50", "p50 ms"), ("p99", "p99 ms"), ("max", "max ms")]
    print(table(results["hits"], columns))
    print()
    print(table(results["redis_away"], [*columns, ("extra_p50", "p50 over no Redis, ms")]))
    if args.ray:
        results["ray"] = ray_hop(args.requests)
        print()
        print(table([results["ray"]], [(k, k) for k in results["ray"]]))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
