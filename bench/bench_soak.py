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
import base64
import collections
import datetime
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from report import table, write_section  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "bench_soak.json"
REQUEST_TIMEOUT = 120.0  # a request that takes longer is counted as a hang
EMBEDDING_DIM = 384  # all-MiniLM-L6-v2
BAN_END = {"1": -100, "106": -100}  # Gemma's <eos> and <end_of_turn>: generate the whole budget
TIER_PREFIXES = ("LIGHT_", "MEDIUM_", "HEAVY_", "EMBEDDING_", "RERANKER_", "SPEECH_", "CACHE_")
SERVER_KEYS = ("API_KEYS", "API_KEYS_FILE", "ENABLE_CACHE", "MAX_MEMORY_GB", "STRICT_TIERS", "MODELS_DIR")

WORDS = (
    "river harbour lantern orchard meadow glacier violin market castle engine garden comet ledger island "
    "pepper canyon archive signal ferry library"
).split()


def sentence(rng: random.Random, n: int) -> str:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12)))
    return f"Note {n}: the {words}."


# ---------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    status: str  # ok | abandoned | overloaded | error
    detail: str = ""
    cache_hit: bool = False


OK = Outcome("ok")


@dataclass
class Stats:
    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    cache_hits: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    examples: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def record(self, kind: str, outcome: Outcome, seconds: float) -> None:
        self.requests[kind] += 1
        self.outcomes[kind, outcome.status] += 1
        if outcome.cache_hit:
            self.cache_hits[kind] += 1
        if outcome.status == "ok":
            self.latencies[kind].append(seconds)
        if outcome.status == "error":
            self.errors[f"{kind}: {outcome.detail}"] += 1
            if len(self.examples) < 20:
                self.examples.append(f"{kind}: {outcome.detail}")


def error_code(response: httpx.Response) -> tuple[str, bool]:
    """The envelope's code, and whether the body is the OpenAI error envelope at all."""
    try:
        body = response.json()
        error = body["error"]
        return str(error.get("code")), isinstance(error.get("message"), str) and "type" in error
    except (ValueError, KeyError, TypeError, AttributeError):
        return "", False


def judge_status(response: httpx.Response) -> Outcome | None:
    """None for a 200; otherwise the outcome a non-200 answer counts as."""
    if response.status_code == 200:
        return None
    code, enveloped = error_code(response)
    if response.status_code == 503 and response.headers.get("retry-after") and code == "overloaded":
        return Outcome("overloaded", "503 overloaded")
    shape = "" if enveloped else " (no error envelope)"
    return Outcome("error", f"HTTP {response.status_code} {code}{shape}".strip())


def cache_hit(response: httpx.Response) -> bool:
    return response.headers.get("x-cache", "").upper() == "HIT"


# ---------------------------------------------------------------- checks of whole bodies


def check_chat(body: Any) -> str:
    if body.get("object") != "chat.completion" or not isinstance(body.get("choices"), list):
        return "chat: not a chat.completion"
    choice = body["choices"][0]
    if not isinstance(choice.get("message", {}).get("content"), str):
        return "chat: no message content"
    if choice.get("finish_reason") not in ("stop", "length"):
        return f"chat: finish_reason {choice.get('finish_reason')!r}"
    return check_usage(body)


def check_completion(body: Any) -> str:
    if body.get("object") != "text_completion" or not isinstance(body.get("choices"), list):
        return "completion: not a text_completion"
    choice = body["choices"][0]
    if not isinstance(choice.get("text"), str) or choice.get("finish_reason") not in ("stop", "length"):
        return "completion: bad choice"
    return check_usage(body)


def check_usage(body: Any) -> str:
    usage = body.get("usage") or {}
    if not all(isinstance(usage.get(k), int) for k in ("prompt_tokens", "completion_tokens", "total_tokens")):
        return "usage missing or not integers"
    return ""


def check_embeddings(body: Any, count: int, encoding: str) -> str:
    data = body.get("data")
    if body.get("object") != "list" or not isinstance(data, list) or len(data) != count:
        return f"embeddings: expected {count} items"
    for i, item in enumerate(data):
        if item.get("index") != i:
            return "embeddings: index out of order"
        vector = item.get("embedding")
        if encoding == "base64":
            if not isinstance(vector, str) or len(base64.b64decode(vector)) != 4 * EMBEDDING_DIM:
                return "embeddings: bad base64 vector"
        elif not (isinstance(vector, list) and len(vector) == EMBEDDING_DIM and all(math.isfinite(x) for x in vector)):
            return "embeddings: bad float vector"
    return ""


