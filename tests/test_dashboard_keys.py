"""The dashboard's "Usage by API key" panel in headless Chromium, over fakes and a key file: each key's
requests, errors, tokens and latency, fed by /admin/metrics/summary. Skips without chromium, as
tests/test_dashboard_browser.py does."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from config import load_settings
from server import create_app
from tests.conftest import FAKE_ENV, LiveServer
from tests.fakes import FakeRegistry
from tests.test_dashboard_browser import ARTIFACTS, KEY, Page, browser, features_of  # noqa: F401 - fixture
from tests.test_keys import bearer, key_file
from tests.waiting import DEADLINE_S

KEYS = f"""
[[keys]]
name = "n8n"
key = "sk-n8n"
tiers = ["light"]

[[keys]]
name = "webui"
key = "sk-webui"

[[keys]]
name = "ops"
key = "{KEY}"
admin = true
"""
CHAT = {"model": "light", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def keyed_server(tmp_path: Path, fake_registry: FakeRegistry) -> Iterator[LiveServer]:
    settings = load_settings({**FAKE_ENV, "API_KEYS_FILE": str(key_file(tmp_path, KEYS))})
    with LiveServer(create_app(settings, factories=fake_registry.factories())) as live:
        yield live


@pytest.fixture
def page(browser: object) -> Iterator[Page]:  # noqa: F811 - the imported fixture
    holder = Page(browser)
    yield holder
    holder.context.close()


def cell_of(key: str, column: str) -> str:
    return f"#keys tr[data-key={key}] td.{column}"


def test_the_page_knows_the_analytics_route(keyed_server: LiveServer) -> None:
    html = httpx.get(keyed_server.url + "/admin", timeout=DEADLINE_S).text
    assert "/admin/metrics/summary" in features_of(html)["routes"]


def test_the_keys_panel_shows_each_keys_usage(keyed_server: LiveServer, page: Page) -> None:
    with httpx.Client(base_url=keyed_server.url, timeout=DEADLINE_S) as http:
        for _ in range(2):
            assert http.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-n8n")).status_code == 200
        refused = http.post("/v1/chat/completions", json={**CHAT, "model": "medium"}, headers=bearer("sk-n8n"))
        assert refused.status_code == 403
        assert http.post("/v1/chat/completions", json=CHAT, headers=bearer("sk-webui")).status_code == 200
    p = page.open_with_key(keyed_server.url)
    p.wait_for_selector(cell_of("webui", "requests"))
    assert p.inner_text(cell_of("n8n", "requests")) == "3"
    assert p.inner_text(cell_of("n8n", "errors")) == "1"
    assert p.inner_text(cell_of("webui", "requests")) == "1" and p.inner_text(cell_of("webui", "errors")) == "0"
    assert int(p.inner_text(cell_of("n8n", "completion"))) == 2 * len("echo: hi")  # one token per character
    assert p.inner_text(cell_of("n8n", "p50")).endswith(" ms")
    assert p.locator("#keys tr[data-key=ops]").count() == 0  # the dashboard's own polling is not API traffic
    p.select_option("#keys-window", "minute")
    p.wait_for_function("() => document.querySelector('#keys tr[data-key=n8n] td.requests') !== null")
    assert p.inner_text(cell_of("n8n", "requests")) == "3"
    ARTIFACTS.mkdir(exist_ok=True)
    p.screenshot(path=str(ARTIFACTS / "admin-dashboard-keys.png"), full_page=True)
    assert page.errors == []
