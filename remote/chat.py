"""A chat tier served by a pool of OpenAI-compatible upstreams (vLLM, SGLang, llama-server, another llmservice).

`RemoteChat.start_turn` sends the request as the client sent it (`TurnRequest.wire`, with the
upstream's model name and `stream` forced on, so every answer arrives as events) and returns once the
upstream's first event is in: our response headers wait for it, so until then a fault (connect error,
5xx, 429, 408, no first event within `FIRST_BYTE_TIMEOUT`, a stream that ends or errors first) moves
the request to another upstream, at most `1 + RETRIES` attempts. After that, events pass through as
they arrive; an upstream that dies or stays silent longer than `STREAM_IDLE_TIMEOUT` ends each open
choice with one error event (the route then sends no `[DONE]`). A non-streamed request's answer is
read whole first (remote/whole.py), so such a failure still fails over. Any other upstream error
(400, 404, ...) is the upstream's verdict on the request and goes back to the client as it is.

Tools, `response_format`, `logprobs` and the upstream's sampling defaults are the upstream's business:
the turn says `native_tools`, so no local tool shaping happens, and streamed tool-call deltas are
assembled into one `ToolCallEvent` per call.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future

import httpx

from config import Settings, TierConfig
from core.errors import ModelUnavailable, Overloaded, RequestCancelled, ServiceError, ShuttingDown
from core.turns import Choice, JsonObject, JsonValue, Turn, TurnRequest
from remote import faults
from remote.health import HealthProber
from remote.pool import Attempt, Pool, Upstream, UpstreamUnavailable, describe
from remote.stream import Exchange, RemoteChoice
from remote.whole import Tries, WholeAnswer

log = logging.getLogger("llmservice.remote")

STOPPED = "The request was stopped by the server (tier unloaded or shutting down)"
PATHS = {"chat": "/chat/completions", "completion": "/completions"}
# httpx writes a request's headers and body separately: without TCP_NODELAY the second write waits for
# the upstream's delayed ACK (up to 40 ms a request).
NO_DELAY = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
LOCAL_ONLY_FIELDS = frozenset({"echo", "stream_options"})  # our formatter echoes; we always ask for usage


def upstream_body(request: TurnRequest, model: str | None) -> JsonObject:
    """The client's request for the upstream: nulls dropped, its model name, streamed with usage."""
    body = {k: v for k, v in _without_nulls(request.wire).items() if k not in LOCAL_ONLY_FIELDS}
    if model:
        body["model"] = model
    body["stream"] = True
    body["stream_options"] = {"include_usage": True}
    return body


def _without_nulls(value: JsonObject) -> JsonObject:
    return {k: _clean(v) for k, v in value.items() if v is not None}


def _clean(value: JsonValue) -> JsonValue:
    if isinstance(value, dict):
        return _without_nulls(value)
    if isinstance(value, list):
        return [_clean(item) for item in value]
    return value


def session_key(request: TurnRequest) -> str | None:
    """What keeps a conversation on one upstream under the "session" policy: the body's `user`."""
    user = request.wire.get("user")
    return user if isinstance(user, str) and user else None


def client_for(config: TierConfig) -> httpx.AsyncClient:
    """One connection pool per tier. Timeouts are ours (first byte, idle), so httpx only bounds the
    connect; proxies from the environment are not used for upstreams."""
    transport = httpx.AsyncHTTPTransport(
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=256), socket_options=NO_DELAY
    )
    timeout = httpx.Timeout(None, connect=min(10.0, config.first_byte_timeout))
    return httpx.AsyncClient(timeout=timeout, transport=transport, trust_env=False)


