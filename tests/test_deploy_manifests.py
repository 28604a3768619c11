"""The Kubernetes example (deploy/kubernetes/llmservice.yaml) holds what the service really does: its
ConfigMap's keys are the config table's and load as settings, its probes are routes the app answers
(with the Host and without the key a kubelet sends), its command is the one start_service.sh runs, the
grace period covers the drain, and the Redis URLs name the manifest's own Redis services."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from fastapi.testclient import TestClient

from config import SERVER_KEYS, TIER_KEYS, TIERS, load_settings
from ops.lifecycle import CANCEL_GRACE
from server import create_app
from tests.fakes import FakeRegistry

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "deploy" / "kubernetes" / "llmservice.yaml"
KNOWN_KEYS = {key.env for key in SERVER_KEYS} | {key.env_name(tier) for tier in TIERS for key in TIER_KEYS}
REDIS_KEYS = ("CACHE_REDIS_URL", "RATE_LIMIT_REDIS_URL", "SESSIONS_REDIS_URL")


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(MANIFEST.read_text()) if doc]


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def service_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    containers = find(objects, "Deployment", "llmservice")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def pod_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    """What the container's envFrom gives it: the ConfigMap's data and the Secret's stringData."""
    env: dict[str, str] = {}
    for source in service_container(objects)["envFrom"]:
        if "configMapRef" in source:
            env |= find(objects, "ConfigMap", source["configMapRef"]["name"])["data"]
        else:
            env |= find(objects, "Secret", source["secretRef"]["name"])["stringData"]
    return env


def test_every_env_key_is_one_the_config_table_knows(objects: list[dict[str, Any]]) -> None:
    env = pod_env(objects)
    assert set(env) <= KNOWN_KEYS, f"unknown keys: {sorted(set(env) - KNOWN_KEYS)}"
    assert all(isinstance(value, str) for value in env.values()), "ConfigMap values must be strings"


def test_the_pod_environment_loads_as_settings(objects: list[dict[str, Any]]) -> None:
    settings = load_settings(pod_env(objects))  # e.g. HOST=0.0.0.0 without API_KEYS would raise here
    assert settings.host == "0.0.0.0" and settings.api_keys
    assert settings.shutdown_timeout == 0, "an idle exit would look like a crash to Kubernetes"


def test_the_container_runs_the_server_as_start_service_does(objects: list[dict[str, Any]]) -> None:
    launcher = (REPO / "start_service.sh").read_text()
    last = [line for line in launcher.splitlines() if line.startswith("exec ")][-1]
    assert shlex.split(last)[1:] == [".venv/bin/python", "server.py"]  # the image's python has the requirements
    container = service_container(objects)
    assert container["command"] == ["python", "server.py"]
    assert (REPO / "server.py").is_file() and container["workingDir"] == "/app"


def test_probes_are_routes_the_app_serves_without_a_key(objects: list[dict[str, Any]]) -> None:
    container = service_container(objects)
    env = pod_env(objects)
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports["http"] == int(env["PORT"])
    probes = [container[name] for name in ("startupProbe", "readinessProbe", "livenessProbe")]
    assert all(probe["httpGet"]["port"] == "http" for probe in probes)
    # The replicas' Redis is not here: the probe answers without it (nothing connects before a lookup).
    settings = load_settings({k: v for k, v in env.items() if k not in REDIS_KEYS})
    app = create_app(settings, factories=FakeRegistry().factories())
    # A kubelet sends the pod's IP as Host and no Authorization header.
    with TestClient(app, base_url="http://10.1.2.3:8000", raise_server_exceptions=False) as client:
        for probe in probes:
            response = client.get(probe["httpGet"]["path"])
            assert response.status_code == 200, response.text
            assert response.json() == {"status": "ok"}  # without a key, liveness only
        assert client.get("/v1/models").status_code == 401  # the rest needs a key
        # In-cluster clients use the Service's name: ALLOWED_HOSTS admits it.
        service = find(objects, "Service", "llmservice")
        named = client.get(
            "/health", headers={"Host": f"{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"}
        )
        assert named.status_code == 200, named.text


def test_grace_period_covers_the_drain(objects: list[dict[str, Any]]) -> None:
    pod = find(objects, "Deployment", "llmservice")["spec"]["template"]["spec"]
    settings = load_settings(pod_env(objects))
    pre_stop = service_container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    needed = float(pre_stop[1]) + settings.drain_timeout + CANCEL_GRACE
    assert pod["terminationGracePeriodSeconds"] >= needed


def test_redis_urls_name_the_manifest_redis_services(objects: list[dict[str, Any]]) -> None:
    env = pod_env(objects)
    for key, policy in (("CACHE_REDIS_URL", "allkeys-lru"), ("SESSIONS_REDIS_URL", "noeviction")):
        url = urlsplit(env[key])
        service = find(objects, "Service", url.hostname or "")
        assert url.port in {port["port"] for port in service["spec"]["ports"]}
        redis = find(objects, "Deployment", url.hostname or "")
        assert redis["spec"]["template"]["metadata"]["labels"] == service["spec"]["selector"]
        args = redis["spec"]["template"]["spec"]["containers"][0]["args"]
        options = dict(zip(args[1::2], args[2::2], strict=True))
        assert options["--maxmemory-policy"] == policy  # a cache may evict; sessions must not
        assert options["--save"] == "" and options["--appendonly"] == "no"  # no persistence
    assert urlsplit(env["RATE_LIMIT_REDIS_URL"]).hostname == urlsplit(env["CACHE_REDIS_URL"]).hostname


def test_selectors_match_their_pods(objects: list[dict[str, Any]]) -> None:
    for deployment in (o for o in objects if o["kind"] == "Deployment"):
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = find(objects, "Service", "llmservice")
    assert service["spec"]["selector"] == find(objects, "Deployment", "llmservice")["spec"]["selector"]["matchLabels"]
    assert service["spec"]["ports"][0]["targetPort"] == "http"
