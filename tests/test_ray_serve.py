"""The service on Ray Serve (scale/ray_serve.py): a local Ray with two replicas over fake models, reached
through Serve's HTTP proxy on 127.0.0.1, sharing one Redis cache; every Ray socket on loopback; nothing
left running after shutdown.

One Ray for the whole module (it takes seconds to start and ~1.5 GB while it runs), shut down by the
last test. Ray comes from requirements-dev.txt; without it the module skips, naming the file.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.conftest import FAKE_ENV
from tests.redis_server import BINARY, RedisServer, free_port
from tests.waiting import DEADLINE_S, wait_for

REPO = Path(__file__).resolve().parent.parent
# Read by Ray when it is imported, not by ray.init: without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 first,
# Ray replaces _node_ip_address="127.0.0.1" with the machine's routable address.
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
os.environ.update(RAY_ENV)

ray = pytest.importorskip("ray", reason="ray[serve] is not installed (pip install -r requirements-dev.txt)")
psutil = pytest.importorskip("psutil", reason="psutil comes with ray")

CHAT = {"model": "light", "messages": [{"role": "user", "content": "hello replicas"}]}


@dataclass
class Cluster:
    url: str
    redis: RedisServer | None
    before: set[int]  # children of this process before Ray started (other tests' servers): not Ray's
    pids: set[int] = field(default_factory=set)
    down: bool = False

    def processes(self) -> list[psutil.Process]:
        """This process and everything Ray started under it (GCS, raylet, workers, replicas, proxy)."""
        me = psutil.Process()
        found = [me, *(p for p in me.children(recursive=True) if p.pid not in self.before)]
        self.pids |= {p.pid for p in found[1:]}
        return found

    def shutdown(self) -> None:
        if self.down:
            return
        self.down = True
        from ray import serve

        self.processes()
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from ray import serve
    from ray._private import ray_constants

    from scale.ray_serve import deployment

    assert not ray_constants.ENABLE_RAY_CLUSTER, "ray was imported before RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 was set"
    redis = RedisServer(tmp_path_factory.mktemp("ray-redis")) if BINARY else None
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    # A short temporary folder of its own: Ray's socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    try:
        info = ray.init(
            _node_ip_address="127.0.0.1",
            include_dashboard=False,
            num_cpus=2,
            object_store_memory=100 * 1024 * 1024,
            _temp_dir=temp_dir,
            runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}},  # replicas import scale/ and tests/
            logging_level=logging.WARNING,
            log_to_driver=False,
        )
    except Exception as exc:  # noqa: BLE001 - any failure to start is this test's failure, said plainly
        pytest.fail(f"a local Ray could not start ({type(exc).__name__}: {exc}); its logs are in {temp_dir}")
    assert info.address_info["node_ip_address"] == "127.0.0.1", info.address_info
    port = free_port()
    cluster = Cluster(f"http://127.0.0.1:{port}", redis, before)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        env = {**FAKE_ENV, "EMBEDDING_MODEL_PATH": "/models/fake-embedder"}
        if redis is not None:
            env |= {"CACHE_REDIS_URL": redis.url, "CACHE_MAX_SIZE": "0"}  # every lookup goes to Redis
        app = deployment(2, env=env, factories="tests.ray_fakes:factories", num_cpus=0.5)
        serve.run(app, name="llmservice", route_prefix="/")
        wait_for(lambda: _answers(cluster.url), "Serve's proxy answering /health")
        yield cluster
    finally:
        cluster.shutdown()
        if redis is not None:
            redis.kill()


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def replica_of(response: httpx.Response) -> str:
    replica = response.headers.get("x-replica")
    assert replica, f"no X-Replica header: {dict(response.headers)}"
    return replica


# ---------------------------------------------------------------- serving


def test_two_replicas_answer_through_the_proxy(cluster: Cluster) -> None:
    replicas = {replica_of(httpx.get(f"{cluster.url}/health", timeout=30)) for _ in range(40)}
    assert len(replicas) == 2, replicas
    chat = httpx.post(f"{cluster.url}/v1/chat/completions", json=CHAT, timeout=DEADLINE_S)
    assert chat.status_code == 200, chat.text
    assert chat.json()["choices"][0]["message"]["content"] == "echo: hello replicas"
    embedded = httpx.post(
        f"{cluster.url}/v1/embeddings", json={"model": "embedding", "input": ["alpha", "beta"]}, timeout=DEADLINE_S
    )
    assert embedded.status_code == 200, embedded.text
    assert [len(item["embedding"]) for item in embedded.json()["data"]] == [4, 4]
    missing = httpx.post(f"{cluster.url}/v1/chat/completions", json={**CHAT, "model": "nope"}, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_a_stream_passes_through_the_proxy_as_it_is_made(cluster: Cluster, tmp_path: Path) -> None:
    gate = tmp_path / "release"
    body = {"model": "light", "stream": True, "messages": [{"role": "user", "content": f"HOLD:{gate} go"}]}
    with httpx.stream("POST", f"{cluster.url}/v1/chat/completions", json=body, timeout=DEADLINE_S) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = (line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: "))
        first = json.loads(next(events))  # sent while the model is held: a buffering proxy would time out here
        assert first["choices"][0]["delta"]["role"] == "assistant"
        gate.touch()
        rest = list(events)
    assert rest[-1] == "[DONE]"
    text = "".join(json.loads(e)["choices"][0]["delta"].get("content") or "" for e in rest[:-1] if "choices" in e)
    assert text and f"echo: HOLD:{gate} go".startswith(text)  # the whole echo, or LIGHT_MAX_TOKENS of it


def test_the_cache_is_shared_by_the_replicas_through_redis(cluster: Cluster) -> None:
    if cluster.redis is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
    body = {**CHAT, "temperature": 0, "messages": [{"role": "user", "content": "computed once"}]}
    answers = [httpx.post(f"{cluster.url}/v1/chat/completions", json=body, timeout=DEADLINE_S) for _ in range(24)]
    assert all(a.status_code == 200 for a in answers)
    statuses = [a.headers["x-cache"] for a in answers]
    assert statuses == ["MISS"] + ["HIT"] * 23
    computed_by = replica_of(answers[0])
    assert {replica_of(a) for a in answers[1:]} - {computed_by}, "no other replica answered from the cache"


def _off_loopback(connection: psutil._common.pconn) -> bool:
    for address in (connection.laddr, connection.raddr):
        if not address:
            continue
        ip = ipaddress.ip_address(address.ip.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if not ip.is_loopback:
            return True
    return False


def test_every_ray_socket_is_on_loopback(cluster: Cluster) -> None:
    outside = []
    processes = cluster.processes()
    assert len(processes) > 3, "Ray's processes were not found under this one"
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            outside += [
                f"{process.name()} (pid {process.pid}): {c.laddr} -> {c.raddr or '-'} {c.status}"
                for c in process.net_connections(kind="inet")
                if _off_loopback(c)
            ]
    assert not outside, "sockets beyond loopback:\n" + "\n".join(outside)


def test_shutdown_leaves_no_ray_process(cluster: Cluster) -> None:
    cluster.shutdown()
    wait_for(lambda: not [pid for pid in cluster.pids if psutil.pid_exists(pid)], "Ray's processes exiting", 60)


# ---------------------------------------------------------------- arguments of `serve run scale.ray_serve:build`


def test_build_passes_autoscaling_arguments_to_serve(tmp_path: Path) -> None:
    """What `serve run scale.ray_serve:build replicas=auto ...` hands Serve (binding needs no cluster)."""
    from scale.ray_serve import build

    env_file = tmp_path / ".env"
    env_file.write_text("DRAIN_TIMEOUT=12\n")
    args = {"replicas": "auto", "min_replicas": "2", "max_replicas": "6", "target_ongoing_requests": "4"}
    app = build({**args, "downscale_delay_s": "60", "env_file": str(env_file)})
    config = app._bound_deployment._deployment_config  # Serve keeps the options here (no public reader)
    scaling = config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas, scaling.target_ongoing_requests) == (2, 6, 4.0)
    assert scaling.downscale_delay_s == 60.0
    assert scaling.upscale_delay_s == type(scaling)().upscale_delay_s  # not given: Serve's default
    assert config.graceful_shutdown_timeout_s == 12.0  # scale-down drains for DRAIN_TIMEOUT, from env_file

    fixed = build({"replicas": "3", "env_file": str(tmp_path / "missing.env")})._bound_deployment
    assert fixed.num_replicas == 3 and fixed._deployment_config.autoscaling_config is None
