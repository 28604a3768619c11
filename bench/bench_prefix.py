"""Shared-prefix KV reuse: 8 users, one ~1,000-token system prompt, a different ~20-token question each.

Run from the repository root:  .venv/bin/python bench/bench_prefix.py [--rounds 2] [--no-write]

Each round starts a fresh server with `LIGHT_PREFIX_REUSE=true` and one with `false`, alternately (the
order flips every round), and measures on each:
- sequential: the 8 users one after another; TTFT of each (user 1 meets a cold cache);
- concurrent: the 8 users at once, with another system prompt (cold again); TTFT p50 and the slowest.
Greedy answers of 16 tokens, streamed `/v1/chat/completions`, Gemma 3 270M, 2 threads, LIGHT_PARALLEL=8.
With a `llama-server` binary (LLAMA_SERVER, see bench_llm.py) the same workload runs against it too
(`--parallel 8 --cache-reuse 256`, its slot similarity as it comes), with its prompt cache on and off
(`cache_prompt: false`). The 1-minute load average is recorded around every run: this machine's 2 cores
are shared. Results go to BENCHMARKS.md (## Prefix reuse).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_llm import THREADS, find_llama_server, gemma_path, start_cpp_server, start_ours, stop  # noqa: E402
from report import table, write_section  # noqa: E402

USERS = 8
MAX_TOKENS = 16
CPP_FLAGS = ("--cache-reuse", "256")  # llama-server: also reuse chunks that moved (KV shifting), not only prefixes
QUESTIONS = (
    "Which room of the archive holds record number 21, and who is allowed to read it on weekdays?",
    "If I bring record 35 back late on a Sunday evening, which desk should I leave it at?",
    "Please list the rooms that keep records with numbers between 100 and 150, in order.",
    "Is it true that the records in room 4 are older than the ones kept in room 9?",
    "How many records does the archive keep in room 12, counting only the ones from this list?",
    "Which record number is stored in the same room as record 77, according to the rules?",
    "Can a visitor without a card see record 203 if a keeper goes with them the whole time?",
    "What happens to a record that is found in the wrong room during the yearly count in May?",
)


def system_prompt(tag: str) -> str:
    """About 1,000 Gemma tokens; `tag` makes each run's prompt its own (a cold cache)."""
    rules = " ".join(f"Rule {n}: record {n * 7} is kept in room {n % 13}, shelf {n % 5}." for n in range(58))
    return f"You are the keeper of the {tag} archive. Answer briefly, from these rules only. {rules}"


async def ask(client: httpx.AsyncClient, model: str, system: str, question: str, cache: bool) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if not cache:
        body["cache_prompt"] = False  # llama-server's own switch; ours is LIGHT_PREFIX_REUSE
    start = time.perf_counter()
    ttft, text, prompt_tokens = 0.0, "", 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    ttft = ttft or time.perf_counter() - start
                    text += piece
    return {"ttft": ttft, "text": text, "prompt_tokens": prompt_tokens}


async def workload(url: str, model: str, tag: str, cache: bool = True) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        await ask(client, model, "Warm-up.", "Say hi.", cache)  # loads the model; shares no prefix
        sequential = [await ask(client, model, system_prompt(f"{tag}-s"), q, cache) for q in QUESTIONS[:USERS]]
        conc_system = system_prompt(f"{tag}-c")
        concurrent = await asyncio.gather(*(ask(client, model, conc_system, q, cache) for q in QUESTIONS[:USERS]))
    return {"sequential": sequential, "concurrent": list(concurrent)}


def load() -> float:
    return os.getloadavg()[0]


def measure(name: str, start: Any, model: str, tag: str, cache: bool = True) -> dict[str, Any]:
    before = load()
    process, url = start()
    try:
        result = asyncio.run(workload(url, model, tag, cache))
    except httpx.HTTPError as exc:  # a server that fails is reported, the other runs go on
        print(f"  {name}: failed ({type(exc).__name__}: {exc})")
        return {"name": name, "failed": f"{type(exc).__name__}: {exc}"}
    finally:
        stop(process)
    result.update(name=name, load_before=before, load_after=load())
    seq = [r["ttft"] for r in result["sequential"]]
    conc = sorted(r["ttft"] for r in result["concurrent"])
    print(
        f"  {name}: sequential user 1 {seq[0] * 1000:.0f} ms, users 2-8 max {max(seq[1:]) * 1000:.0f} ms; "
        f"concurrent p50 {statistics.median(conc) * 1000:.0f} ms; load {before:.1f} -> {result['load_after']:.1f}"
    )
    return result


