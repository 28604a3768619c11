"""Session turns vs resending the history: TTFT of turn 10 of a conversation, on a busy server.

Run from the repository root:  .venv/bin/python bench/bench_sessions.py [--rounds 3] [--no-write]

One server (Gemma 3 270M Q4_K_M, 2 threads, LIGHT_PARALLEL=4, prefix reuse on as shipped, memory
store) with two background streams generating all the time. Each round holds two conversations with
the same kind of content but their own system prompt (so neither can reuse the other's KV): one kept
by the server (`session_id`, only the new message sent), one whose client resends its whole history
as a plain chat request. Their turns 1-9 alternate; turn 10 of each is timed, in an order that flips
every round. A third request resends the session's turn-10 history under a system prompt never seen
before: what turn 10 costs when no KV prefix can be reused. Greedy 12-token answers, streamed
`/v1/chat/completions`; TTFT = the first content chunk. The 1-minute load average is recorded around
every round: this machine's cores are shared. Results go to BENCHMARKS.md (## Sessions).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
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

PARALLEL = 4
TURNS = 10
MAX_TOKENS = 12
BACKGROUND_TOKENS = 48
BACKGROUND = 2
QUESTIONS = (
    "Which room keeps record 21?",
    "And who may read it on weekdays?",
    "What if I bring it back late on a Sunday?",
    "Which desk takes late returns?",
    "Is room 4 older than room 9?",
    "How many records are in room 12?",
    "Which record shares a room with record 77?",
    "Can a visitor without a card see record 203?",
    "What happens to a record found in the wrong room?",
    "Summarise what you told me in one sentence.",
)


def system_prompt(tag: str) -> str:
    """About 350 Gemma tokens; `tag` makes each conversation's prompt its own."""
    rules = " ".join(f"Rule {n}: record {n * 7} is kept in room {n % 13}." for n in range(20))
    return f"You are the keeper of the {tag} archive. Answer in one short sentence, from these rules only. {rules}"


async def chat(client: httpx.AsyncClient, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed greedy chat request: TTFT, the reply and the prompt's tokens."""
    body = {
        "model": "light",
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **body,
    }
    start = time.perf_counter()
    ttft, text, prompt_tokens = 0.0, "", 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"error event: {chunk['error']}")
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
            for choice in chunk.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    ttft = ttft or time.perf_counter() - start
                    text += piece
    return {"ttft": ttft, "text": text, "prompt_tokens": prompt_tokens}


async def background(client: httpx.AsyncClient, n: int, stop_event: asyncio.Event) -> int:
    """Keep one long generation running until told to stop; how many finished."""
    done = 0
    while not stop_event.is_set():
        body = {
            "model": "light",
            "max_tokens": BACKGROUND_TOKENS,
            "temperature": 0.8,
            "seed": done,
            "messages": [{"role": "user", "content": f"Tell story number {n}-{done} about a lighthouse keeper."}],
        }
        await client.post("/v1/chat/completions", json=body)
        done += 1
    return done


class Conversation:
    def __init__(self, client: httpx.AsyncClient, tag: str, session: bool) -> None:
        self.client = client
        self.system = system_prompt(tag)
        self.session_id: str | None = None
        self.history: list[dict[str, Any]] = [{"role": "system", "content": self.system}]
        self.kept = session

    async def open(self) -> None:
        if self.kept:
            created = await self.client.post("/v1/sessions", json={"system": self.system, "model": "light"})
            created.raise_for_status()
            self.session_id = created.json()["id"]

    async def turn(self, question: str) -> dict[str, Any]:
        message = {"role": "user", "content": question}
        if self.kept:
            result = await chat(self.client, {"session_id": self.session_id, "messages": [message]})
        else:
            result = await chat(self.client, {"messages": [*self.history, message]})
        self.history += [message, {"role": "assistant", "content": result["text"]}]
        return result


