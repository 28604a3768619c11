"""Replicas: the Redis cache tier (hits, and what a dead or frozen Redis costs) and the Ray Serve hop.

    .venv/bin/python bench/bench_replicas.py [--requests 300] [--ray]

Loopback only, each server in its own process over the tests' fake models (`python -m tests.serve_fakes`),
sequential keep-alive requests, non-streamed chat at temperature 0:
- cache hits: from memory (default), from Redis (CACHE_MAX_SIZE=0, so every lookup goes there), and
  the cache off (the fake model computes every answer) for scale;
- Redis away: distinct requests (each a miss that asks Redis) with Redis healthy, on a closed port,
  behind a server that accepts and never answers, and SIGSTOPped; with the default cooldown (5 s:
  one request pays the timeout, the rest bypass) and with REDIS_COOLDOWN_SECONDS=0 (every request
  probes: the worst case, REDIS_TIMEOUT_MS each); against the cache off;
- `--ray`: a local Ray (2 CPUs, loopback) with 2 replicas: start-up time, the memory (USS) of Ray's
  processes, the Serve proxy's hop against a direct server process, and throughput (16 clients at
  once) of 2 replicas, then 1, through the proxy against one direct process.
Servers compared run at once and take requests in turn (one to each, then the next); the load average
is recorded.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.report import table, write_section  # noqa: E402
from tests.conftest import FAKE_ENV  # noqa: E402

RESULTS = REPO / "bench" / "results" / "bench_replicas.json"
CONCURRENCY = 16  # clients at once in the throughput rounds
REDIS_HIT_TARGET_MS = 2.5  # issue 12: a hit from the Redis tier through HTTP, p50
DEAD_REDIS_TARGET_MS = 5.0  # issue 12: p50 while Redis is away, over the cache off
AWAY = ("closed port", "never answers", "SIGSTOPped")


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


def interleaved(targets: dict[str, str], make: Callable[[], dict[str, Any]], count: int) -> dict[str, list[float]]:
    """Milliseconds per request for each server, `count` each, one request to each server in turn (each
    turn starting with the next server): on a shared machine a burst of load hits every case alike."""
    clients = {name: httpx.Client(base_url=url, timeout=60, trust_env=False) for name, url in targets.items()}
    out: dict[str, list[float]] = {name: [] for name in targets}
    names = list(targets)
    try:
        for client in clients.values():
            client.get("/health")
        for turn in range(count):
            for name in names[turn % len(names) :] + names[: turn % len(names)]:
                start = time.perf_counter()
                response = clients[name].post("/v1/chat/completions", json=make())
                out[name].append((time.perf_counter() - start) * 1000)
                assert response.status_code == 200, response.text
    finally:
        for client in clients.values():
            client.close()
    return out


def hits(requests: int) -> list[dict[str, Any]]:
    """The three servers side by side, requests interleaved."""
    same = [body("the same question")]
    with (
        redis_server() as (url, _),
        server() as memory,
        server(CACHE_REDIS_URL=url, CACHE_MAX_SIZE="0") as shared,
        server(ENABLE_CACHE="false") as off,
    ):
        targets = {"memory hit": memory, "Redis hit (no memory tier)": shared, "cache off (fake model computes)": off}
        for url_of in targets.values():
            timed(url_of, same[:1])  # the entry exists before any round
        cases = interleaved(targets, lambda: same[0], requests)
    return [summary(name, cases[name]) for name in targets]


def redis_away(requests: int) -> list[dict[str, Any]]:
    """Misses (distinct requests) on servers that all run at once, requests interleaved; each row is
    compared with the cache off (the fake model computes every answer, no cache code runs)."""
    fresh = iter(range(10**9))

    silent = socket.socket()  # accepts (the kernel's backlog) and never answers
    silent.bind(("127.0.0.1", 0))
    silent.listen(1024)
    dead = f"redis://127.0.0.1:{free_port()}/0"
    never = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
    cases: dict[str, list[float]] = {}
    try:
        with contextlib.ExitStack() as stack:
            healthy, _ = stack.enter_context(redis_server())
            frozen_url, frozen = stack.enter_context(redis_server())
            targets = {
                "cache off": stack.enter_context(server(ENABLE_CACHE="false")),
                "cache on, no Redis configured": stack.enter_context(server()),
            }
            for cooldown in ("5", "0"):
                for name, url in [
                    ("Redis healthy", healthy),
                    ("closed port", dead),
                    ("never answers", never),
                    ("SIGSTOPped", frozen_url),
                ]:
                    front = server(CACHE_REDIS_URL=url, REDIS_COOLDOWN_SECONDS=cooldown)
                    targets[f"{name}, cooldown {cooldown} s"] = stack.enter_context(front)
            os.kill(frozen.pid, signal.SIGSTOP)  # after its servers are up: their /health never asks Redis
            try:
                cases = interleaved(targets, lambda: body(f"question {next(fresh)}"), requests)
            finally:
                os.kill(frozen.pid, signal.SIGCONT)
    finally:
        silent.close()
    base = percentile(cases["cache off"], 50)
    return [summary(name, cases[name], base) for name in targets]


async def _load(url: str, concurrency: int, count: int) -> float:
    """Requests per second: `count` uncached chat requests, `concurrency` at a time."""
    import asyncio

    payload = {**body("throughput"), "temperature": 0.5}  # never cached: the fake model answers each
    queue = iter(range(count))

    async def worker(client: httpx.AsyncClient) -> None:
        for _ in queue:
            response = await client.post("/v1/chat/completions", json=payload)
            assert response.status_code == 200, response.text

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, trust_env=False, limits=limits) as client:
        await client.get("/health")
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        return count / (time.perf_counter() - start)


def throughput(url: str, concurrency: int, count: int) -> float:
    import asyncio

    return asyncio.run(_load(url, concurrency, count))


def ray_hop(requests: int) -> dict[str, Any]:
    os.environ.update({"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"})
    import psutil
    import ray
    from ray import serve

    from scale.ray_serve import deployment

    result: dict[str, Any] = {}
    start = time.monotonic()
    ray.init(
        address="local",  # a Ray of our own, never one a `ray start` elsewhere left in /tmp/ray
        _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"),  # short: Ray's socket paths must stay < 107
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
    with server() as alone:
        latency = interleaved({"serve": url, "direct": alone}, lambda: plain[0], requests)
        via_serve, direct = latency["serve"], latency["direct"]
        result["direct_p50_ms"] = percentile(direct, 50)
        result["serve_p50_ms"] = percentile(via_serve, 50)
        result["hop_p50_ms"] = result["serve_p50_ms"] - result["direct_p50_ms"]
        result["throughput"] = []
        for replicas in (2, 1):
            if replicas == 1:  # the same app name: Serve replaces the deployment in place
                serve.run(
                    deployment(1, env=dict(FAKE_ENV), factories="tests.ray_fakes:factories", num_cpus=0.5),
                    name="bench",
                )
                wait_up(url)
            rates: dict[str, list[float]] = {"serve": [], "direct": []}
            for _ in range(3):
                rates["serve"].append(throughput(url, CONCURRENCY, requests))
                rates["direct"].append(throughput(alone, CONCURRENCY, requests))
            serve_rate, direct_rate = (sorted(v)[len(v) // 2] for v in (rates["serve"], rates["direct"]))
            result["throughput"].append(
                {
                    "case": f"Ray Serve, {replicas} replica(s)",
                    "concurrency": CONCURRENCY,
                    "serve_rps": serve_rate,
                    "direct_rps": direct_rate,
                    "ratio": serve_rate / direct_rate,
                }
            )
    serve.shutdown()
    ray.shutdown()
    return result


def verdict(ok: bool) -> str:
    return "met" if ok else "not met"


def loads(results: dict[str, Any]) -> str:
    return ", ".join(f"{stage} {values[0]:.1f}" for stage, values in results["load_average"].items())


def targets(results: dict[str, Any]) -> list[dict[str, str]]:
    """The issue's rows, each with its verdict and the numbers behind it."""
    hit = {row["case"]: row["p50"] for row in results["hits"]}
    away = {row["case"]: row for row in results["redis_away"]}
    redis_hit, memory = hit["Redis hit (no memory tier)"], hit["memory hit"]
    rows = [
        {
            "row": "cache hit from the Redis tier through HTTP, p50",
            "target": f"<= {REDIS_HIT_TARGET_MS} ms",
            "measured": f"{redis_hit:.2f} ms (memory {memory:.2f} ms: x{redis_hit / memory:.2f})",
            "verdict": verdict(redis_hit <= REDIS_HIT_TARGET_MS),
        }
    ]
    for name in AWAY:
        for cooldown, target in (("5", f"within {DEAD_REDIS_TARGET_MS:g} ms"), ("0", "none: the bound")):
            row = away[f"{name}, cooldown {cooldown} s"]
            rows.append(
                {
                    "row": f"Redis {name} (REDIS_COOLDOWN_SECONDS={cooldown}): p50 over the cache off",
                    "target": target,
                    "measured": f"{row['extra_p50']:+.2f} ms ({row['p50']:.2f} vs {away['cache off']['p50']:.2f})",
                    "verdict": verdict(row["extra_p50"] <= DEAD_REDIS_TARGET_MS) if cooldown == "5" else "-",
                }
            )
    ray = results.get("ray")
    if ray:
        rows.append(
            {
                "row": "Ray Serve hop, p50 added to a chat request",
                "target": "none: measured",
                "measured": f"{ray['hop_p50_ms']:.1f} ms ({ray['serve_p50_ms']:.1f} vs {ray['direct_p50_ms']:.1f})",
                "verdict": "-",
            }
        )
        for row in ray["throughput"]:
            rows.append(
                {
                    "row": f"throughput, {row['case']} / 1 process, {row['concurrency']} clients",
                    "target": "none: measured",
                    "measured": f"x{row['ratio']:.2f} ({row['serve_rps']:.0f} vs {row['direct_rps']:.0f} req/s)",
                    "verdict": "-",
                }
            )
    return rows


