"""The soak's traffic (bench/bench_soak.py): the weighted request mix, how each request is sent, and the
checks every response must pass (status, envelope, whole bodies, SSE streams ending in one [DONE] or one
error event)."""

from __future__ import annotations

import base64
import collections
import json
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

REQUEST_TIMEOUT = 120.0  # a request that takes longer is counted as a hang
EMBEDDING_DIM = 384  # all-MiniLM-L6-v2
BAN_END = {"1": -100, "106": -100}  # Gemma's <eos> and <end_of_turn>: generate the whole budget

WORDS = (
    "river harbour lantern orchard meadow glacier violin market castle engine garden comet ledger island "
    "pepper canyon archive signal ferry library"
).split()


def sentence(rng: random.Random, n: int) -> str:
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 12)))
    return f"Note {n}: the {words}."


# ---------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    status: str  # ok | abandoned | overloaded | error
    detail: str = ""
    cache_hit: bool = False


OK = Outcome("ok")


@dataclass
class Stats:
    requests: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    cache_hits: collections.Counter[str] = field(default_factory=collections.Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: collections.defaultdict(list))
    examples: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    def record(self, kind: str, outcome: Outcome, seconds: float) -> None:
        self.requests[kind] += 1
        self.outcomes[kind, outcome.status] += 1
        if outcome.cache_hit:
            self.cache_hits[kind] += 1
        if outcome.status == "ok":
            self.latencies[kind].append(seconds)
        if outcome.status == "error":
            self.errors[f"{kind}: {outcome.detail}"] += 1
            if len(self.examples) < 20:
                self.examples.append(f"{kind}: {outcome.detail}")


def error_code(response: httpx.Response) -> tuple[str, bool]:
    """The envelope's code, and whether the body is the OpenAI error envelope at all."""
    try:
        body = response.json()
        error = body["error"]
        return str(error.get("code")), isinstance(error.get("message"), str) and "type" in error
    except (ValueError, KeyError, TypeError, AttributeError):
        return "", False


def judge_status(response: httpx.Response) -> Outcome | None:
    """None for a 200; otherwise the outcome a non-200 answer counts as."""
    if response.status_code == 200:
        return None
    code, enveloped = error_code(response)
    if response.status_code == 503 and response.headers.get("retry-after") and code == "overloaded":
        return Outcome("overloaded", "503 overloaded")
    shape = "" if enveloped else " (no error envelope)"
    return Outcome("error", f"HTTP {response.status_code} {code}{shape}".strip())


def cache_hit(response: httpx.Response) -> bool:
    return response.headers.get("x-cache", "").upper() == "HIT"


# ---------------------------------------------------------------- checks of whole bodies


def check_chat(body: Any) -> str:
    if body.get("object") != "chat.completion" or not isinstance(body.get("choices"), list):
        return "chat: not a chat.completion"
    choice = body["choices"][0]
    if not isinstance(choice.get("message", {}).get("content"), str):
        return "chat: no message content"
    if choice.get("finish_reason") not in ("stop", "length"):
        return f"chat: finish_reason {choice.get('finish_reason')!r}"
    return check_usage(body)


def check_completion(body: Any) -> str:
    if body.get("object") != "text_completion" or not isinstance(body.get("choices"), list):
        return "completion: not a text_completion"
    choice = body["choices"][0]
    if not isinstance(choice.get("text"), str) or choice.get("finish_reason") not in ("stop", "length"):
        return "completion: bad choice"
    return check_usage(body)


def check_usage(body: Any) -> str:
    usage = body.get("usage") or {}
    if not all(isinstance(usage.get(k), int) for k in ("prompt_tokens", "completion_tokens", "total_tokens")):
        return "usage missing or not integers"
    return ""


def check_embeddings(body: Any, count: int, encoding: str) -> str:
    data = body.get("data")
    if body.get("object") != "list" or not isinstance(data, list) or len(data) != count:
        return f"embeddings: expected {count} items"
    for i, item in enumerate(data):
        if item.get("index") != i:
            return "embeddings: index out of order"
        vector = item.get("embedding")
        if encoding == "base64":
            if not isinstance(vector, str) or len(base64.b64decode(vector)) != 4 * EMBEDDING_DIM:
                return "embeddings: bad base64 vector"
        elif not (isinstance(vector, list) and len(vector) == EMBEDDING_DIM and all(math.isfinite(x) for x in vector)):
            return "embeddings: bad float vector"
    return ""