def check_rerank(body: Any, documents: int, top_n: int | None) -> str:
    results = body.get("results")
    want = min(top_n, documents) if top_n else documents
    if not isinstance(results, list) or len(results) != want:
        return f"rerank: expected {want} results"
    indices = [r.get("index") for r in results]
    scores = [r.get("relevance_score") for r in results]
    if len(set(indices)) != len(indices) or not all(isinstance(i, int) and 0 <= i < documents for i in indices):
        return "rerank: bad indices"
    finite = all(isinstance(s, int | float) and math.isfinite(s) for s in scores)
    if not finite or scores != sorted(scores, reverse=True):
        return "rerank: scores not finite and descending"
    return ""


# ---------------------------------------------------------------- requests


async def post_json(
    client: httpx.AsyncClient,
    path: str,
    payload: dict[str, Any],
    check: Callable[[Any], str],
    timeout: float | None = None,
) -> Outcome:
    """A non-streamed request; with `timeout` the client gives up after that long (an abandoned request)."""
    try:
        response = await client.post(path, json=payload, timeout=timeout or REQUEST_TIMEOUT)
    except httpx.TimeoutException as exc:
        if timeout:
            return Outcome("abandoned")
        return Outcome("error", f"hang ({type(exc).__name__} after {REQUEST_TIMEOUT:.0f} s)")
    except httpx.HTTPError as exc:
        return Outcome("error", f"transport {type(exc).__name__}")
    judged = judge_status(response)
    if judged:
        return judged
    try:
        problem = check(response.json())
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        problem = f"malformed body ({type(exc).__name__})"
    return Outcome("error", problem) if problem else Outcome("ok", cache_hit=cache_hit(response))


async def post_stream(
    client: httpx.AsyncClient,
    path: str,
    payload: dict[str, Any],
    chunk_object: str,
    abandon_after: int = 0,
    want_usage: bool = False,
) -> Outcome:
    """A streamed request, checked event by event; `abandon_after` > 0 drops it after that many text chunks."""
    texts = 0
    finished = done = usage_seen = False
    error_event: dict[str, Any] | None = None
    try:
        async with client.stream("POST", path, json={**payload, "stream": True}) as response:
            if response.status_code != 200:
                await response.aread()
                return judge_status(response) or Outcome("error", "status")
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                return Outcome("error", "stream: not text/event-stream")
            hit = cache_hit(response)
            async for line in response.aiter_lines():
                if not line or line.startswith(":"):
                    continue
                if not line.startswith("data: "):
                    return Outcome("error", f"stream: unexpected line {line[:40]!r}")
                data = line[6:]
                if done or error_event is not None:
                    return Outcome("error", "stream: data after [DONE] or an error event")
                if data == "[DONE]":
                    done = True
                    continue
                try:
                    chunk = json.loads(data)
                except ValueError:
                    return Outcome("error", "stream: a data line that is not JSON")
                if "error" in chunk:
                    error_event = chunk["error"]
                    continue
                if chunk.get("object") != chunk_object:
                    return Outcome("error", f"stream: chunk object {chunk.get('object')!r}")
                if chunk.get("usage"):
                    usage_seen = True
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    piece = choice.get("text") if chunk_object == "text_completion" else delta.get("content")
                    if piece:
                        texts += 1
                    if choice.get("finish_reason"):
                        finished = True
                if abandon_after and texts >= abandon_after:
                    return Outcome("abandoned")  # leaving the block closes the connection mid-stream
    except httpx.TimeoutException as exc:
        return Outcome("error", f"stream: hang ({type(exc).__name__})")
    except httpx.HTTPError as exc:
        return Outcome("error", f"stream: transport {type(exc).__name__}")
    if error_event is not None:
        code = str(error_event.get("code")) if isinstance(error_event, dict) else "?"
        return Outcome("overloaded" if code == "overloaded" else "error", f"stream: error event {code}")
    if not done:
        return Outcome("error", "stream: ended without [DONE] or an error event")
    if not finished:
        return Outcome("error", "stream: no finish_reason before [DONE]")
    if want_usage and not usage_seen:
        return Outcome("error", "stream: include_usage asked, no usage chunk")
    return Outcome("ok", cache_hit=hit)


