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
  refused) or a port that accepts and never answers (that costs FIRST_BYTE_TIMEOUT, here 1 s);
- throughput: 8 concurrent streams from an upstream that paces its tokens as a GPU server would
  (256 one-word chunks, one per 5 ms per stream), direct against through the hop, alternating rounds:
  aggregate tokens per second;
- kill: a pool of two upstream processes under 4 closed-loop clients; one upstream is SIGKILLed
  mid-run. Failed requests, the latency of the requests around the kill, and when the dead
  upstream's breaker opened.

Prints the load average before and after: on a shared machine, compare the quietest runs.
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
BODY = {"model": "medium", "messages": [{"role": "user", "content": "SAY:abcdefghi"}], "max_tokens": 8}
UPSTREAM = (
    "import uvicorn; from tests.upstreams import StandIn, build; "
    "uvicorn.run(build(StandIn('gpu', pace_tokens={tokens}, pace_s={pace})), port={port}, log_level='warning')"
)
PACED_TOKENS, PACE_S, STREAMS = 256, 0.005, 8
FRONT_PIDS: dict[str, int] = {}  # our server's process by URL: its CPU time per streamed chunk


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
def upstream_process(tokens: int = 0, pace: float = 0.0) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = UPSTREAM.format(port=port, tokens=tokens, pace=pace)
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=env)
    try:
        wait_up(f"http://127.0.0.1:{port}", proc)
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        proc.wait(30)