async def one_round(url: str, n: int) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=url, timeout=900) as client:
        await chat(client, {"messages": [{"role": "user", "content": "Say hi."}]})  # loads the model
        stop_event = asyncio.Event()
        streams = [asyncio.create_task(background(client, i, stop_event)) for i in range(BACKGROUND)]
        try:
            session = Conversation(client, f"r{n}-session", True)
            plain = Conversation(client, f"r{n}-plain", False)
            await session.open()
            for question in QUESTIONS[: TURNS - 1]:
                for conversation in (session, plain) if n % 2 == 0 else (plain, session):
                    done = await conversation.turn(question)
                    print(f"  turn {len(conversation.history) // 2}: {done['ttft'] * 1000:.0f} ms", flush=True)
            last = QUESTIONS[TURNS - 1]
            order = (session, plain) if n % 2 == 0 else (plain, session)
            timed = {("session" if c is session else "plain"): await c.turn(last) for c in order}
            # The session's turn-10 history again, under a system prompt no slot holds: no prefix to reuse.
            cold_history = [{"role": "system", "content": system_prompt(f"r{n}-cold")}, *session.history[1:-1]]
            timed["cold"] = await chat(client, {"messages": cold_history})
            sizes = {
                "session": len(json.dumps({"session_id": session.session_id, "messages": [session.history[-2]]})),
                "plain": len(json.dumps({"messages": plain.history[:-1]})),
            }
        finally:
            stop_event.set()
            finished = sum(await asyncio.gather(*streams))
    return {"timed": timed, "body_bytes": sizes, "background_done": finished}


def load() -> float:
    return os.getloadavg()[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    process, url, _ = start_ours(gemma_path(), PARALLEL, {"SPEECH_MODEL_PATH": ""})
    runs: list[dict[str, Any]] = []
    try:
        for n in range(args.rounds):
            before = load()
            result = asyncio.run(one_round(url, n))
            result.update(round=n + 1, load_before=before, load_after=load())
            t = result["timed"]
            print(
                f"round {n + 1}: turn 10 TTFT session {t['session']['ttft'] * 1000:.0f} ms, "
                f"resent {t['plain']['ttft'] * 1000:.0f} ms, cold {t['cold']['ttft'] * 1000:.0f} ms "
                f"({t['session']['prompt_tokens']} prompt tokens); load {before:.1f} -> {result['load_after']:.1f}"
            )
            runs.append(result)
    finally:
        with contextlib.suppress(Exception):
            stop(process)
    out = Path(__file__).resolve().parent / "results" / "bench_sessions.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(runs, indent=1))
    body = render(runs)
    print(body)
    if not args.no_write:
        write_section("Sessions", body)


def render(runs: list[dict[str, Any]]) -> str:
    rows = [
        {
            "round": run["round"],
            "session": run["timed"]["session"]["ttft"] * 1000,
            "plain": run["timed"]["plain"]["ttft"] * 1000,
            "cold": run["timed"]["cold"]["ttft"] * 1000,
            "ratio": run["timed"]["session"]["ttft"] / run["timed"]["plain"]["ttft"],
            "tokens": f"{run['timed']['session']['prompt_tokens']} / {run['timed']['plain']['prompt_tokens']}",
            "bytes": f"{run['body_bytes']['session']} / {run['body_bytes']['plain']}",
            "load": f"{run['load_before']:.1f} / {run['load_after']:.1f}",
        }
        for run in runs
    ]
    columns = [
        ("round", "round"),
        ("session", "session turn 10 TTFT ms"),
        ("plain", "resent history TTFT ms"),
        ("cold", "resent, no reusable prefix, TTFT ms"),
        ("ratio", "session / resent"),
        ("tokens", "prompt tokens session / resent"),
        ("bytes", "request body bytes session / resent"),
        ("load", "load avg before / after"),
    ]
    ratios = [row["ratio"] for row in rows]
    lines = [
        f"Turn {TURNS} of a conversation kept by the server (`session_id`) vs the same kind of conversation "
        f"resent whole by its client, with {BACKGROUND} background streams of {BACKGROUND_TOKENS}-token "
        f"generations running throughout; greedy {MAX_TOKENS}-token answers, streamed `/v1/chat/completions`, "
        "Gemma 3 270M Q4_K_M, "
        f"{THREADS} threads, {PARALLEL} parallel sequences of 4,096 tokens, prefix reuse on (the default), "
        "memory store. The two conversations' turns alternate; turn 10's order flips every round. "
        "`.venv/bin/python bench/bench_sessions.py`.",
        "",
        table(rows, columns),  # type: ignore[arg-type]
        "",
        f"- session / resent turn-10 TTFT: median {statistics.median(ratios):.2f} over {len(rows)} rounds.",
        f"- Background generations finished meanwhile: {', '.join(str(r['background_done']) for r in runs)}.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
