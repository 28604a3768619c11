"""MLX serving benchmark: our MLX tier (mlx-lm BatchGenerator) vs mlx_lm.server, same random model.

Run from the repository root:  .venv/bin/python bench/bench_mlx.py
No MLX model can be downloaded here, so the model is a random Llama generated with transformers
(~30M parameters, the tests' small BPE tokenizer); on Linux it runs on the CPU build of MLX.
Results go to BENCHMARKS.md (## MLX serving).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_llm import free_port, stop, wait_ready  # noqa: E402
from loadgen import run_level  # noqa: E402
from report import table, write_section  # noqa: E402

MAX_TOKENS = 128
PROMPT = "the quick brown fox jumps over the lazy dog. hello world, this is a tiny model for tests. "
_NUMBERS = itertools.count(1)


def build_model(folder: Path) -> Path:
    from tests.model_builders import build_tiny_llama

    return build_tiny_llama(folder, hidden=512, layers=8, heads=8, kv_heads=4, context=2048)


def body_factory(model: str, eos: int) -> Any:
    def body_for(i: int) -> dict[str, Any]:
        n = next(_NUMBERS)
        return {
            "model": model,
            "prompt": f"{n} {PROMPT}",
            "max_tokens": MAX_TOKENS,
            "temperature": 0.7,
            "logit_bias": {str(eos): -100},  # every stream generates exactly MAX_TOKENS
        }

    return body_for


def measure(url: str, model: str, eos: int) -> list[dict[str, Any]]:
    asyncio.run(run_level(url, body_factory(model, eos), 1, 1))  # warm-up
    rows = []
    for level in (1, 4, 8):
        row = asyncio.run(run_level(url, body_factory(model, eos), level, 2 * level))
        print(
            f"  c={level}: {row['tok_s']:.1f} tok/s, TTFT p50 {row['ttft_p50'] * 1000:.0f} ms, errors {row['errors']}"
        )
        rows.append(row)
    return rows


def start_ours(model: Path) -> tuple[subprocess.Popen[bytes], str]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-mlx-"))
    env = {
        **os.environ,
        "PORT": "0",
        "PORT_FILE": str(workdir / ".port"),
        "LIGHT_MODEL_PATH": str(model),
        "LIGHT_BACKEND": "mlx",
        "LIGHT_PARALLEL": "8",
        "ENABLE_CACHE": "false",
        "EMBEDDING_MODEL_PATH": "",
        "RERANKER_MODEL_PATH": "",
        "SPEECH_MODEL_PATH": "",  # no Whisper: its libraries would be imported in the background mid-run
        "LOG_LEVEL": "warning",
    }
    process = subprocess.Popen([sys.executable, str(ROOT / "server.py")], cwd=workdir, env=env)
    deadline = time.monotonic() + 60
    while not (workdir / ".port").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{(workdir / '.port').read_text().strip()}"
    wait_ready(url + "/health", process)
    return process, url


def start_mlx_lm_server(model: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlx_lm",
        "server",
        "--model",
        str(model),
        "--port",
        str(port),
        "--log-level",
        "WARNING",
    ]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/v1/models", process)
    return process, url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    model = build_model(Path(tempfile.mkdtemp(prefix="bench-mlx-model-")))
    from transformers import AutoTokenizer

    eos = AutoTokenizer.from_pretrained(model).eos_token_id
    results: dict[str, list[dict[str, Any]]] = {}
    print("ours (mlx tier, PARALLEL=8)")
    process, url = start_ours(model)
    try:
        results["llmservice (MLX tier)"] = measure(url, "light", eos)
    finally:
        stop(process)
    print("mlx_lm.server")
    process, url = start_mlx_lm_server(model)
    try:
        results["mlx_lm.server"] = measure(url, str(model), eos)
    finally:
        stop(process)
    rows = [{"server": name, **row, "ttft_p50": row["ttft_p50"] * 1000} for name, r in results.items() for row in r]
    columns = [
        ("server", "server"),
        ("concurrency", "streams"),
        ("tok_s", "aggregate tok/s"),
        ("ttft_p50", "TTFT p50 ms"),
        ("latency_p50", "latency p50 s"),
        ("errors", "errors"),
    ]
    ours = {r["concurrency"]: r for r in results["llmservice (MLX tier)"]}
    peer = {r["concurrency"]: r for r in results["mlx_lm.server"]}
    body = "\n".join(
        [
            f"A random Llama (hidden 512, 8 layers, ~30M parameters, generated with transformers; no MLX model can "
            f"be downloaded here) on the CPU build of MLX, {MAX_TOKENS} generated tokens per stream (end token "
            "banned), streamed `/v1/completions`. One run of `.venv/bin/python bench/bench_mlx.py`.",
            "",
            table(rows, columns),
            "",
            f"- 8 streams vs our own single stream: {ours[8]['tok_s'] / ours[1]['tok_s']:.2f} x (target >= 1.5).",
            f"- 8 streams vs mlx_lm.server: {ours[8]['tok_s'] / peer[8]['tok_s']:.2f} x (target >= 1.0).",
        ]
    )
    print(body)
    if not args.no_write:
        write_section("MLX serving", body)


if __name__ == "__main__":
    main()