SLUGS = {
    "chat": "chat",
    "chat-stream": "chat stream",
    "completion": "completion",
    "completion-stream": "completion stream",
    "cached": "temperature 0 (cache)",
    "stream-abandoned": "stream abandoned",
    "request-abandoned": "request abandoned (timeout)",
    "embeddings": "embeddings",
    "rerank": "rerank",
}


class Mix:
    """The request kinds, their weights, and the bodies they send."""

    def __init__(self, seed: int, only: list[str] | None = None) -> None:
        self.rng = random.Random(seed)
        self.counter = 0
        self.text_pool = [sentence(self.rng, 10_000 + i) for i in range(60)]
        self.cached_prompts = [f"Cached question {i}: name a colour." for i in range(6)]
        self.kinds: dict[str, tuple[int, Callable[[httpx.AsyncClient], Awaitable[Outcome]]]] = {
            "chat": (14, self.chat),
            "chat stream": (12, self.chat_stream),
            "completion": (8, self.completion),
            "completion stream": (6, self.completion_stream),
            "temperature 0 (cache)": (10, self.cached),
            "stream abandoned": (10, self.stream_abandoned),
            "request abandoned (timeout)": (6, self.request_abandoned),
            "embeddings": (17, self.embeddings),
            "rerank": (17, self.rerank),
        }
        if only:
            self.kinds = {SLUGS[slug]: self.kinds[SLUGS[slug]] for slug in only}

    def pick(self) -> tuple[str, Callable[[httpx.AsyncClient], Awaitable[Outcome]]]:
        names = list(self.kinds)
        name = self.rng.choices(names, [self.kinds[n][0] for n in names])[0]
        return name, self.kinds[name][1]

    def fresh(self) -> str:
        self.counter += 1
        return sentence(self.rng, self.counter)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"{self.fresh()} Say something about it."}]

    async def chat(self, client: httpx.AsyncClient) -> Outcome:
        body = {"model": "light", "messages": self.messages(), "max_tokens": self.rng.randint(4, 16)}
        return await post_json(client, "/v1/chat/completions", body, check_chat)

    async def chat_stream(self, client: httpx.AsyncClient) -> Outcome:
        usage = self.rng.random() < 0.5
        body: dict[str, Any] = {"model": "light", "messages": self.messages(), "max_tokens": self.rng.randint(4, 16)}
        if usage:
            body["stream_options"] = {"include_usage": True}
        return await post_stream(client, "/v1/chat/completions", body, "chat.completion.chunk", want_usage=usage)

    async def completion(self, client: httpx.AsyncClient) -> Outcome:
        body = {"model": "light", "prompt": self.fresh(), "max_tokens": self.rng.randint(4, 16)}
        return await post_json(client, "/v1/completions", body, check_completion)

    async def completion_stream(self, client: httpx.AsyncClient) -> Outcome:
        body = {"model": "light", "prompt": self.fresh(), "max_tokens": self.rng.randint(4, 16)}
        return await post_stream(client, "/v1/completions", body, "text_completion")

    async def cached(self, client: httpx.AsyncClient) -> Outcome:
        prompt = self.rng.choice(self.cached_prompts)
        body = {"model": "light", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0}
        if self.rng.random() < 0.5:
            return await post_stream(client, "/v1/chat/completions", body, "chat.completion.chunk")
        return await post_json(client, "/v1/chat/completions", body, check_chat)

    async def stream_abandoned(self, client: httpx.AsyncClient) -> Outcome:
        body = {"model": "light", "messages": self.messages(), "max_tokens": 64, "logit_bias": BAN_END}
        return await post_stream(
            client, "/v1/chat/completions", body, "chat.completion.chunk", abandon_after=self.rng.randint(1, 4)
        )

    async def request_abandoned(self, client: httpx.AsyncClient) -> Outcome:
        body = {"model": "light", "messages": self.messages(), "max_tokens": 64, "logit_bias": BAN_END}
        timeout = self.rng.uniform(0.2, 1.0)
        return await post_json(client, "/v1/chat/completions", body, check_chat, timeout=timeout)

    async def embeddings(self, client: httpx.AsyncClient) -> Outcome:
        size = self.rng.randint(1, 32)
        texts = [self.rng.choice(self.text_pool) if self.rng.random() < 0.3 else self.fresh() for _ in range(size)]
        encoding = "base64" if self.rng.random() < 0.2 else "float"
        body = {"model": "embedding", "input": texts, "encoding_format": encoding}
        return await post_json(client, "/v1/embeddings", body, lambda b: check_embeddings(b, size, encoding))

    async def rerank(self, client: httpx.AsyncClient) -> Outcome:
        documents = self.rng.sample(self.text_pool, self.rng.randint(3, 20))
        top_n = self.rng.choice([None, 1, 3, 5])
        body: dict[str, Any] = {"model": "reranker", "query": self.rng.choice(self.text_pool), "documents": documents}
        if top_n:
            body["top_n"] = top_n
        return await post_json(client, "/v1/rerank", body, lambda b: check_rerank(b, len(documents), top_n))


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


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def slope_per_1000(samples: list[dict[str, Any]], key: str, after: int = 1) -> float:
    """Least-squares MB per 1,000 requests over the samples under load with at least `after` requests."""
    points = [(s["requests"], s[key]) for s in samples if s["requests"] >= after and s["label"] == "under load"]
    if len(points) < 3:
        return float("nan")
    xs, ys = zip(*points, strict=True)
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return 1000 * sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else float("nan")


