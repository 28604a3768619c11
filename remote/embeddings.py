"""Embedding and rerank tiers served by a pool of upstreams (TEI, Infinity, vLLM, another llmservice).

`RemoteEmbedder` and `RemoteReranker` implement the `Embedder` and `Reranker` protocols over HTTP, so
the routes (api/rag.py), the per-text cache and the usage accounting stay as they are for local
tiers. `RemoteWorker` stands where a local tier's micro-batching owner thread stands, with the same
surface (`ready`, `model`, `submit_batch`, `status`, `shutdown`), but runs each request at once on a
small thread pool: batching is the upstream's business, and several requests may be in flight over
the pool's upstreams at the same time.

Wires (`{TIER}_UPSTREAM_API`): "openai" sends `/embeddings` (OpenAI) and `/rerank` (Cohere-style
`query` + `documents`, answered with `relevance_score`s); "tei" sends TEI's `/embed` and `/rerank`
(`query` + `texts`, raw scores). A request fails over to another upstream exactly as a chat request
does before its first byte: only on faults, and a 4xx is passed through.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import httpx

from config import Settings, TierConfig
from core.errors import InvalidRequest, Overloaded
from core.protocols import EmbeddingResult
from core.turns import JsonObject, JsonValue
from remote import faults
from remote.chat import NO_DELAY, start_prober
from remote.pool import Attempt, Pool, Upstream, UpstreamUnavailable, describe

NO_LIMIT = 1 << 31  # the upstream knows its model's limits; `truncate` is passed on to it
_EPSILON = 1e-7
T = TypeVar("T")


def estimate_tokens(text: str) -> int:
    """About four characters a token: usage for upstreams that do not report it."""
    return max(1, round(len(text) / 4))


class Upstreams:
    """Blocking JSON calls over a pool, with failover on faults (used from the worker's threads)."""

    def __init__(self, config: TierConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.pool = Pool.for_tier(config, clock)
        self.headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        transport = httpx.HTTPTransport(
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64), socket_options=NO_DELAY
        )
        timeout = httpx.Timeout(config.first_byte_timeout, connect=min(10.0, config.first_byte_timeout))
        self.client = httpx.Client(timeout=timeout, transport=transport, trust_env=False)
        self.model: str | None = config.upstream_model or None
        self._model_known = bool(config.upstream_model) or config.upstream_api != "openai"
        self.prober = start_prober(self.pool, config, self.headers, lambda: self.model)
        self._room = threading.Condition()  # notified when an attempt settles (a capped upstream has room)
        self.pool.on_release(self._released)

    def _released(self) -> None:
        with self._room:
            self._room.notify_all()

    def _wait_for_room(self, tried: list[Upstream]) -> Attempt | None:
        """Every upstream left is at its in-flight cap: wait up to `QUEUE_TIMEOUT` for one to free up."""
        deadline = time.monotonic() + self.config.queue_timeout
        with self._room:
            while True:
                attempt = self.pool.pick(tried)
                if attempt is not None or not self.pool.saturated(tried):
                    return attempt
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Overloaded(
                        f"No upstream of the {self.config.name} tier had room within {self.config.queue_timeout:g}s",
                        retry_after=max(1, int(self.config.queue_timeout) or 5),
                    )
                self._room.wait(left)

    def post(self, path: str, body: JsonObject) -> JsonValue:
        return self.send(lambda url: self.client.post(url + path, json=body, headers=self.headers))

    def send(self, request: Callable[[str], httpx.Response]) -> JsonValue:
        """`request(base_url)` on upstreams of the pool until one answers; failover on upstream faults
        only, an upstream's refusal (4xx) passed through."""
        tried: list[Upstream] = []
        errors: list[str] = []
        for _ in range(1 + self.config.retries):
            attempt = self.pool.pick(tried)
            if attempt is None and self.pool.saturated(tried):
                attempt = self._wait_for_room(tried)
            if attempt is None:
                break
            tried.append(attempt.upstream)
            try:
                response = request(attempt.upstream.url)
                answer = response.json() if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError) as exc:
                attempt.finish("fault", f"{type(exc).__name__}: {exc}"[:200])
                errors.append(f"{attempt.upstream.label}: {type(exc).__name__}")
                continue
            except BaseException:
                attempt.finish("neutral")
                raise
            if response.status_code == 200:
                attempt.finish("ok")
                return answer  # type: ignore[no-any-return]
            if faults.is_fault(response.status_code):
                text = faults.fault_text(response.status_code, response.content)
                attempt.finish("fault", text, faults.retry_after_seconds(response.headers.get("retry-after")))
                errors.append(f"{attempt.upstream.label}: {text}")
                continue
            attempt.finish("ok")
            raise faults.refusal(response.status_code, response.content)
        raise UpstreamUnavailable(
            f"No upstream of the {self.config.name} tier could answer: {describe(errors)}",
            retry_after=self.pool.retry_after(),
        )

    def model_name(self) -> str | None:
        """The configured model, else the single id an upstream's /models lists (asked once it answers)."""
        if self._model_known:
            return self.model
        for upstream in self.pool.upstreams:
            try:
                response = self.client.get(f"{upstream.url}/models", headers=self.headers)
                listed = response.json().get("data") if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError, AttributeError):
                continue
            ids = [str(m.get("id")) for m in listed if isinstance(m, dict)] if isinstance(listed, list) else []
            if len(ids) > 1:
                raise UpstreamUnavailable(
                    f"The {self.config.name} tier's upstream serves several models ({', '.join(ids[:8])}): "
                    f"set {self.config.name.upper()}_UPSTREAM_MODEL to one of them",
                    retry_after=60,
                )
            self.model, self._model_known = (ids[0] if ids else None), True
            break
        return self.model

    def close(self) -> None:
        if self.prober is not None:
            self.prober.stop()
        self.client.close()