@contextlib.contextmanager
def upstream(tokens: int = 0, pace: float = 0.0) -> Iterator[str]:
    with upstream_process(tokens, pace) as (url, _):
        yield url


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
            "SPEECH_MODEL_PATH": "",  # no Whisper: its libraries would be imported in the background mid-run
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
            FRONT_PIDS[url] = proc.pid
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
    import psutil  # installed with the dev tools' dependencies, as bench_replicas uses it

    samples: dict[str, dict[str, list[float]]] = {"whole": {"direct": [], "hop": []}, "ttft": {"direct": [], "hop": []}}
    cpu = {"whole": 0.0, "ttft": 0.0}  # our server's CPU seconds over the requests through it
    with upstream() as direct, front([f"{direct}/v1"]) as ours, client() as http:
        ours_process = psutil.Process(FRONT_PIDS[ours])
        for _ in range(20):  # warm-up: connections, first-call costs
            whole(http, direct), whole(http, ours)
        per_round = max(1, requests // rounds)
        for _ in range(rounds):
            for side, url in (("direct", direct), ("hop", ours)):
                for measure, call in (("whole", whole), ("ttft", first_chunk)):
                    before = sum(ours_process.cpu_times()[:2])
                    samples[measure][side] += [call(http, url) for _ in range(per_round)]
                    if side == "hop":
                        cpu[measure] += sum(ours_process.cpu_times()[:2]) - before
    summary: dict[str, Any] = {}
    for measure, sides in samples.items():
        direct_p50, hop_p50 = statistics.median(sides["direct"]), statistics.median(sides["hop"])
        summary[measure] = {
            "direct_p50_ms": round(direct_p50 * 1000, 2),
            "hop_p50_ms": round(hop_p50 * 1000, 2),
            "added_p50_ms": round((hop_p50 - direct_p50) * 1000, 2),
            "hop_p90_ms": round(percentile(sides["hop"], 90) * 1000, 2),
            # The least-disturbed samples: on an oversubscribed CPU the median mostly measures how long
            # one more process waits to be scheduled, which the hop adds to every request.
            "added_p10_ms": round((percentile(sides["hop"], 10) - percentile(sides["direct"], 10)) * 1000, 2),
            "hop_cpu_ms_per_request": round(cpu[measure] / len(sides["hop"]) * 1000, 2),
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


def streamed_tokens(http: httpx.Client, url: str) -> int:
    count = 0
    with http.stream("POST", f"{url}/v1/chat/completions", json={**BODY, "stream": True}) as response:
        for line in response.iter_lines():
            count += line.count('"tok "')
    return count


def throughput(rounds: int) -> dict[str, Any]:
    """Aggregate tok/s of 8 concurrent paced streams, direct and through the hop, rounds alternating."""
    import psutil  # installed with the dev tools' dependencies, as bench_replicas uses it

    rates: dict[str, list[float]] = {"direct": [], "hop": []}
    hop_cpu: list[float] = []  # our server's CPU seconds per hop round
    with upstream(PACED_TOKENS, PACE_S) as direct, front([f"{direct}/v1"]) as ours:
        ours_process = psutil.Process(FRONT_PIDS[ours])
        clients = [client() for _ in range(STREAMS)]
        with ThreadPoolExecutor(STREAMS) as threads:
            for _ in range(rounds + 1):  # the first round warms connections up and is dropped
                for side, url in (("direct", direct), ("hop", ours)):
                    cpu = sum(ours_process.cpu_times()[:2])
                    start = time.perf_counter()
                    counts = list(threads.map(lambda http, u=url: streamed_tokens(http, u), clients))
                    elapsed = time.perf_counter() - start
                    assert counts == [PACED_TOKENS] * STREAMS, counts
                    rates[side].append(sum(counts) / elapsed)
                    if side == "hop":
                        hop_cpu.append(sum(ours_process.cpu_times()[:2]) - cpu)
        for http in clients:
            http.close()
    direct_rates, hop_rates = rates["direct"][1:], rates["hop"][1:]
    ratios = [h / d for h, d in zip(hop_rates, direct_rates, strict=True)]
    return {
        "streams": STREAMS,
        "tokens_per_stream": PACED_TOKENS,
        "pace_ms": PACE_S * 1000,
        "direct_tok_s": [round(r) for r in direct_rates],
        "hop_tok_s": [round(r) for r in hop_rates],
        "hop_over_direct": [round(r, 3) for r in ratios],
        "median_ratio": round(statistics.median(ratios), 3),
        "hop_cpu_us_per_chunk": round(statistics.median(hop_cpu[1:]) / (STREAMS * PACED_TOKENS) * 1e6, 1),
    }


def kill(seconds: float = 4.0, workers: int = 4) -> dict[str, Any]:
    """Closed-loop clients over a pool of two upstream processes; one is SIGKILLed a third of the way in."""
    records: list[tuple[float, float, int]] = []  # (start, end, status)
    with upstream_process() as (doomed_url, doomed), upstream() as survivor:
        with front([f"{doomed_url}/v1", f"{survivor}/v1"]) as ours:
            clients = [client() for _ in range(workers)]
            stop_at = time.perf_counter() + seconds

            def loop(http: httpx.Client) -> None:
                while time.perf_counter() < stop_at:
                    start = time.perf_counter()
                    try:
                        status = http.post(f"{ours}/v1/chat/completions", json=BODY).status_code
                    except httpx.HTTPError:
                        status = 0
                    records.append((start, time.perf_counter(), status))

            with ThreadPoolExecutor(workers) as threads:
                futures = [threads.submit(loop, http) for http in clients]
                time.sleep(seconds / 3)
                killed_at = time.perf_counter()
                doomed.kill()
                opened_at = None
                with httpx.Client(trust_env=False) as probe:
                    while opened_at is None and time.perf_counter() < stop_at:
                        pool = probe.get(f"{ours}/health").json()["tiers"]["medium"]["upstreams"]
                        if pool[0]["breaker"] == "open":
                            opened_at = time.perf_counter()
                        time.sleep(0.01)
                for future in futures:
                    future.result()
                dead = probe_pool(ours)[0]
            for http in clients:
                http.close()
    before = [end - start for start, end, _ in records if end < killed_at]
    around = [end - start for start, end, _ in records if end >= killed_at and start < killed_at + 0.5]
    return {
        "requests": len(records),
        "failed": sum(1 for _, _, status in records if status != 200),
        "p50_before_ms": round(statistics.median(before) * 1000, 2),
        "requests_within_0_5s_of_kill": len(around),
        "their_p50_ms": round(statistics.median(around) * 1000, 2),
        "their_max_ms": round(max(around) * 1000, 2),
        "breaker_open_after_ms": round((opened_at - killed_at) * 1000, 1) if opened_at else None,
        "faults_on_dead_upstream": dead["failures"],
    }


def probe_pool(url: str) -> list[dict[str, Any]]:
    pool: list[dict[str, Any]] = httpx.get(f"{url}/health", trust_env=False).json()["tiers"]["medium"]["upstreams"]
    return pool


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--only", choices=("hop", "failover", "throughput", "kill"), action="append")
    args = parser.parse_args()
    parts = {
        "hop": lambda: hop(args.requests, args.rounds),
        "failover": lambda: failover(args.requests),
        "throughput": lambda: throughput(args.rounds),
        "kill": kill,
    }
    result: dict[str, Any] = {"load_before": os.getloadavg()}
    for name, run in parts.items():
        if not args.only or name in args.only:
            result[name] = run()
    result["load_after"] = os.getloadavg()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
