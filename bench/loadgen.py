"""A bounded load generator for OpenAI-compatible servers on loopback (asyncio + httpx).

Each request streams `/v1/completions`; time to first token (TTFT) is the time to the first chunk
with text, and tokens are counted as text chunks (one token per chunk on every server measured).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import dataclass
from typing import Any

import httpx


@dataclass
class Result:
    ttft: float
    latency: float
    tokens: int
    error: str = ""


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


async def stream_one(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> Result:
    start = time.perf_counter()
    ttft = 0.0
    tokens = 0
    try:
        async with client.stream("POST", path, json={**body, "stream": True}) as response:
            if response.status_code != 200:
                await response.aread()
                return Result(0.0, time.perf_counter() - start, 0, f"HTTP {response.status_code}")
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Result(ttft, time.perf_counter() - start, tokens, chunk["error"].get("message", "error"))
                choices = chunk.get("choices") or []
                piece = choices[0].get("text") if choices else None
                if piece is None and choices:
                    piece = (choices[0].get("delta") or {}).get("content")
                if piece:
                    tokens += 1
                    if not ttft:
                        ttft = time.perf_counter() - start
    except httpx.HTTPError as exc:
        return Result(ttft, time.perf_counter() - start, tokens, type(exc).__name__)
    return Result(ttft, time.perf_counter() - start, tokens)


async def run_level(
    base_url: str, body_for: Any, concurrency: int, requests: int, path: str = "/v1/completions"
) -> dict[str, Any]:
    """`requests` streams, at most `concurrency` at once; aggregate tok/s over the wall time.

    `body_for(i)` gives the i-th request body (vary the prompt so no server can reuse a cached prefix).
    """
    semaphore = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 2)

    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:

        async def guarded(i: int) -> Result:
            async with semaphore:
                return await stream_one(client, path, body_for(i))

        start = time.perf_counter()
        results = await asyncio.gather(*(guarded(i) for i in range(requests)))
        wall = time.perf_counter() - start
    ok = [r for r in results if not r.error]
    return {
        "concurrency": concurrency,
        "requests": requests,
        "errors": len(results) - len(ok),
        "tokens": sum(r.tokens for r in ok),
        "tok_s": sum(r.tokens for r in ok) / wall if wall else 0.0,
        "ttft_p50": percentile([r.ttft for r in ok], 50),
        "ttft_p95": percentile([r.ttft for r in ok], 95),
        "latency_p50": percentile([r.latency for r in ok], 50),
        "latency_p95": percentile([r.latency for r in ok], 95),
        "per_stream_tok_s": statistics.mean([r.tokens / (r.latency - r.ttft) for r in ok if r.latency > r.ttft] or [0]),
        "error_kinds": sorted({r.error for r in results if r.error}),
    }