# ---------------------------------------------------------------- the protocols over HTTP


class RemoteEmbedder:
    """An `Embedder` whose model runs upstream: dense vectors only."""

    max_input_tokens = NO_LIMIT
    supported_types = ("dense",)

    def __init__(self, upstreams: Upstreams) -> None:
        self.upstreams = upstreams
        self.dimension = NO_LIMIT  # the upstream's, once it has answered (the route checks each row too)

    def embed(self, texts: Sequence[str], types: Sequence[str], truncate: bool) -> EmbeddingResult:
        for kind in types:
            if kind not in self.supported_types:
                raise InvalidRequest(f"A remote embedding tier cannot produce {kind!r} embeddings", param="input")
        if self.upstreams.config.upstream_api == "tei":
            answer = self.upstreams.post("/embed", {"inputs": list(texts), "truncate": truncate, "normalize": False})
            vectors, total = _tei_vectors(answer, len(texts)), None
        else:
            body: JsonObject = {"input": list(texts), "encoding_format": "float"}
            model = self.upstreams.model_name()
            if model:
                body["model"] = model
            vectors, total = _openai_vectors(self.upstreams.post("/embeddings", body), len(texts))
        if vectors:
            self.dimension = len(vectors[0])
        return EmbeddingResult(dense=vectors, token_counts=_shares(texts, total))

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [estimate_tokens(text) for text in texts]

    def close(self) -> None:
        self.upstreams.close()


class RemoteReranker:
    """A `Reranker` whose model runs upstream. Scores go back to the route as logits, so the sigmoid it
    applies gives back the upstream's relevance (Cohere-style answers are probabilities already)."""

    scores_are_logits = True
    max_input_tokens = NO_LIMIT

    def __init__(self, upstreams: Upstreams) -> None:
        self.upstreams = upstreams

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        scores: list[float] = [0.0] * len(pairs)
        by_query: dict[str, list[int]] = {}
        for position, (query, _) in enumerate(pairs):
            by_query.setdefault(query, []).append(position)
        for query, positions in by_query.items():  # one upstream call per query
            documents = [pairs[p][1] for p in positions]
            for offset, value in enumerate(self._scores(query, documents)):
                scores[positions[offset]] = value
        return scores

    def _scores(self, query: str, documents: list[str]) -> list[float]:
        if self.upstreams.config.upstream_api == "tei":
            # The route has no length limit to check for a remote model, so TEI truncates rather than refuses.
            body: JsonObject = {"query": query, "texts": documents, "raw_scores": True, "truncate": True}
            return _indexed(self.upstreams.post("/rerank", body), len(documents), "score")
        body = {"query": query, "documents": documents, "top_n": len(documents), "return_documents": False}
        model = self.upstreams.model_name()
        if model:
            body["model"] = model
        answer = self.upstreams.post("/rerank", body)
        results = answer.get("results") if isinstance(answer, dict) else None
        return [_logit(p) for p in _indexed(results, len(documents), "relevance_score")]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [estimate_tokens(text) for text in texts]

    def close(self) -> None:
        self.upstreams.close()


def _openai_vectors(answer: JsonValue, count: int) -> tuple[list[list[float]], int | None]:
    data = answer.get("data") if isinstance(answer, dict) else None
    rows = sorted((d for d in data if isinstance(d, dict)), key=lambda d: _int(d.get("index"))) if data else []
    vectors = [[float(x) for x in row["embedding"]] for row in rows if isinstance(row.get("embedding"), list)]
    if len(vectors) != count:
        raise UpstreamUnavailable(f"The upstream sent {len(vectors)} embeddings for {count} inputs", retry_after=1)
    usage = answer.get("usage") if isinstance(answer, dict) else None
    total = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    return vectors, total if isinstance(total, int) else None