class RemoteChat:
    """A `ChatBackend` over a pool of upstreams: no owner thread, no tokens here."""

    def __init__(
        self,
        config: TierConfig,
        clock: Callable[[], float] = time.monotonic,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.config = config
        self.pool = Pool.for_tier(config, clock)
        self.client = client or client_for(config)
        auth = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.headers = {"Content-Type": "application/json", **auth}
        self._urls: dict[tuple[str, str], httpx.URL] = {}  # parsed once: parsing is a good part of httpx's cost
        self.ready: Future[None] = Future()
        self.ready.set_result(None)  # nothing to load: each request finds a live upstream itself
        self.model: str | None = config.upstream_model or None
        self._model_known = bool(config.upstream_model)
        self._discovery = asyncio.Lock()
        self._exchanges: set[Exchange] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.closing = False
        self.waiting = 0  # requests waiting for an upstream under its in-flight cap
        self._room = asyncio.Event()  # set when an attempt settles: a capped upstream may have room
        self.pool.on_release(self._released)
        self.prober = start_prober(self.pool, config, self.headers, lambda: self.model)

    async def start_turn(self, request: TurnRequest) -> Turn:
        if self.closing:
            raise ShuttingDown(f"The {self.config.name} tier is shutting down", retry_after=5)
        self._loop = asyncio.get_running_loop()
        body = json.dumps(upstream_body(request, await self._model_name()), ensure_ascii=False).encode()
        tries = Tries(1 + self.config.retries)
        exchange = await self._open(PATHS[request.kind], body, request, tries)
        label = exchange.attempt.upstream.label
        if not request.stream:  # nothing reaches our client before the whole answer: a fault until then fails over
            whole = WholeAnswer(exchange, lambda: self._open(PATHS[request.kind], body, request, tries))
            turn = Turn(whole.choices(), exchange.prompt_tokens, native_tools=True, upstream=label)
            whole.turn = turn
            turn.closers.append(whole.aclose)
        else:
            choices: list[Choice] = [RemoteChoice(exchange, state) for state in exchange.states]
            turn = Turn(choices, exchange.prompt_tokens, native_tools=True, upstream=label)
            turn.closers.append(exchange.aclose)
        exchange.turn = turn
        return turn

    async def _open(self, path: str, body: bytes, request: TurnRequest, tries: Tries) -> Exchange:
        """The first attempt that yields an event; faults before it move on to another upstream (each
        upstream once per request, `tries` attempts in all, shared with a whole answer's retries)."""
        tried, errors = tries.tried, tries.errors
        while tries.left > 0:
            tries.left -= 1
            if self.closing:
                raise RequestCancelled(STOPPED)
            attempt = self.pool.pick(tried, session_key(request))
            if attempt is None and self.pool.saturated(tried):
                attempt = await self._wait_for_room(tried, session_key(request))
            if attempt is None:
                break
            tried.append(attempt.upstream)
            exchange = Exchange(self.config, self.client, self.headers, attempt, request, self._exchanges.discard)
            try:
                await exchange.start(self._url(attempt.upstream, path), body)
            except faults.UpstreamFault as fault:
                attempt.finish("fault", fault.message, fault.retry_after)
                errors.append(f"{attempt.upstream.label}: {fault.message}")
                log.warning("tier %s: upstream %s failed: %s", self.config.name, attempt.upstream.label, fault)
                continue
            except ServiceError:
                attempt.finish("ok")  # it answered: the request, not the upstream, is at fault
                raise
            except BaseException:
                attempt.finish("neutral")  # our client left while we waited
                raise
            self._exchanges.add(exchange)
            return exchange
        raise UpstreamUnavailable(
            f"No upstream of the {self.config.name} tier could answer: {describe(errors)}",
            retry_after=self.pool.retry_after(),
        )

    def _released(self) -> None:
        """An attempt settled (on the loop) or a probe found an upstream healthy (on its thread)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._room.set()
        else:
            loop.call_soon_threadsafe(self._room.set)

    async def _wait_for_room(self, tried: list[Upstream], key: str | None) -> Attempt | None:
        """Every upstream left is at `UPSTREAM_MAX_IN_FLIGHT`: wait for room as a local tier's queue
        does, `MAX_QUEUE` requests at most, each `QUEUE_TIMEOUT` seconds at most; else 503."""
        config = self.config
        if self.waiting >= config.max_queue:
            raise Overloaded(
                f"The {config.name} tier's upstreams are all at their in-flight cap and "
                f"{config.max_queue} requests are waiting already",
                retry_after=max(1, int(config.queue_timeout) or 5),
            )
        self.waiting += 1
        try:
            async with asyncio.timeout(config.queue_timeout):
                while True:
                    self._room.clear()
                    attempt = self.pool.pick(tried, key)
                    if attempt is not None or not self.pool.saturated(tried):
                        return attempt
                    await self._room.wait()
        except TimeoutError:
            raise Overloaded(
                f"No upstream of the {config.name} tier had room within {config.queue_timeout:g}s",
                retry_after=max(1, int(config.queue_timeout) or 5),
            ) from None
        finally:
            self.waiting -= 1

    def _url(self, upstream: Upstream, path: str) -> httpx.URL:
        url = self._urls.get((upstream.url, path))
        if url is None:
            url = self._urls[upstream.url, path] = httpx.URL(upstream.url + path)
        return url

    async def _model_name(self) -> str | None:
        """The upstream's model name: configured, else the single id its /models lists."""
        if not self._model_known:
            async with self._discovery:
                if not self._model_known:
                    await self._discover()
        return self.model

    async def _discover(self) -> None:
        for upstream in self.pool.upstreams:
            try:
                response = await self.client.get(
                    f"{upstream.url}/models", headers=self.headers, timeout=self.config.first_byte_timeout
                )
            except httpx.HTTPError:
                continue  # down: ask the next one (or again on the next request)
            if faults.is_fault(response.status_code):
                continue  # loading or overloaded: the same
            ids = _model_ids(response) if response.status_code == 200 else []
            if len(ids) > 1:
                raise ModelUnavailable(
                    f"The {self.config.name} tier's upstream serves several models ({', '.join(ids[:8])}): "
                    f"set {self.config.name.upper()}_UPSTREAM_MODEL to one of them"
                )
            self.model = ids[0] if ids else None  # no listing: the client's name goes up as it came
            self._model_known = True
            return

    def status(self) -> Mapping[str, JsonValue]:
        return {
            "active": self.pool.in_flight,
            "queued": self.waiting,
            "upstream_model": self.model,
            "pool": "degraded" if self.pool.degraded() else "ok",
            "upstreams": self.pool.status(),
        }

    def shutdown(self, timeout: float = 10.0) -> None:
        """Called off the event loop (the manager's unload): end every open stream, close the client."""
        self.closing = True
        if self.prober is not None:
            self.prober.stop()
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:  # on the loop itself: it cannot wait for its own work
            loop.create_task(self._close())
            return
        try:
            asyncio.run_coroutine_threadsafe(self._close(), loop).result(timeout)
        except (TimeoutError, RuntimeError):
            log.warning("tier %s: upstream connections were not closed in time", self.config.name)

    async def _close(self) -> None:
        for exchange in list(self._exchanges):
            await exchange.stop(RequestCancelled(STOPPED))
        await self.client.aclose()


def start_prober(
    pool: Pool, config: TierConfig, headers: Mapping[str, str], model: Callable[[], str | None]
) -> HealthProber | None:
    """The pool's active health probes, when `UPSTREAM_HEALTH_INTERVAL` asks for them."""
    if config.upstream_health_interval <= 0:
        return None
    auth = {k: v for k, v in headers.items() if k == "Authorization"}
    prober = HealthProber(pool, config.upstream_health_interval, config.upstream_health_path, auth, model, config.name)
    return prober.start()


def _model_ids(response: httpx.Response) -> list[str]:
    try:
        data = response.json().get("data")
    except (ValueError, AttributeError):
        return []
    return [str(m.get("id")) for m in data if isinstance(m, dict)] if isinstance(data, list) else []


def load_remote_chat(config: TierConfig, settings: Settings) -> RemoteChat:
    """The "turns:remote" factory: called on the event loop; nothing to load."""
    return RemoteChat(config)