def check_rerank(body: Any, documents: int, top_n: int | None) -> str:
    results = body.get("results")
    want = min(top_n, documents) if top_n else documents
    if not isinstance(results, list) or len(results) != want:
        return f"rerank: expected {want} results"
    indices = [r.get("index") for r in results]
    scores = [r.get("relevance_score") for r in results]
    if len(set(indices)) != len(indices) or not all(isinstance(i, int) and 0 <= i < documents for i in indices):
        return "rerank: bad indices"
    finite = all(isinstance(s, int | float) and math.isfinite(s) for s in scores)
    if not finite or scores != sorted(scores, reverse=True):
        return "rerank: scores not finite and descending"
    return ""


# ---------------------------------------------------------------- requests


async def post_json(
    client: httpx.AsyncClient,
    path: str,
    payload: dict[str, Any],
    check: Callable[[Any], str],
    timeout: float | None = None,
) -> Outcome:
    """A non-streamed request; with `timeout` the client gives up after that long (an abandoned request)."""
    try:
        response = await client.post(path, json=payload, timeout=timeout or REQUEST_TIMEOUT)
    except httpx.TimeoutException as exc:
        if timeout:
            return Outcome("abandoned")
        return Outcome("error", f"hang ({type(exc).__name__} after {REQUEST_TIMEOUT:.0f} s)")
    except httpx.HTTPError as exc:
        return Outcome("error", f"transport {type(exc).__name__}")
    judged = judge_status(response)
    if judged:
        return judged
    try:
        problem = check(response.json())
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        problem = f"malformed body ({type(exc).__name__})"
    return Outcome("error", problem) if problem else Outcome("ok", cache_hit=cache_hit(response))


async def post_stream(
    client: httpx.AsyncClient,
    path: str,
    payload: dict[str, Any],
    chunk_object: str,
    abandon_after: int = 0,
    want_usage: bool = False,
) -> Outcome:
    """A streamed request, checked event by event; `abandon_after` > 0 drops it after that many text chunks."""
    texts = 0
    finished = done = usage_seen = False
    error_event: dict[str, Any] | None = None
    try:
        async with client.stream("POST", path, json={**payload, "stream": True}) as response:
            if response.status_code != 200:
                await response.aread()
                return judge_status(response) or Outcome("error", "status")
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                return Outcome("error", "stream: not text/event-stream")
            hit = cache_hit(response)
            async for line in response.aiter_lines():
                if not line or line.startswith(":"):
                    continue
                if not line.startswith("data: "):
                    return Outcome("error", f"stream: unexpected line {line[:40]!r}")
                data = line[6:]
                if done or error_event is not None:
                    return Outcome("error", "stream: data after [DONE] or an error event")
                if data == "[DONE]":
                    done = True
                    continue
                try:
                    chunk = json.loads(data)
                except ValueError:
                    return Outcome("error", "stream: a data line that is not JSON")
                if "error" in chunk:
                    error_event = chunk["error"]
                    continue
                if chunk.get("object") != chunk_object:
                    return Outcome("error", f"stream: chunk object {chunk.get('object')!r}")
                if chunk.get("usage"):
                    usage_seen = True
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    piece = choice.get("text") if chunk_object == "text_completion" else delta.get("content")
                    if piece:
                        texts += 1
                    if choice.get("finish_reason"):
                        finished = True
                if abandon_after and texts >= abandon_after:
                    return Outcome("abandoned")  # leaving the block closes the connection mid-stream
    except httpx.TimeoutException as exc:
        return Outcome("error", f"stream: hang ({type(exc).__name__})")
    except httpx.HTTPError as exc:
        return Outcome("error", f"stream: transport {type(exc).__name__}")
    if error_event is not None:
        code = str(error_event.get("code")) if isinstance(error_event, dict) else "?"
        return Outcome("overloaded" if code == "overloaded" else "error", f"stream: error event {code}")
    if not done:
        return Outcome("error", "stream: ended without [DONE] or an error event")
    if not finished:
        return Outcome("error", "stream: no finish_reason before [DONE]")
    if want_usage and not usage_seen:
        return Outcome("error", "stream: include_usage asked, no usage chunk")
    return Outcome("ok", cache_hit=hit)


SLUGS = {
    "chat": "chat",
    "chat-stream": "chat stream",
    "completion": "completion",
    "completion-stream": "completion stream",
    "cached": "temperature 0 (cache)",
    "stream-abandoned": "stream abandoned",
    "request-abandoned": "request abandoned (timeout)",
    "embeddings": "embeddings",
    "rerank": "rerank",
}