def _tei_vectors(answer: JsonValue, count: int) -> list[list[float]]:
    if not isinstance(answer, list) or len(answer) != count or not all(isinstance(r, list) for r in answer):
        raise UpstreamUnavailable(f"The upstream's /embed answer does not hold {count} vectors", retry_after=1)
    return [[float(x) for x in row] for row in answer]  # type: ignore[union-attr, arg-type]


def _indexed(results: JsonValue, count: int, key: str) -> list[float]:
    """Scores in document order from `[{index, <key>}, ...]` (ranked lists come sorted by score)."""
    scores: dict[int, float] = {}
    for item in results if isinstance(results, list) else []:
        if isinstance(item, dict) and isinstance(item.get(key), int | float):
            scores[_int(item.get("index"))] = float(item[key])  # type: ignore[arg-type]
    if sorted(scores) != list(range(count)):
        raise UpstreamUnavailable(f"The upstream's rerank answer does not score all {count} documents", retry_after=1)
    return [scores[i] for i in range(count)]


def _logit(probability: float) -> float:
    p = min(1.0 - _EPSILON, max(_EPSILON, probability))
    return math.log(p / (1.0 - p))


def _shares(texts: Sequence[str], total: int | None) -> list[int]:
    """Each text's share of the upstream's token count (by length), else an estimate."""
    if total is None:
        return [estimate_tokens(text) for text in texts]
    lengths = [max(1, len(text)) for text in texts]
    shares = [total * length // sum(lengths) for length in lengths]
    shares[-1] += total - sum(shares)
    return shares


def _int(value: JsonValue | None) -> int:
    return int(value) if isinstance(value, int | float) else -1


# ---------------------------------------------------------------- the worker


class RemoteWorker:
    """Runs each request on a thread of its own pool (`PARALLEL` per upstream), `MAX_QUEUE` waiting at most."""

    def __init__(self, model: RemoteEmbedder | RemoteReranker, upstreams: Upstreams) -> None:
        config = upstreams.config
        self.model = model
        self.upstreams = upstreams
        self.name = config.name
        self.max_queue = config.max_queue
        self.queue_timeout = config.queue_timeout
        self.clock = upstreams.pool.clock
        self.workers = config.parallel * len(upstreams.pool.upstreams)
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix=f"remote-{config.name}")
        self._lock = threading.Lock()
        self.waiting = 0
        self.running = 0
        self.ready: Future[None] = Future()
        self.ready.set_result(None)

    def submit_batch(
        self, key: Hashable, items: Sequence[T], run: Callable[[object, Sequence[T]], Sequence[object]]
    ) -> Future[list[object]]:
        """Run `run(model, items)` on a thread now (no merging: the upstream batches)."""
        return self._enqueue(lambda: list(run(self.model, items)))

    async def gather(
        self, key: Hashable, items: Sequence[T], run: Callable[[object, Sequence[T]], Sequence[object]]
    ) -> list[object]:
        """`submit_batch`, awaited (the seam BatchWorker.gather offers the routes)."""
        return await asyncio.wrap_future(self.submit_batch(key, items, run))

    def submit(self, fn: Callable[[object], object]) -> Future[object]:
        return self._enqueue(lambda: fn(self.model))

    def _enqueue(self, call: Callable[[], T]) -> Future[T]:
        with self._lock:
            if self.waiting + self.running >= self.workers + self.max_queue:
                raise Overloaded(f"The {self.name} tier has {self.waiting} requests waiting (limit {self.max_queue})")
            self.waiting += 1
        future = self._executor.submit(self._run, call, self.clock())
        future.add_done_callback(self._forget_if_cancelled)
        return future

    def _forget_if_cancelled(self, future: Future[T]) -> None:
        if future.cancelled():  # its client left before a thread took it: it never ran
            with self._lock:
                self.waiting -= 1

    def _run(self, call: Callable[[], T], enqueued: float) -> T:
        with self._lock:
            self.waiting -= 1
            self.running += 1
        try:
            if self.clock() - enqueued > self.queue_timeout:
                raise Overloaded(f"Waited over {self.queue_timeout:g}s for the {self.name} tier")
            return call()
        finally:
            with self._lock:
                self.running -= 1

    @property
    def pool(self) -> Pool:
        return self.upstreams.pool

    def status(self) -> Mapping[str, JsonValue]:
        pool = self.upstreams.pool
        state = "degraded" if pool.degraded() else "ok"
        return {"active": self.running, "queued": self.waiting, "pool": state, "upstreams": pool.status()}

    def shutdown(self, timeout: float = 10.0) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.model.close()


_MODELS: dict[str, Callable[[Upstreams], RemoteEmbedder | RemoteReranker]] = {
    "embedding": RemoteEmbedder,
    "rerank": RemoteReranker,
}


def load_remote_worker(config: TierConfig, settings: Settings) -> RemoteWorker:
    """The "workers:remote" factory: an embedding or rerank tier over its upstream pool; nothing to load."""
    upstreams = Upstreams(config)
    return RemoteWorker(_MODELS[config.kind](upstreams), upstreams)