def ours(path: str, reuse: bool) -> Any:
    def start() -> tuple[Any, str]:
        # No speech tier: its library would be imported in the background while user 1 is measured.
        process, url, _ = start_ours(path, USERS, {"LIGHT_PREFIX_REUSE": str(reuse).lower(), "SPEECH_MODEL_PATH": ""})
        return process, url

    return start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    path = gemma_path()
    binary = find_llama_server()
    runs: list[dict[str, Any]] = []
    for n in range(args.rounds):
        order = (True, False) if n % 2 == 0 else (False, True)
        for reuse in order:
            name = f"llmservice, reuse {'on' if reuse else 'off'}"
            print(f"round {n + 1}: {name}")
            runs.append({"round": n + 1, **measure(name, ours(path, reuse), "light", f"r{n}")})
        if binary:
            for cache in (True, False) if n % 2 == 0 else (False, True):
                name = f"llama-server, cache_prompt {'on' if cache else 'off'}"
                print(f"round {n + 1}: {name}")

                def start() -> tuple[Any, str]:
                    return start_cpp_server(binary, path, USERS, CPP_FLAGS)

                runs.append({"round": n + 1, **measure(name, start, "gemma", f"r{n}-cpp", cache)})
    out = Path(__file__).resolve().parent / "results" / "bench_prefix.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(runs, indent=1))
    body = render(runs)
    print(body)
    if not args.no_write:
        write_section("Prefix reuse", body)


def summarise(run: dict[str, Any]) -> dict[str, Any]:
    seq = [r["ttft"] * 1000 for r in run["sequential"]]
    conc = [r["ttft"] * 1000 for r in run["concurrent"]]
    ordered = sorted(conc)
    return {
        "round": run["round"],
        "name": run["name"],
        "user1": seq[0],
        "later_p50": statistics.median(seq[1:]),
        "later_max": max(seq[1:]),
        "seq_ratio": max(seq[1:]) / seq[0],
        "conc_p50": statistics.median(conc),
        "conc_p95": ordered[-1] if len(ordered) < 20 else ordered[int(0.95 * (len(ordered) - 1))],
        "load": f"{run['load_before']:.1f} / {run['load_after']:.1f}",
        "prompt": run["sequential"][0]["prompt_tokens"],
    }


def render(all_runs: list[dict[str, Any]]) -> str:
    runs = [run for run in all_runs if "failed" not in run]
    rows = [summarise(run) for run in runs]
    columns = [
        ("round", "round"),
        ("name", "server"),
        ("user1", "seq. user 1 TTFT ms"),
        ("later_p50", "seq. users 2-8 p50 ms"),
        ("later_max", "seq. users 2-8 max ms"),
        ("seq_ratio", "users 2-8 max / user 1"),
        ("conc_p50", "concurrent TTFT p50 ms"),
        ("conc_p95", "concurrent max ms"),
        ("load", "load avg before / after"),
    ]
    prompt = rows[0]["prompt"] if rows else 0
    lines = [
        f"{USERS} users with the same {prompt}-token prompt up to their question (system prompt and template; "
        f"~20-token questions), greedy {MAX_TOKENS}-token answers, streamed `/v1/chat/completions`, Gemma 3 270M "
        f"Q4_K_M, {THREADS} threads, {USERS} parallel sequences of 4,096 tokens. Fresh servers, reuse on and off "
        "alternately; sequential and concurrent runs use different system prompts, so each starts cold. "
        "`.venv/bin/python bench/bench_prefix.py`.",
        "",
        table(rows, columns),
        "",
    ]
    for round_no in sorted({r["round"] for r in rows}):
        pair = {r["name"]: r for r in rows if r["round"] == round_no}
        on, off = pair.get("llmservice, reuse on"), pair.get("llmservice, reuse off")
        if on and off:
            lines.append(
                f"- Round {round_no}: sequential users 2-8 at most {on['seq_ratio']:.2f} x user 1's TTFT "
                f"(target <= 0.2); concurrent p50 {on['conc_p50'] / off['conc_p50']:.2f} x reuse off "
                f"(target <= 0.4)."
            )
        cpp_on, cpp_off = pair.get("llama-server, cache_prompt on"), pair.get("llama-server, cache_prompt off")
        if on and cpp_on and cpp_off:
            lines.append(
                f"- Round {round_no}, llama-server: sequential users 2-8 at most {cpp_on['seq_ratio']:.2f} x user 1; "
                f"concurrent p50 {cpp_on['conc_p50'] / cpp_off['conc_p50']:.2f} x its cache off; "
                f"ours / llama-server concurrent p50 {on['conc_p50'] / cpp_on['conc_p50']:.2f}."
            )
    same = sum(
        a["text"] == b["text"]
        for run_on in runs
        if run_on["name"] == "llmservice, reuse on"
        for run_off in runs
        if run_off["name"] == "llmservice, reuse off" and run_off["round"] == run_on["round"]
        for a, b in zip(run_on["sequential"], run_off["sequential"], strict=True)
    )
    total = sum(USERS for run in runs if run["name"] == "llmservice, reuse on")
    lines.append(f"- Greedy answers of the sequential users, reuse on vs off (same prompts): {same} of {total} equal.")
    for run in all_runs:
        if "failed" in run:
            lines.append(f"- Round {run['round']}, {run['name']}: failed ({run['failed']}).")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
