"""Where an embeddings request's time goes, and the issue-17 targets for the HTTP path (item 4).

Starts `server.py` (only the embedding tier, MiniLM, 1 thread, cache off, no quick start) from this tree
and, with `--root`, from other trees too (A/B: the same setups alternate within each round), then per
round and server:
  - batch-1 latency: sequential one-sentence requests (one kept-alive connection, bench/raw_client.py), median ms;
  - server CPU per batch-1 request (from /proc/<pid>/stat), ms;
  - 16 concurrent clients, one sentence per request (bench/raw_client.py), texts/s;
and in-process sentence-transformers: batch-1 encode latency (median ms) and batch-32 texts/s.
Prints a table and the 1-minute load average; writes nothing.

    .venv/bin/python bench/bench_embed_path.py [--rounds 3] [--root /path/to/other/tree ...]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_embeddings import concurrent, load_in_process, sentences, start_server  # noqa: E402
from raw_client import RawConnection  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batch1(url: str, pid: int, texts: list[str]) -> tuple[float, float]:
    """Median latency (ms) of sequential one-sentence requests on one kept-alive connection (the lean
    client of bench/raw_client.py), and the server's CPU ms per request."""

    async def run() -> tuple[float, float]:
        connection = await RawConnection.open(url)
        try:
            await connection.post("/v1/embeddings", {"model": "embedding", "input": "warm the connection"})
            times = []
            cpu = cpu_seconds(pid)
            for text in texts:
                start = time.perf_counter()
                status, body = await connection.post("/v1/embeddings", {"model": "embedding", "input": text})
                times.append(time.perf_counter() - start)
                if status != 200:
                    raise RuntimeError(f"HTTP {status}: {body[:200]!r}")
            cpu = cpu_seconds(pid) - cpu
        finally:
            connection.close()
        return statistics.median(times) * 1000, cpu / len(texts) * 1000

    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--root", action="append", default=[], help="another tree to start server.py from")
    args = parser.parse_args()
    os.environ["QUICK_START_EMBEDDINGS"] = "false"  # steady state: sentence-transformers from the start
    roots = [ROOT, *(Path(r).resolve() for r in args.root)]
    servers = {}
    for root in roots:
        proc, url = start_server(1, Path(tempfile.mkdtemp()) / ".port", 5.0, root=root)
        servers[root] = (proc, url)
        httpx.post(f"{url}/v1/embeddings", json={"model": "embedding", "input": "load"}, timeout=900)  # the load
    model = load_in_process(1)
    samples: dict[str, list[float]] = collections.defaultdict(list)
    try:
        for n in range(args.rounds):
            for root, (proc, url) in servers.items():
                latency, cpu = batch1(url, proc.pid, sentences(60))
                samples[f"{root.name} batch-1 ms"].append(latency)
                samples[f"{root.name} server CPU ms/request"].append(cpu)
                samples[f"{root.name} 16 clients texts/s"].append(asyncio.run(concurrent(url, sentences(320), 16)))
            one = []
            for text in sentences(60):
                start = time.perf_counter()
                model.encode([text], show_progress_bar=False)
                one.append(time.perf_counter() - start)
            samples["in-process batch-1 ms"].append(statistics.median(one) * 1000)
            start = time.perf_counter()
            model.encode(sentences(320), batch_size=32, show_progress_bar=False)
            samples["in-process batch-32 texts/s"].append(320 / (time.perf_counter() - start))
            print(f"round {n + 1} done, load {os.getloadavg()[0]:.1f}", flush=True)
            for name, values in samples.items():
                print(f"| {name} | {', '.join(f'{v:.1f}' for v in values)} | {statistics.median(values):.1f} |")
    finally:
        for proc, _ in servers.values():
            proc.kill()  # the numbers are out; a drain could take long on a loaded machine
            proc.wait(30)
    print(f"1-minute load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
