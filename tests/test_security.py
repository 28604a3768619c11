"""API keys, the Host allowlist, CORS and the refusal to expose the service without keys."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from config import ConfigError, load_settings
from middleware.security import host_allowed, host_name, key_matches
from tests.conftest import FAKE_ENV

REPO = Path(__file__).resolve().parent.parent
CHAT = {"model": "light", "messages": [{"role": "user", "content": "hi"}]}
KEYED = {**FAKE_ENV, "API_KEYS": "sk-first, sk-second"}


def assert_envelope(body: dict[str, Any], code: str) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code


# ---------------------------------------------------------------- API keys


def test_without_keys_any_bearer_and_no_bearer_are_accepted(make_client: Any) -> None:
    client = make_client()
    assert client.post("/v1/chat/completions", json=CHAT).status_code == 200
    headers = {"Authorization": "Bearer whatever-the-sdk-sends"}
    assert client.post("/v1/chat/completions", json=CHAT, headers=headers).status_code == 200


def test_missing_key_is_401_envelope_with_www_authenticate(make_client: Any) -> None:
    client = make_client(KEYED)
    response = client.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 401
    assert_envelope(response.json(), "invalid_api_key")
    assert response.json()["error"]["type"] == "authentication_error"
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "value", ["Bearer sk-wrong", "Bearer sk-firs", "Bearer sk-first-x", "Basic c2stZmlyc3Q=", "sk-first"]
)
def test_wrong_key_is_401(make_client: Any, value: str) -> None:
    client = make_client(KEYED)
    response = client.get("/v1/models", headers={"Authorization": value})
    assert response.status_code == 401
    assert_envelope(response.json(), "invalid_api_key")
    assert "Bearer" in response.headers["www-authenticate"]


@pytest.mark.parametrize("key", ["sk-first", "sk-second"])
def test_every_configured_key_is_accepted(make_client: Any, key: str) -> None:
    client = make_client(KEYED)
    response = client.post("/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "echo: hi"


def test_keys_protect_metrics_and_models_but_not_health_or_dashboard_page(make_client: Any) -> None:
    client = make_client(KEYED)
    assert client.get("/metrics").status_code == 401
    assert client.get("/v1/models").status_code == 401
    assert client.get("/metrics", headers={"Authorization": "Bearer sk-second"}).status_code == 200
    assert client.get("/health").status_code == 200
    page = client.get("/admin")
    assert page.status_code == 200 and "llmservice admin" in page.text


def test_key_matches_compares_whole_keys() -> None:
    assert key_matches("abc", ("zzz", "abc"))
    assert not key_matches("ab", ("abc",))
    assert not key_matches("abcd", ("abc",))
    assert not key_matches("", ("abc",))
    assert not key_matches("abc", ())


# ---------------------------------------------------------------- exposure


def test_non_loopback_host_without_keys_is_refused() -> None:
    with pytest.raises(ConfigError, match="HOST has value '0.0.0.0'.*API_KEYS"):
        load_settings({"HOST": "0.0.0.0"})
    with pytest.raises(ConfigError, match="HOST"):
        load_settings({"HOST": "192.168.1.20"})


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_hosts_need_no_keys(host: str) -> None:
    assert load_settings({"HOST": host}).host == host


def test_non_loopback_host_with_keys_is_allowed() -> None:
    settings = load_settings({"HOST": "0.0.0.0", "API_KEYS": "sk-1"})
    assert settings.host == "0.0.0.0" and settings.api_keys == ("sk-1",)


def test_default_bind_is_loopback() -> None:
    assert load_settings({}).host == "127.0.0.1"


def test_server_refuses_to_start_exposed_without_keys(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("API_KEYS", "PORT")}
    env.update({"HOST": "0.0.0.0", "PORT_FILE": str(tmp_path / ".port")})
    result = subprocess.run(
        [sys.executable, str(REPO / "server.py")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert "HOST" in result.stderr and "API_KEYS" in result.stderr
    assert not (tmp_path / ".port").exists()


# ---------------------------------------------------------------- Host allowlist (DNS rebinding)


@pytest.mark.parametrize(
    ("header", "name"),
    [("localhost:8000", "localhost"), ("[::1]:8000", "::1"), ("::1", "::1"), ("Example.COM.", "example.com"), ("", "")],
)
def test_host_name(header: str, name: str) -> None:
    assert host_name(header) == name


@pytest.mark.parametrize(
    "header", ["localhost", "localhost:8000", "127.0.0.1:8000", "[::1]:9000", "app.localhost", "192.168.1.5:8000"]
)
def test_loopback_names_and_ip_literals_are_allowed(header: str) -> None:
    assert host_allowed(header, ())


@pytest.mark.parametrize("header", ["evil.example", "rebind.attacker.net:8000", "localhost.evil.example"])
def test_other_names_are_refused(header: str) -> None:
    assert not host_allowed(header, ())


def test_allowed_hosts_entries_and_wildcards() -> None:
    allowed = ("llm.internal", "*.corp.example")
    assert host_allowed("llm.internal:8000", allowed)
    assert host_allowed("gpu1.corp.example", allowed)
    assert not host_allowed("corp.example.evil", allowed)
    assert not host_allowed("other.internal", allowed)
    assert host_allowed("anything.at.all", ("*",))


def test_rebinding_host_gets_400_envelope_even_on_health(make_client: Any) -> None:
    client = make_client()
    for path in ("/health", "/v1/models"):
        response = client.get(path, headers={"Host": "attacker.example:8000"})
        assert response.status_code == 400
        assert_envelope(response.json(), "host_not_allowed")
        assert "ALLOWED_HOSTS" in response.json()["error"]["message"]
    assert client.get("/health", headers={"Host": "127.0.0.1:8000"}).status_code == 200


def test_allowed_hosts_setting_admits_a_name(make_client: Any) -> None:
    client = make_client({**FAKE_ENV, "ALLOWED_HOSTS": "llm.lan"})
    assert client.get("/health", headers={"Host": "llm.lan:8000"}).status_code == 200
    assert client.get("/health", headers={"Host": "other.lan"}).status_code == 400


# ---------------------------------------------------------------- CORS

PREFLIGHT = {
    "Origin": "http://localhost:3000",
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}


def test_cors_is_off_by_default(make_client: Any) -> None:
    client = make_client()
    preflight = client.options("/v1/chat/completions", headers=PREFLIGHT)
    assert "access-control-allow-origin" not in preflight.headers
    simple = client.get("/v1/models", headers={"Origin": "http://localhost:3000"})
    assert simple.status_code == 200
    assert "access-control-allow-origin" not in simple.headers


def test_cors_origin_listed_is_echoed_exactly_with_open_webui_headers(make_client: Any) -> None:
    client = make_client({**KEYED, "CORS_ORIGINS": "http://localhost:3000,https://chat.example.com"})
    preflight = client.options("/v1/chat/completions", headers=PREFLIGHT)
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
    allowed = {h.strip().lower() for h in preflight.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "content-type"} <= allowed
    assert "POST" in preflight.headers["access-control-allow-methods"]
    # The real request, with the key: echoed origin, and the request id readable by the page.
    auth = {"Origin": "http://localhost:3000", "Authorization": "Bearer sk-first"}
    response = client.post("/v1/chat/completions", json=CHAT, headers=auth)
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert "x-request-id" in response.headers["access-control-expose-headers"].lower()
    # A 401 still carries CORS headers, so the browser can show the error instead of a CORS failure.
    denied = client.post("/v1/chat/completions", json=CHAT, headers={"Origin": "http://localhost:3000"})
    assert denied.status_code == 401
    assert denied.headers["access-control-allow-origin"] == "http://localhost:3000"


def test_cors_unlisted_origin_is_refused_in_envelope(make_client: Any) -> None:
    client = make_client({**FAKE_ENV, "CORS_ORIGINS": "http://localhost:3000"})
    preflight = client.options("/v1/chat/completions", headers={**PREFLIGHT, "Origin": "http://evil.example"})
    assert preflight.status_code == 400
    assert_envelope(preflight.json(), "cors_rejected")
    assert "access-control-allow-origin" not in preflight.headers
    simple = client.get("/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in simple.headers


def test_cors_wildcard_never_comes_with_credentials(make_client: Any) -> None:
    client = make_client({**FAKE_ENV, "CORS_ORIGINS": "*"})
    preflight = client.options("/v1/chat/completions", headers=PREFLIGHT)
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in preflight.headers
    simple = client.get("/v1/models", headers={"Origin": "http://anything.example"})
    assert simple.headers["access-control-allow-origin"] == "*"
    assert "access-control-allow-credentials" not in simple.headers


@pytest.mark.parametrize("value", ["localhost:3000", "http://localhost:3000/", "http://x/path", "ftp://x"])
def test_bad_cors_origin_names_the_variable(value: str) -> None:
    with pytest.raises(ConfigError, match="CORS_ORIGINS"):
        load_settings({"CORS_ORIGINS": value})
