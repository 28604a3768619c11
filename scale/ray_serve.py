"""llmservice on Ray Serve: N replicas of the service's own app behind Serve's HTTP proxy.

    serve run scale.ray_serve:build replicas=2 env_file=.env
    serve run scale.ray_serve:build replicas=auto max_replicas=4 target_ongoing_requests=8

(README "Replicas: Redis and Ray Serve" has the whole recipe.) Each replica builds the whole service
with `create_app` (when Serve starts it, not at import), so it has its own tiers, owner threads and
memory cache. Its settings are those of `python server.py`: the `.env` file read where `serve run`
started (passed to the replicas), under the replica's real environment. Replicas share only Redis
(CACHE_REDIS_URL, RATE_LIMIT_REDIS_URL, SESSIONS_REDIS_URL). Serve's health check reads the same
state as /health, scale-down drains for DRAIN_TIMEOUT, and `replicas=auto` scales on ongoing requests.
Every response names its replica in `X-Replica`. Ray is optional: nothing else imports this module.

Ray 2.60's replicas bind their inter-deployment gRPC server to `[::]:0`, every interface, whatever
address the node was given; `_bind_to_node_address` makes them bind to the node's own address (with
`ray start --node-ip-address=127.0.0.1` nothing listens beyond loopback; tests/test_ray_serve.py checks).
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import ray
from dotenv import dotenv_values
from fastapi import FastAPI
from ray import serve
from ray.serve.deployment import Application
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from config import load_settings
from core.protocols import Factory
from server import create_app

log = logging.getLogger("llmservice.ray_serve")

# Serve's default (5 per replica) would queue streams in the proxy; our own admission answers 503.
MAX_ONGOING_REQUESTS = 256
TARGET_ONGOING_REQUESTS = 8  # replicas=auto: add a replica past this many requests in flight each


def load_factories(spec: str) -> Mapping[str, Factory]:
    """`module:function` returning the model factories (tests name their fakes); "" = the real ones."""
    module, _, name = spec.partition(":")
    factories: Mapping[str, Factory] = getattr(importlib.import_module(module), name)()
    return factories


def _bind_to_node_address() -> None:
    """In a replica, before Serve starts its inter-deployment gRPC server: bind it to the node's
    address instead of `[::]` (other replicas reach it at that address anyway)."""
    try:
        from ray.serve._private import replica as replica_module
    except ImportError:  # a Ray without that module: tests/test_ray_serve.py tells whether it is still needed
        return
    original: Callable[[object, str], int] | None = getattr(replica_module, "add_port_to_grpc_server", None)
    if original is None or getattr(original, "node_address_only", False):
        return
    node = ray.util.get_node_ip_address()
    host = f"[{node}]" if ":" in node else node

    def bind(server: object, address: str) -> int:
        if address.startswith("[::]:"):
            address = f"{host}:{address.removeprefix('[::]:')}"
        return original(server, address)

    bind.node_address_only = True  # type: ignore[attr-defined]
    replica_module.add_port_to_grpc_server = bind


class ReplicaHeader:
    """Adds `X-Replica: <id>` to every response, so a client (or a test) sees which replica answered."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app = app
        self.header = (b"x-replica", replica.encode("latin-1", "replace"))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_named(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), self.header]}
            await send(message)

        await self.app(scope, receive, send_named)


@serve.ingress()
class LLMService:
    """One replica: the service's app, built by Serve on the replica (`__serve_build_asgi_app__`)."""

    def __init__(self, env: Mapping[str, str] | None = None, factories: str = "") -> None:
        _bind_to_node_address()
        self.env = dict(env or {})  # what .env says; the replica's real environment wins, as in server.main
        self.factories = factories
        self.built: FastAPI | None = None

    def __serve_build_asgi_app__(self) -> FastAPI:
        settings = load_settings({**self.env, **os.environ})
        app = create_app(settings, load_factories(self.factories) if self.factories else None)
        replica = serve.get_replica_context().replica_id.unique_id
        app.add_middleware(ReplicaHeader, replica=replica)  # outermost: refusals carry it too
        log.info("replica %s serving tiers %s", replica, ", ".join(settings.tiers))
        self.built = app
        return app

    async def check_health(self) -> None:
        """Serve's health check: the state /health reports (a failed tier is degraded, not dead)."""
        if self.built is None:
            raise RuntimeError("the app is not built yet")
        state = self.built.state.llm
        for name in state.manager.tiers:
            state.manager.status(name)


def deployment(
    replicas: int | None = 2,
    *,
    env: Mapping[str, str] | None = None,
    factories: str = "",
    min_replicas: int = 1,
    max_replicas: int = 4,
    target_ongoing_requests: float = TARGET_ONGOING_REQUESTS,
    upscale_delay_s: float | None = None,
    downscale_delay_s: float | None = None,
    num_cpus: float = 1.0,
) -> Application:
    """The bound application: `replicas` copies, or autoscaling between min and max when None (delays
    left out keep Serve's defaults). `env` holds settings as a .env file would (the replicas' real
    environment wins)."""
    settings = load_settings({**(env or {}), **os.environ})  # checked here: a bad value fails `serve run` at once
    options: dict[str, Any] = {
        "name": "llmservice",
        "max_ongoing_requests": MAX_ONGOING_REQUESTS,
        "graceful_shutdown_timeout_s": max(1.0, settings.drain_timeout),
        "ray_actor_options": {"num_cpus": num_cpus},
    }
    if replicas is None:
        autoscaling: dict[str, float] = {
            "min_replicas": min_replicas,
            "max_replicas": max_replicas,
            "target_ongoing_requests": target_ongoing_requests,
        }
        delays = {"upscale_delay_s": upscale_delay_s, "downscale_delay_s": downscale_delay_s}
        options["autoscaling_config"] = autoscaling | {k: v for k, v in delays.items() if v is not None}
    else:
        options["num_replicas"] = replicas
    return serve.deployment(LLMService).options(**options).bind(dict(env or {}), factories)


def build(args: dict[str, str]) -> Application:
    """`serve run scale.ray_serve:build replicas=2 env_file=.env` (or `replicas=auto min_replicas=1
    max_replicas=4 target_ongoing_requests=8`, optionally `upscale_delay_s` and `downscale_delay_s`;
    `num_cpus` per replica)."""
    replicas = args.get("replicas", "2")
    env_file = args.get("env_file", ".env")
    env = {k: v for k, v in dotenv_values(env_file).items() if v is not None} if os.path.isfile(env_file) else {}
    delays = {name: float(args[name]) for name in ("upscale_delay_s", "downscale_delay_s") if name in args}
    return deployment(
        None if replicas == "auto" else int(replicas),
        env=env,
        min_replicas=int(args.get("min_replicas", "1")),
        max_replicas=int(args.get("max_replicas", "4")),
        target_ongoing_requests=float(args.get("target_ongoing_requests", str(TARGET_ONGOING_REQUESTS))),
        num_cpus=float(args.get("num_cpus", "1")),
        **delays,
    )