# ---------------------------------------------------------------- report


def signed(value: float) -> str:
    return "n/a (too few samples)" if math.isnan(value) else f"{value:+.2f}"


def variant(run: dict[str, Any]) -> str:
    """What a run changed from the default mix and environment, if anything."""
    parts = [f"only {', '.join(run['only'])}"] if run.get("only") else []
    parts += [f"{k}={v}" for k, v in sorted((run.get("malloc_env") or {}).items())]
    return "; " + "; ".join(parts) if parts else ""


def render(results: dict[str, Any]) -> str:
    run = results["run"]
    samples = results["samples"]
    base = next(s for s in samples if s["label"].startswith("after warm-up"))
    end = samples[-1]
    total = sum(results["requests"].values())
    errors = sum(results["errors"].values())
    outcomes = results["outcomes"]
    rows = []
    for kind in sorted(results["requests"], key=lambda k: -results["requests"][k]):
        latency = results["latency_ms"].get(kind, {})
        rows.append(
            {
                "kind": kind,
                "requests": results["requests"][kind],
                "ok": outcomes.get(f"{kind}|ok", 0),
                "abandoned": outcomes.get(f"{kind}|abandoned", 0),
                "overloaded": outcomes.get(f"{kind}|overloaded", 0),
                "errors": outcomes.get(f"{kind}|error", 0),
                "hits": results["cache_hits"].get(kind, 0),
                "p50": f"{latency['p50']:.0f}" if latency else "",
                "p95": f"{latency['p95']:.0f}" if latency else "",
            }
        )
    columns = [
        ("kind", "kind"),
        ("requests", "requests"),
        ("ok", "ok"),
        ("abandoned", "abandoned by the client"),
        ("overloaded", "503 + Retry-After"),
        ("errors", "errors"),
        ("hits", "X-Cache: HIT"),
        ("p50", "ok p50 ms"),
        ("p95", "ok p95 ms"),
    ]
    sample_rows = [
        {
            "when": s["label"],
            "t": f"{s['t']:.0f}",
            "requests": s["requests"],
            "rss": f"{s['rss_mb']:.1f}",
            "anon": f"{s['anon_mb']:.1f}",
            "fds": s["fds"],
            "sockets": s["fd_kinds"].get("socket", 0),
            "threads": s["threads"],
            "cache": f"{s.get('cache_entries', '')} / {s.get('cache_mb', '')}",
            "load": f"{s['load1']:.1f}",
        }
        for s in samples
    ]
    sample_columns = [
        ("when", "sample"),
        ("t", "t s"),
        ("requests", "soak requests"),
        ("rss", "VmRSS MB"),
        ("anon", "RssAnon MB"),
        ("fds", "open fds"),
        ("sockets", "of which sockets"),
        ("threads", "threads"),
        ("cache", "cache entries / MB"),
        ("load", "load avg 1 min"),
    ]
    growth = end["rss_mb"] - base["rss_mb"]
    anon_growth = end["anon_mb"] - base["anon_mb"]
    per_1000 = 1000 * growth / total if total else float("nan")
    anon_per_1000 = 1000 * anon_growth / total if total else float("nan")
    log = results["log"]
    lines = [
        f"Measured {run['date']} with `.venv/bin/python bench/bench_soak.py --seconds {run['seconds']:.0f} "
        f"--warmup {run['warmup']:.0f}` "
        f"on {run['machine']}: the real `server.py` from {run['source']} on its embedded defaults (packaged "
        "Gemma 3 270M Q4_K_M on `light`, MiniLM on `embedding`, the similarity reranker; memory cache on), "
        f"a temporary working directory, HF_HUB_OFFLINE=1, loopback. {run['workers']} closed-loop async clients "
        f"sent a weighted mix for {run['warmup']:.0f} s of warm-up, then {results['wall_s']:.0f} s of soak "
        f"(the numbers below; seed {run['seed']}{variant(run)}). Chat and completions ask for 4-16 tokens; "
        "abandoned streams (64 tokens, end tokens banned) are dropped after 1-4 chunks, abandoned requests "
        "after a 0.2-1.0 s client timeout. **The 2 cores were shared with other engineers' work**: 1-minute "
        f"load average {run['load_start']:.1f} at the start, {run['load_end']:.1f} at the end (samples below), "
        "so latencies are pessimistic; the counts, memory and fds are what this section is about.",
        "",
        table(rows, columns),
        "",
        f"- **Requests: {total}** in {results['wall_s']:.0f} s ({total / results['wall_s']:.1f}/s); "
        f"**errors: {errors}** (target 0)"
        + (": " + "; ".join(f"{k} x{n}" for k, n in sorted(results["errors"].items())) if errors else "")
        + f". Warm-up: {sum(results['warmup']['requests'].values())} requests, "
        f"{sum(results['warmup']['errors'].values())} errors.",
        "",
        table(sample_rows, sample_columns),
        "",
        f"- **RSS after warm-up vs end** (both with no request in flight): {base['rss_mb']:.1f} MB -> "
        f"{end['rss_mb']:.1f} MB ({growth:+.1f} MB, {per_1000:+.2f} MB per 1,000 requests); anonymous memory "
        f"{base['anon_mb']:.1f} -> {end['anon_mb']:.1f} MB ({anon_growth:+.1f} MB, {anon_per_1000:+.2f} MB per "
        f"1,000 requests). Least-squares slope over the samples under load: "
        f"{signed(results['slope_rss'])} MB VmRSS, {signed(results['slope_anon'])} MB RssAnon per 1,000 requests "
        f"(second half of the soak only: {signed(results['slope_rss_2nd_half'])} and "
        f"{signed(results['slope_anon_2nd_half'])}).",
        f"- **Open fds**: {samples[0]['fds']} idle before any request, {base['fds']} after warm-up, "
        f"{end['fds']} at the end; threads {samples[0]['threads']} -> {base['threads']} -> {end['threads']}.",
        f"- **Nothing left running**: {results['settle_end_s']:.1f} s after the last client stopped, /health and "
        "/metrics showed "
        + (
            "no request in flight, no active sequence, no queue"
            if not results["busy_at_end"]
            else f"still busy: {results['busy_at_end']}"
        )
        + f"; /health status at the end: `{results['health_end'].get('status')}`.",
    ]
    for probe in results["probes"]:
        what = "stream dropped after 2 chunks" if probe["streamed"] else "non-streamed request given up after 0.5 s"
        lines.append(
            f"- **Abandon probe, {what}** (400 tokens asked, end tokens banned): the light tier computed nothing "
            f"{probe['stop_s']:.2f} s after the client left (client outcome: {probe['outcome']})."
        )
    lines.append(
        f"- **Server log** (LOG_LEVEL=warning): {log['tracebacks']} tracebacks, {log['error_lines']} ERROR lines, "
        f"{log['warning_lines']} WARNING lines; exit code after SIGINT {results['exit_code']}."
        + "".join(f" Distinct: `{m}` x{n}." for m, n in log["distinct_errors"].items())
    )
    return "\n".join(lines)


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
