"""Prompt-lookup decoding (`LIGHT_SPECULATIVE=ngram`) against plain decoding, same server, same prompts.

Run from the repository root:  .venv/bin/python bench/bench_speculative.py [--rounds 2] [--no-write]

Each round starts a fresh server with `LIGHT_SPECULATIVE=ngram` and one with `off`, alternately (the order
flips every round), and measures streamed `/v1/completions` on the packaged Gemma 3 270M, 2 threads:
- extractive, 1 stream: a ~500-token passage, then "quote it word for word" (greedy, 128 tokens);
- free text, 1 stream: a story opening, sampled (temperature 0.7, fixed seeds; 128 tokens);
- mixed, 4 streams at once: two extractive and two free-text requests (continuous batching with guesses).
Decode rate is (tokens - 1) / (last token - first token), per stream; the mixed row sums the streams' tokens
over the wall time. The 1-minute load average is recorded around every run. Results go to BENCHMARKS.md
(## Prompt-lookup decoding).
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

from bench_llm import THREADS, gemma_path, start_ours, stop  # noqa: E402
from report import table, write_section  # noqa: E402

TOKENS = 128
PASSAGE = (
    "The lighthouse on the northern cape was built in 1874 from granite cut on the island itself. Its keeper, "
    "Martha Quill, kept a log of every ship that passed, the weather at dawn and dusk, and the oil burned each "
    "night. In the winter of 1891 a storm tore the lantern's glass, and she kept the light burning with a "
    "lamp held in her own hands for three nights until the supply boat came. The harbour master wrote that "
    "no vessel was lost that winter, though eleven sailed past the reef in the dark. The lighthouse was "
    "automated in 1962, and the keeper's cottage became a small museum where her logs are shown under glass. "
    "Visitors can climb the one hundred and twelve steps to the gallery on summer afternoons, when the "
    "museum's volunteers tell the story of the three nights and of the letters the sailors wrote to thank "
    "her. The granite walls are two metres thick at the base and the lens, made in Paris, still turns. "
)
EXTRACTIVE = f"Passage:\n{PASSAGE * 2}\nQuote the passage above word for word.\nQuote:\nThe lighthouse on"
STORIES = (
    "Once upon a time, in a village between two rivers, there lived a baker who",
    "The expedition left the coast at dawn, and by the third day the guides",
    "When the old clock in the town square stopped for the first time in a hundred years,",
    "Nobody in the office knew why the printer only worked on Tuesdays, until",
)


async def complete(client: httpx.AsyncClient, prompt: str, greedy: bool, seed: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "light",
        "prompt": prompt,
        "max_tokens": TOKENS,
        "stream": True,
        "temperature": 0.0 if greedy else 0.7,
        "seed": seed,
        "stream_options": {"include_usage": True},
    }
    stamps: list[float] = []
    text: list[str] = []
    start = time.perf_counter()
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices", []):
                if choice.get("text"):
                    stamps.append(time.perf_counter())
                    text.append(choice["text"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    # Chunks carry one token each without guesses and several with them: rate from the usage count.
    decode = stamps[-1] - stamps[0] if len(stamps) > 1 else float("nan")
    return {"tokens": tokens, "ttft": stamps[0] - start, "rate": (tokens - 1) / decode, "text": "".join(text)}


async def workload(url: str) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        await complete(client, "Warm-up:", True, 0)  # loads the model
        extractive = [await complete(client, EXTRACTIVE, True, 0) for _ in range(2)]
        free = [await complete(client, STORIES[i], False, i) for i in range(2)]
        start = time.perf_counter()
        mixed = await asyncio.gather(
            complete(client, EXTRACTIVE, True, 0),
            complete(client, EXTRACTIVE.replace("Quote:", "Copy:"), True, 0),
            complete(client, STORIES[2], False, 2),
            complete(client, STORIES[3], False, 3),
        )
        wall = time.perf_counter() - start
        async with client.stream("GET", "/admin/status") as response:
            status = json.loads(await response.aread())
    return {
        "extractive": extractive,
        "free": free,
        "mixed": list(mixed),
        "mixed_rate": sum(r["tokens"] for r in mixed) / wall,
        "status": status,
    }


def measure(speculative: bool, path: str) -> dict[str, Any]:
    before = os.getloadavg()[0]
    extra = {"LIGHT_SPECULATIVE": "ngram" if speculative else "off", "SPEECH_MODEL_PATH": ""}
    process, url, _ = start_ours(path, 4, extra)
    try:
        result = asyncio.run(workload(url))
    finally:
        stop(process)
    result.update(speculative=speculative, load=f"{before:.1f} / {os.getloadavg()[0]:.1f}")
    extractive = statistics.median(r["rate"] for r in result["extractive"])
    free = statistics.median(r["rate"] for r in result["free"])
    print(
        f"  {'ngram' if speculative else 'off'}: extractive {extractive:.1f} tok/s, free {free:.1f} tok/s, "
        f"mixed {result['mixed_rate']:.1f} tok/s; load {result['load']}"
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    path = gemma_path()
    pairs: list[dict[str, Any]] = []
    for n in range(args.rounds):
        print(f"round {n + 1}")
        order = (True, False) if n % 2 == 0 else (False, True)
        runs = {spec: measure(spec, path) for spec in order}
        pairs.append({"round": n + 1, "on": runs[True], "off": runs[False]})
    out = Path(__file__).resolve().parent / "results" / "bench_speculative.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(pairs, indent=1, default=str))
    body = render(pairs)
    print(body)
    if not args.no_write:
        write_section("Prompt-lookup decoding", body)


def render(pairs: list[dict[str, Any]]) -> str:
    rows = []
    for pair in pairs:
        on, off = pair["on"], pair["off"]
        ext_on = statistics.median(r["rate"] for r in on["extractive"])
        ext_off = statistics.median(r["rate"] for r in off["extractive"])
        free_on = statistics.median(r["rate"] for r in on["free"])
        free_off = statistics.median(r["rate"] for r in off["free"])
        same = sum(a["text"] == b["text"] for a, b in zip(on["extractive"], off["extractive"], strict=True))
        same += sum(a["text"] == b["text"] for a, b in zip(on["free"], off["free"], strict=True))
        rows.append(
            {
                "round": pair["round"],
                "ext": f"{ext_on:.1f} / {ext_off:.1f}",
                "ext_ratio": ext_on / ext_off,
                "free": f"{free_on:.1f} / {free_off:.1f}",
                "free_ratio": free_on / free_off,
                "mixed": f"{on['mixed_rate']:.1f} / {off['mixed_rate']:.1f}",
                "mixed_ratio": on["mixed_rate"] / off["mixed_rate"],
                "same": f"{same} of 4",
                "load": f"{on['load']} · {off['load']}",
            }
        )
    columns = [
        ("round", "round"),
        ("ext", "extractive tok/s, ngram / off"),
        ("ext_ratio", "ratio (target ≥ 1.5)"),
        ("free", "free text tok/s, ngram / off"),
        ("free_ratio", "ratio (target ≥ 0.95)"),
        ("mixed", "4 streams mixed, tok/s"),
        ("mixed_ratio", "ratio"),
        ("same", "answers equal to off"),
        ("load", "load avg (ngram · off)"),
    ]
    return "\n".join(
        [
            f"Single-stream decode rate, streamed `/v1/completions`, Gemma 3 270M Q4_K_M, {THREADS} threads, "
            f"{TOKENS} tokens: extractive = quote a ~500-token passage from the prompt (greedy); free text = a story "
            "opening, sampled at temperature 0.7 with fixed seeds; 4 streams mixed = two extractive and two free "
            "at once. Fresh servers, `LIGHT_SPECULATIVE=ngram` and `off` alternately. "
            "`.venv/bin/python bench/bench_speculative.py`.",
            "",
            table(rows, columns),
        ]
    )


if __name__ == "__main__":
    main()
