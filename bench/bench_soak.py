"""Soak: mixed traffic with cancellations against the real server for a bounded time; errors, RSS and fds.

Starts `server.py` on its embedded defaults (the packaged Gemma 3 270M on `light`, MiniLM on `embedding`,
the similarity reranker) on a free loopback port, in a temporary working directory (no `.env`, no
`models/`), with HF_HUB_OFFLINE=1. A few concurrent clients (closed loop) then send a weighted mix:
non-streamed and streamed chat and completions with small `max_tokens`, temperature-0 requests from a
small pool (cache hits), embeddings batches (some base64, some repeated texts), rerank, streams the client
abandons after a few chunks (disconnects) and non-streamed requests with a short client timeout
(abandoned). Every response is checked: status, the JSON envelope, an SSE body that ends with exactly one
`[DONE]` or one error event. Anything 5xx, any other unexpected status, a malformed body or stream, a
transport error or a hang is an error; a 503 with Retry-After (overload) is counted on its own.

Phases: start-up, then a warm-up (every kind loaded and exercised), then the soak itself (`--seconds`).
The server process's VmRSS, RssAnon, threads and open fds (/proc/PID) are read before any request,
after the warm-up and at the end with no request in flight (clients closed, /health showing nothing in
flight), and every `--sample-every` seconds under load. After the soak two probes check that abandoned
work stops: a stream dropped after two chunks and a non-streamed request given up after 0.5 s, each asking
for 400 tokens; the time until the light tier has no active sequence is reported.

The server runs from a copy of the working tree taken at the start (`--ref` a commit, `--source` a folder).
Writes the `## Soak` section of BENCHMARKS.md (a rerun replaces it) and the raw numbers to
bench/results/bench_soak.json (not committed). Loopback only; bounded by `--seconds` and `--max-requests`.

    .venv/bin/python bench/bench_soak.py [--seconds 300] [--warmup 90] [--workers 4] [--ref HEAD] [--no-write]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from report import write_section  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "bench_soak.json"
TIER_PREFIXES = ("LIGHT_", "MEDIUM_", "HEAVY_", "EMBEDDING_", "RERANKER_", "SPEECH_", "CACHE_")
SERVER_KEYS = ("API_KEYS", "API_KEYS_FILE", "ENABLE_CACHE", "MAX_MEMORY_GB", "STRICT_TIERS", "MODELS_DIR")

from soak_report import pct, render, slope_per_1000  # noqa: E402
from soak_traffic import (  # noqa: E402
    BAN_END,
    REQUEST_TIMEOUT,
    SLUGS,
    Mix,
    Stats,
    check_chat,
    post_json,
    post_stream,
)

# ---------------------------------------------------------------- the server and its process


def server_env(workdir: Path) -> dict[str, str]:
    """The real environment minus any model, tier or cache setting: the embedded defaults."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(TIER_PREFIXES) and k not in SERVER_KEYS}
    env.update(
        {
            "HOST": "127.0.0.1",
            "PORT": "0",
            "PORT_FILE": str(workdir / ".port"),
            "LOG_LEVEL": "warning",
            "HF_HUB_OFFLINE": "1",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def export_ref(ref: str, into: Path) -> str:
    """The tree of `ref` (e.g. HEAD) as plain files: other people's uncommitted edits stay out of the run."""
    commit = subprocess.run(["git", "rev-parse", ref], cwd=ROOT, check=True, capture_output=True, text=True)
    archive = subprocess.run(["git", "archive", commit.stdout.strip()], cwd=ROOT, check=True, capture_output=True)
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return commit.stdout.strip()


def snapshot_tree(into: Path) -> str:
    """A copy of the working tree's files (tracked and untracked, not ignored): edits made while the soak
    runs stay out of it. Answers the HEAD commit it sits on."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    for name in filter(None, listed.stdout.decode().split("\0")):
        path = ROOT / name
        if path.is_file():
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, into / name)
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return head.stdout.strip()


def start_server(source: Path, workdir: Path, log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port_file = workdir / ".port"
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, str(source / "server.py")],
        cwd=workdir,
        env=server_env(workdir),
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    log_file.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited during start-up ({process.returncode}); see {log_path}")
        if port_file.exists() and port_file.read_text().strip():
            url = f"http://127.0.0.1:{port_file.read_text().strip()}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return process, url
            except httpx.TransportError:
                pass
        time.sleep(0.2)  # polling a child's start-up
    process.kill()
    raise RuntimeError("the server did not answer /health within 120 s")


def stop_server(process: subprocess.Popen[bytes]) -> int | None:
    process.send_signal(signal.SIGINT)
    try:
        return process.wait(60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)
        return None


def proc_sample(pid: int, label: str, requests: int, started: float) -> dict[str, Any]:
    """Memory, threads and fds of the server process (and of any child, e.g. an isolation worker)."""
    status = Path(f"/proc/{pid}/status").read_text()

    def kb(key: str) -> float:
        found = re.search(rf"^{key}:\s+(\d+) kB", status, re.M)
        return int(found.group(1)) / 1024 if found else float("nan")

    kinds: collections.Counter[str] = collections.Counter()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        kinds[target.split(":")[0] if ":" in target and not target.startswith("/") else "file"] += 1
    threads = re.search(r"^Threads:\s+(\d+)", status, re.M)
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    child_rss = 0.0
    for child in children:
        try:
            found = re.search(r"^VmRSS:\s+(\d+) kB", Path(f"/proc/{child}/status").read_text(), re.M)
            child_rss += int(found.group(1)) / 1024 if found else 0
        except OSError:
            pass
    return {
        "label": label,
        "t": round(time.monotonic() - started, 1),
        "requests": requests,
        "rss_mb": round(kb("VmRSS"), 1),
        "anon_mb": round(kb("RssAnon"), 1),
        "file_mb": round(kb("RssFile"), 1),
        "threads": int(threads.group(1)) if threads else -1,
        "fds": sum(kinds.values()),
        "fd_kinds": dict(kinds),
        "children": len(children),
        "children_rss_mb": round(child_rss, 1),
        "load1": float(Path("/proc/loadavg").read_text().split()[0]),
    }


async def tier_activity(client: httpx.AsyncClient) -> dict[str, float]:
    """In-flight requests per tier (/health) plus active sequences and queue depth (/metrics)."""
    activity: dict[str, float] = {}
    health = (await client.get("/health")).json()
    for name, tier in (health.get("tiers") or {}).items():
        activity[f"{name} in_flight"] = float(tier.get("in_flight", 0))
    for line in (await client.get("/metrics")).text.splitlines():
        found = re.match(r'llmservice_(active_sequences|queue_depth)\{tier="(\w+)"\} ([0-9.e+]+)', line)
        if found:
            activity[f"{found.group(2)} {found.group(1)}"] = float(found.group(3))
    return activity


async def settle(url: str, limit: float = 60.0) -> tuple[float, dict[str, float]]:
    """Seconds until no tier has a request in flight, an active sequence or a queue; and what was left."""
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        while True:
            activity = await tier_activity(client)
            busy = {k: v for k, v in activity.items() if v}
            if not busy or time.monotonic() - started > limit:
                break
            await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # let the server close the sockets of the clients that just left
    return time.monotonic() - started, busy


# ---------------------------------------------------------------- phases


async def run_load(
    url: str,
    mix: Mix,
    stats: Stats,
    seconds: float,
    workers: int,
    max_requests: int,
    on_tick: Callable[[], Awaitable[None]] | None = None,
    tick: float = 0,
) -> float:
    deadline = time.monotonic() + seconds

    async def worker() -> None:
        limits = httpx.Limits(max_connections=2, max_keepalive_connections=1)
        async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT, limits=limits) as client:
            while time.monotonic() < deadline and stats.total < max_requests:
                kind, send = mix.pick()
                began = time.perf_counter()
                outcome = await send(client)
                stats.record(kind, outcome, time.perf_counter() - began)

    async def ticker() -> None:
        while tick and on_tick:
            await asyncio.sleep(tick)
            try:
                await on_tick()
            except (OSError, httpx.HTTPError, ValueError) as exc:  # a missed sample, not a lost run
                print(f"  sample failed: {exc!r}")

    began = time.monotonic()
    sampler = asyncio.ensure_future(ticker())
    try:
        await asyncio.gather(*(worker() for _ in range(workers)))
    finally:
        sampler.cancel()
    return time.monotonic() - began


async def abandon_probe(url: str, streamed: bool) -> dict[str, Any]:
    """Abandon a 400-token request early; seconds until the light tier computes nothing."""
    body = {
        "model": "light",
        "messages": [{"role": "user", "content": f"Probe {time.time()}: tell a long story."}],
        "max_tokens": 400,
        "logit_bias": BAN_END,
    }
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT) as client:
        began = time.monotonic()
        if streamed:
            outcome = await post_stream(client, "/v1/chat/completions", body, "chat.completion.chunk", abandon_after=2)
        else:
            outcome = await post_json(client, "/v1/chat/completions", body, check_chat, timeout=0.5)
        left = time.monotonic()
        while time.monotonic() - left < 60:
            activity = await tier_activity(client)
            if not activity.get("light active_sequences") and not activity.get("light in_flight"):
                break
            await asyncio.sleep(0.05)
        stopped = time.monotonic() - left
    return {"streamed": streamed, "outcome": outcome.status, "held_s": round(left - began, 2), "stop_s": stopped}


def log_findings(log_path: Path) -> dict[str, Any]:
    text = log_path.read_text(errors="replace")
    lines = text.splitlines()
    tracebacks = [i for i, line in enumerate(lines) if line.startswith("Traceback")]
    errors = [line for line in lines if re.search(r"\b(ERROR|CRITICAL)\b", line)]
    warnings = [line for line in lines if re.search(r"\bWARNING\b", line)]
    excerpt = []
    for i in tracebacks[:3]:
        end = next((j for j in range(i + 1, len(lines)) if lines[j] and not lines[j].startswith(" ")), i)
        excerpt.append("\n".join(lines[i : end + 1]))
    distinct = collections.Counter(re.sub(r"^.*?\b(ERROR|CRITICAL)\b", r"\1", line) for line in errors)
    return {
        "distinct_errors": dict(distinct.most_common(5)),
        "tracebacks": len(tracebacks),
        "error_lines": len(errors),
        "warning_lines": len(warnings),
        "error_examples": errors[:5],
        "warning_examples": sorted(set(re.sub(r"^\S+ \S+ ", "", w) for w in warnings))[:8],
        "traceback_examples": excerpt,
    }


async def soak(args: argparse.Namespace, url: str, pid: int) -> dict[str, Any]:
    started = time.monotonic()
    mix = Mix(args.seed, args.only)

    async def take(label: str, requests: int) -> None:
        """A /proc sample plus the response cache's size (entries, bytes held in memory)."""
        sample = proc_sample(pid, label, requests, started)
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            cache = (await client.get("/admin/cache")).json()
        sample["cache_entries"] = cache.get("memory_entries", 0)
        sample["cache_mb"] = round(cache.get("memory_bytes", 0) / 2**20, 1)
        samples.append(sample)

    samples: list[dict[str, Any]] = []
    await take("idle, before any request", 0)

    warm = Stats()
    print(f"warm-up: {args.warmup:.0f} s, {args.workers} workers")
    await run_load(url, mix, warm, args.warmup, args.workers, args.max_requests)
    settle_warm, _ = await settle(url)
    await take("after warm-up (quiescent)", 0)
    print(f"  {warm.total} requests, {sum(warm.errors.values())} errors; {samples[-1]}")

    stats = Stats()

    async def sample() -> None:
        await take("under load", stats.total)
        last = samples[-1]
        print(
            f"  t={last['t']:.0f}s requests={stats.total} rss={last['rss_mb']} MB "
            f"fds={last['fds']} load={last['load1']}"
        )

    print(f"soak: {args.seconds:.0f} s, {args.workers} workers")
    wall = await run_load(url, mix, stats, args.seconds, args.workers, args.max_requests, sample, args.sample_every)
    settle_end, busy_end = await settle(url)
    await take("end (quiescent)", stats.total)
    print(f"  {stats.total} requests in {wall:.0f} s, errors {dict(stats.errors)}; {samples[-1]}")

    probes = [await abandon_probe(url, streamed=True), await abandon_probe(url, streamed=False)]
    print(f"  abandon probes: {probes}")
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        health = (await client.get("/health")).json()
    return {
        "warmup": {"requests": dict(warm.requests), "errors": dict(warm.errors), "settle_s": settle_warm},
        "requests": dict(stats.requests),
        "outcomes": {f"{k}|{s}": n for (k, s), n in stats.outcomes.items()},
        "errors": dict(stats.errors),
        "error_examples": stats.examples,
        "cache_hits": dict(stats.cache_hits),
        "latency_ms": {
            k: {"p50": pct(v, 50) * 1000, "p95": pct(v, 95) * 1000, "n": len(v)} for k, v in stats.latencies.items()
        },
        "wall_s": wall,
        "settle_end_s": settle_end,
        "busy_at_end": busy_end,
        "samples": samples,
        "probes": probes,
        "health_end": health,
    }


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=300, help="length of the soak after warm-up (300)")
    parser.add_argument("--warmup", type=float, default=90, help="warm-up seconds, not counted (90)")
    parser.add_argument("--workers", type=int, default=4, help="concurrent clients (4)")
    parser.add_argument("--sample-every", type=float, default=30, help="seconds between samples under load (30)")
    parser.add_argument("--max-requests", type=int, default=50_000, help="stop the soak after this many (50000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--only", type=lambda v: v.split(","), help=f"comma-separated kinds to send (default all): {', '.join(SLUGS)}"
    )
    parser.add_argument("--ref", help="run the server from this commit (git archive), not the working tree")
    parser.add_argument("--source", type=Path, help="run the server from this directory (another checkout)")
    # Default: a copy of the working tree (tracked and untracked files), taken at the start.
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    if args.only and not set(args.only) <= set(SLUGS):
        parser.error(f"--only takes {', '.join(SLUGS)}")
    if not 1 <= args.workers <= 16 or not 0 < args.seconds <= 3600 or not 0 <= args.warmup <= 600:
        parser.error("bounded runs only: 1-16 workers, at most 3600 s of soak and 600 s of warm-up")

    tmp = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    workdir = tmp / "work"
    workdir.mkdir()
    if args.source:
        source = args.source.resolve()
        source_text = f"`{source}`"
    elif args.ref:
        source = tmp / "src"
        commit = export_ref(args.ref, source)
        source_text = f"commit `{commit[:12]}` (`git archive`, so no uncommitted edits)"
    else:
        source = tmp / "src"
        head = snapshot_tree(source)
        source_text = f"a copy of the working tree on `{head[:12]}` (other engineers' uncommitted edits included)"
    log_path = tmp / "server.log"
    load_start = float(Path("/proc/loadavg").read_text().split()[0])
    process, url = start_server(source, workdir, log_path)
    print(f"server pid {process.pid} at {url}; log {log_path}")
    try:
        results = asyncio.run(soak(args, url, process.pid))
    finally:
        exit_code = stop_server(process)
    results["exit_code"] = exit_code
    results["log"] = log_findings(log_path)
    results["slope_rss"] = slope_per_1000(results["samples"], "rss_mb")
    results["slope_anon"] = slope_per_1000(results["samples"], "anon_mb")
    half = sum(results["requests"].values()) // 2
    results["slope_rss_2nd_half"] = slope_per_1000(results["samples"], "rss_mb", after=half)
    results["slope_anon_2nd_half"] = slope_per_1000(results["samples"], "anon_mb", after=half)
    results["run"] = {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()} ({os.cpu_count()} cores)",
        "source": source_text,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "workers": args.workers,
        "seed": args.seed,
        "only": args.only,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "load_start": load_start,
        "load_end": float(Path("/proc/loadavg").read_text().split()[0]),
        "server_log": str(log_path),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2, default=str))
    body = render(results)
    print(body)
    print(json.dumps(results["log"], indent=2))
    if not args.no_write:
        write_section("Soak", body)


if __name__ == "__main__":
    main()