def section(results: dict[str, Any]) -> str:
    columns = [("case", "case"), ("p50", "p50 ms"), ("p99", "p99 ms"), ("max", "max ms")]
    parts = [
        "Fake models (`python -m tests.serve_fakes`), each server its own process, loopback, sequential "
        "keep-alive requests, non-streamed chat at temperature 0; servers compared run at once and "
        "take requests in turn (one to each, then again). `.venv/bin/python bench/bench_replicas.py --ray --write`. "
        f"Load average (1 min) at each stage: {loads(results)}.",
        table(targets(results), [("row", "row"), ("target", "target"), ("measured", "measured"), ("verdict", "")]),
        "Cache hits (the same request; Redis hits with `CACHE_MAX_SIZE=0`, so every lookup goes there):",
        table(results["hits"], columns),
        "Misses (distinct requests) while Redis is healthy or away; REDIS_TIMEOUT_MS=20:",
        table(results["redis_away"], [*columns, ("extra_p50", "p50 over cache off, ms")]),
    ]
    ray = results.get("ray")
    if ray:
        one = {k: v for k, v in ray.items() if k != "throughput"}
        parts += [
            "Ray Serve: a local Ray (2 CPUs, loopback), 2 replicas of 0.5 CPU; memory is the USS of Ray's "
            "processes; throughput is uncached chat, 16 clients at once, the median of 3 alternating rounds:",
            table([one], [(k, k) for k in one]),
            table(ray["throughput"], [(k, k) for k in ray["throughput"][0]]),
        ]
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--ray", action="store_true", help="also measure Ray Serve (needs ray[serve])")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md's Replicas section")
    parser.add_argument("--from-json", type=Path, help="no measuring: the section from an earlier run's results")
    args = parser.parse_args()
    if args.from_json:
        write_section("Replicas", section(json.loads(args.from_json.read_text())))
        return
    load: dict[str, list[float]] = {"start": list(os.getloadavg())}  # 1, 5 and 15 minutes
    results: dict[str, Any] = {"load_average": load, "hits": hits(args.requests)}
    load["after_hits"] = list(os.getloadavg())
    results["redis_away"] = redis_away(args.requests)
    load["after_redis_away"] = list(os.getloadavg())
    columns = [("case", "case"), ("p50", "p50 ms"), ("p99", "p99 ms"), ("max", "max ms")]
    print(table(results["hits"], columns))
    print()
    print(table(results["redis_away"], [*columns, ("extra_p50", "p50 over cache off, ms")]))
    if args.ray:
        results["ray"] = ray_hop(args.requests)
        load["after_ray"] = list(os.getloadavg())
        print()
        print(
            table(
                [{k: v for k, v in results["ray"].items() if k != "throughput"}],
                [(k, k) for k in results["ray"] if k != "throughput"],
            )
        )
        print()
        print(table(results["ray"]["throughput"], [(k, k) for k in results["ray"]["throughput"][0]]))
    print(f"\nload average (1, 5, 15 min): {json.dumps(load)}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    if args.write:
        write_section("Replicas", section(results))


if __name__ == "__main__":
    main()