class Mix:
    """The request kinds, their weights, and the bodies they send."""

    def __init__(self, seed: int, only: list[str] | None = None) -> None:
        self.rng = random.Random(seed)
        self.counter = 0
        self.text_pool = [sentence(self.rng, 10_000 + i) for i in range(60)]
        self.cached_prompts = [f"Cached question {i}: name a colour." for i in range(6)]
        self.kinds: dict[str, tuple[int, Callable[[httpx.AsyncClient], Awaitable[Outcome]]]] = {
            "chat": (14, self.chat),
            "chat stream": (12, self.chat_stream),
            "completion": (8, self.completion),
            "completion stream": (6, self.completion_stream),
            "temperature 0 (cache)": (10, self.cached),
            "stream abandoned": (10, self.stream_abandoned),
            "request abandoned (timeout)": (6, self.request_abandoned),
            "embeddings": (17, self.embeddings),
            "rerank": (17, self.rerank),
        }
        if only:
            self.kinds = {SLUGS[slug]: self.kinds[SLUGS[slug]] for slug in only}

    def pick(self) -> tuple[str, Callable[[httpx.AsyncClient], Awaitable[Outcome]]]:
        names = list(self.kinds)
        name = self.rng.choices(names, [self.kinds[n][0] for n in names])[0]
        return name, self.kinds[name][1]

    def fresh(self) -> str:
        self.counter += 1
        return sentence(self.rng, self.counter)

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"{self.fresh()} Say something about it."}]

    async def chat(self, client: httpx.AsyncClient) -> Outcome:
        body = {"model": "light", "messages": self.messages(), "max_tokens": self.rng.randint(4, 16)}
        return await post_json(client, "/v1/chat/completions", body, check_chat)

    async def chat_stream(self, client: httpx.AsyncClient) -> Outcome:
        usage = self.rng.random() < 0.5
        body: dict[str, Any] = {"model": "light", "messages": self.messages(), "max_tokens": self.rng.randint(4, 16)}
        if usage:
            body["stream_options"] = {"include_usage": True}
        return await post_stream(client, "/v1/chat/completions", body, "chat.completion.chunk", want_usage=usage)

    async def completion(self, client: httpx.AsyncClient) -> Outcome:
        body = {"model": "light", "prompt": self.fresh(), "max_tokens": self.rng.randint(4, 16)}
        return await post_json(client, "/v1/completions", body, check_completion)

    async def completion_stream(self, client: httpx.AsyncClient) -> Outcome:
        body = {"model": "light", "prompt": self.fresh(), "max_tokens": self.rng.randint(4, 16)}
        return await post_stream(client, "/v1/completions", body, "text_completion")

    async def cached(self, client: httpx.AsyncClient) -> Outcome:
        prompt = self.rng.choice(self.cached_prompts)
        body = {"model": "light", "messages": [{"role": "user", "content": prompt}], "max_tokens": 8, "temperature": 0}
        if self.rng.random() < 0.5:
            return await post_stream(client, "/v1/chat/completions", body, "chat.completion.chunk")
        return await post_json(client, "/v1/chat/completions", body, check_chat)

    async def stream_abandoned(self, client: httpx.AsyncClient) -> Outcome:
        body = {"model": "light", "messages": self.messages(), "max_tokens": 64, "logit_bias": BAN_END}
        return await post_stream(
            client, "/v1/chat/completions", body, "chat.completion.chunk", abandon_after=self.rng.randint(1, 4)
        )

    async def request_abandoned(self, client: httpx.AsyncClient) -> Outcome:
        body = {"model": "light", "messages": self.messages(), "max_tokens": 64, "logit_bias": BAN_END}
        timeout = self.rng.uniform(0.2, 1.0)
        return await post_json(client, "/v1/chat/completions", body, check_chat, timeout=timeout)

    async def embeddings(self, client: httpx.AsyncClient) -> Outcome:
        size = self.rng.randint(1, 32)
        texts = [self.rng.choice(self.text_pool) if self.rng.random() < 0.3 else self.fresh() for _ in range(size)]
        encoding = "base64" if self.rng.random() < 0.2 else "float"
        body = {"model": "embedding", "input": texts, "encoding_format": encoding}
        return await post_json(client, "/v1/embeddings", body, lambda b: check_embeddings(b, size, encoding))

    async def rerank(self, client: httpx.AsyncClient) -> Outcome:
        documents = self.rng.sample(self.text_pool, self.rng.randint(3, 20))
        top_n = self.rng.choice([None, 1, 3, 5])
        body: dict[str, Any] = {"model": "reranker", "query": self.rng.choice(self.text_pool), "documents": documents}
        if top_n:
            body["top_n"] = top_n
        return await post_json(client, "/v1/rerank", body, lambda b: check_rerank(b, len(documents), top_n))
