"""A tier's model swapped under load: the time from the swap request to the first token on the new model.

Run from the repository root:  .venv/bin/python bench/bench_swap.py [--clients 4] [--rounds 2] [--no-write]

The light tier serves the packaged Gemma 3 270M; the swap (`POST /admin/tiers/light/model`) points it at a
second name for the same file (a hard link: a different model, the same weights), while `--clients`
clients stream chat completions back to back. Two modes:
- beside: no memory budget; the new model loads next to the old one, then new requests go to it;
- in place: MAX_MEMORY_GB holds one model, not two; the old model drains and unloads first, new requests
  wait, then the new one loads (manager/swap.py).
Measured per round: the swap request's duration; the first token on the new model (beside: a request sent
the moment the swap answers; in place: the first token of the requests held while it swapped); the
longest gap between two tokens any client saw (how long the tier stopped producing); requests refused.
The 1-minute load average is recorded: this machine's 2 cores are shared. Results go to BENCHMARKS.md
(## Model swap).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_llm import gemma_path, start_ours, stop  # noqa: E402
from report import table, write_section  # noqa: E402

MAX_TOKENS = 32
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


class Client(threading.Thread):
    """Streams chat completions one after another; notes when each was sent and when each token came."""

    def __init__(self, url: str, index: int, stop_at: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.index, self.stop_at = url, index, stop_at
        self.requests: list[dict[str, Any]] = []  # sent, first (token), tokens (times), status

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=600) as client:
            n = 0
            while not self.stop_at.is_set():
                n += 1
                self.requests.append(stream_once(client, f"{PROMPT} ({self.index}.{n})"))


def wait_until(condition: Callable[[], bool], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the clients did not get there")
        time.sleep(0.05)


def stream_once(client: httpx.Client, content: str) -> dict[str, Any]:
    body = {
        "model": "light",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0.7,
        "stream": True,
    }
    record: dict[str, Any] = {"sent": time.perf_counter(), "tokens": [], "status": 0}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        record["status"] = response.status_code
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            record["cut"] = record.get("cut", False) or "error" in event  # stopped by the server
            if event.get("choices") and event["choices"][0]["delta"].get("content"):
                record["tokens"].append(time.perf_counter())
    return record


def round_once(url: str, new_path: str, clients: int, mode: str) -> dict[str, Any]:
    stop_at = threading.Event()
    threads = [Client(url, i, stop_at) for i in range(clients)]
    for thread in threads:
        thread.start()
    wait_until(lambda: all(t.requests for t in threads))  # each client has finished one stream
    t0 = time.perf_counter()
    swapped = httpx.post(f"{url}/admin/tiers/light/model", json={"model_path": new_path}, timeout=600)
    done = time.perf_counter()
    probe: dict[str, Any] = {}
    if mode == "beside":
        with httpx.Client(base_url=url, timeout=600) as client:
            probe = stream_once(client, PROMPT)
    wait_until(lambda: all(any(r["sent"] > done for r in t.requests) for t in threads))  # one after it each
    stop_at.set()
    for thread in threads:
        thread.join(600)
    swapped.raise_for_status()
    records = [r for t in threads for r in t.requests]
    if mode == "beside":
        first_new = probe["tokens"][0] - t0
    else:  # held at the gate while the old model drained: everything sent after the swap began
        held = [r["tokens"][0] for r in records if r["sent"] > t0 and r["tokens"] and r["tokens"][0] > done]
        first_new = min(held) - t0
    tokens = sorted(t for r in records for t in r["tokens"])
    gaps = [b - a for a, b in zip(tokens, tokens[1:], strict=False)]
    steady = [b - a for a, b in zip(tokens, tokens[1:], strict=False) if b < t0]
    return {
        "mode": mode,
        "swap_s": round(done - t0, 2),
        "first_new_token_s": round(first_new, 2),
        "longest_gap_s": round(max(gaps), 2),
        "steady_gap_ms": round(1000 * statistics.median(steady), 1) if steady else "",
        "requests": len(records),
        "refused": sum(1 for r in records if r["status"] != 200),
        "cut": sum(1 for r in records if r.get("cut")),
        "load_1m": round(os.getloadavg()[0], 1),
    }


def run_mode(path: str, clients: int, rounds: int, mode: str) -> list[dict[str, Any]]:
    folder = Path(tempfile.mkdtemp(prefix="bench-swap-"))
    names = [folder / "gemma-a.gguf", folder / "gemma-b.gguf"]
    for name in names:
        os.link(path, name)  # one file, two model names: a real swap of the same weights
    size_gb = Path(path).stat().st_size / 1024**3
    # DRAIN_TIMEOUT well above a stream's length on this shared machine: streams on the old model finish
    extra = {
        "LIGHT_PRELOAD": "true",
        "MODELS_DIR": str(folder),
        "PERSIST_TIER_CHANGES": "false",
        "DRAIN_TIMEOUT": "300",
    }
    if mode == "in place":
        extra["MAX_MEMORY_GB"] = f"{size_gb * 1.5:.4f}"  # one model fits, two do not
    process, url, _ = start_ours(str(names[0]), parallel=clients, extra=extra)
    rows = []
    try:
        for i in range(rounds):  # a -> b, b -> a, ...
            rows.append({"round": i + 1, **round_once(url, str(names[(i + 1) % 2]), clients, mode)})
            print(rows[-1], flush=True)
    finally:
        stop(process)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    path = gemma_path()
    rows = run_mode(path, args.clients, args.rounds, "beside") + run_mode(path, args.clients, args.rounds, "in place")
    columns = [
        ("mode", "mode"),
        ("round", "round"),
        ("swap_s", "swap request (s)"),
        ("first_new_token_s", "swap request → first token on the new model (s)"),
        ("longest_gap_s", "longest pause between tokens (s)"),
        ("steady_gap_ms", "median gap before the swap (ms)"),
        ("requests", "requests"),
        ("refused", "refused"),
        ("cut", "streams cut"),
        ("load_1m", "load avg (1 min)"),
    ]
    body = (
        f"`bench/bench_swap.py --clients {args.clients} --rounds {args.rounds}`: the light tier (packaged Gemma 3 "
        f"270M Q4_K_M, LIGHT_PARALLEL={args.clients}, 2 threads) swapped between two names of the same file while "
        f"{args.clients} clients stream {MAX_TOKENS}-token chat completions back to back. *beside*: no memory "
        "budget, the new model loads next to the old one; *in place*: MAX_MEMORY_GB holds one model, so the old one "
        "drains, unloads, then the new one loads while new requests wait.\n\n" + table(rows, columns)
    )
    print(body)
    if not args.no_write:
        write_section("Model swap", body)


if __name__ == "__main__":
    main()
