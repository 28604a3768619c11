"""The admin dashboard: the page as served, and end to end in headless Chromium over the real Gemma model.

The browser tests need Debian's `chromium` (`.ci/run` installs it) and Playwright for Python (driving
the system browser; no browser download). Without chromium they skip, saying so.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import FAKE_ENV, LiveServer, real_settings
from tests.waiting import DEADLINE_S

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
DEADLINE_MS = int(DEADLINE_S * 1000)  # Playwright's waits are in milliseconds
KEY = "sk-dashboard-test"
# Function-form predicates: a bare expression would be eval()ed in the page, which its CSP forbids.
READY = "() => document.querySelector('#tiers tr[data-tier=light] td.state').textContent === 'ready'"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# ---------------------------------------------------------------- the page as served (no browser)


def features_of(html: str) -> dict[str, Any]:
    match = re.search(r'<script type="application/json" id="features">(.*?)</script>', html, flags=re.S)
    assert match, "the page has no features block"
    return json.loads(match.group(1))


def test_page_is_served_with_a_strict_csp_matching_its_inline_code(client: Any) -> None:
    response = client.get("/admin")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    csp = response.headers["content-security-policy"]
    assert "connect-src 'self'" in csp and "default-src 'none'" in csp
    assert "unsafe-inline" not in csp
    for tag, directive in (("script", "script-src"), ("style", "style-src")):
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", response.text, flags=re.S)
        assert blocks
        for block in blocks:
            digest = base64.b64encode(hashlib.sha256(block.encode()).digest()).decode()
            assert f"'sha256-{digest}'" in csp.split(directive, 1)[1].split(";", 1)[0]


def test_page_says_which_apis_exist_and_whether_a_key_is_needed(make_client: Any) -> None:
    open_features = features_of(make_client().get("/admin").text)
    assert open_features["auth_required"] is False
    assert "/v1/chat/completions" in open_features["routes"] and "/metrics" in open_features["routes"]
    assert open_features["tiers"] == ["light", "medium"]
    keyed = make_client({**FAKE_ENV, "API_KEYS": "sk-1"})
    keyed_features = features_of(keyed.get("/admin").text)
    assert keyed_features["auth_required"] is True
    assert keyed_features["tiers"] == []  # the public page names no tiers until a key works


def test_page_talks_only_to_its_own_origin() -> None:
    html = (Path(__file__).resolve().parent.parent / "static" / "admin.html").read_text()
    assert not re.search(r"https?://", html), "the dashboard must not reference other origins"
    assert "innerHTML" not in html, "server data goes into the page as text only"


# ---------------------------------------------------------------- headless Chromium


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = chromium_path()
    if executable is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does this in CI)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


def install_stand_in_unload(app: Any) -> bool:
    """Until the lifecycle admin API is merged, a stand-in calls the core `ModelManager.unload`.

    Returns True when the real route exists (the stand-in is then not added).
    """
    if "/admin/tiers/{tier}/unload" in app.openapi().get("paths", {}):
        return True

    @app.post("/admin/tiers/{tier}/unload")
    async def unload(tier: str) -> dict[str, Any]:
        await app.state.llm.manager.unload(tier)
        return {"tier": tier, **app.state.llm.manager.status(tier)}

    app.openapi_schema = None  # the page learns its routes from the schema
    return False


@pytest.fixture(scope="module")
def dashboard_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The real packaged Gemma on the light tier (embedding and reranker off), behind an API key."""
    from server import create_app

    cache_dir = tmp_path_factory.mktemp("dashboard-cache")
    settings = real_settings(
        {"EMBEDDING_MODEL_PATH": "", "RERANKER_MODEL_PATH": "", "API_KEYS": KEY, "CACHE_DIR": str(cache_dir)}
    )
    app = create_app(settings)
    app.state.llm.extras["real_unload_route"] = install_stand_in_unload(app)
    with LiveServer(app) as live:
        yield live


class Page:
    """A fresh page that records console errors and uncaught exceptions."""

    def __init__(self, browser: Any) -> None:
        self.context = browser.new_context(viewport={"width": 1280, "height": 1000})
        self.context.set_default_timeout(DEADLINE_MS)  # every wait_for_* and action, unless it says more
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.page.on("console", lambda m: self.errors.append(f"console: {m.text}") if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(f"pageerror: {e}"))

    def open_with_key(self, url: str) -> Any:
        page = self.page
        page.goto(url + "/admin")
        page.wait_for_function("() => document.getElementById('conn').textContent.includes('API key')")
        page.fill("#api-key", KEY)
        page.click("#api-key-save")
        page.wait_for_selector("#tiers tbody tr[data-tier=light]")
        return page

    def state_of(self, tier: str) -> str:
        return self.page.inner_text(f"#tiers tbody tr[data-tier={tier}] td.state")


@pytest.fixture
def page(browser: Any) -> Iterator[Page]:
    holder = Page(browser)
    yield holder
    holder.context.close()


@pytest.mark.real
def test_page_loads_and_playground_streams_a_gemma_reply(dashboard_server: LiveServer, page: Page) -> None:
    p = page.open_with_key(dashboard_server.url)
    assert p.input_value("#pg-tier") == "light"
    # Record every length the output takes, to see the reply arrive piece by piece.
    p.evaluate(
        """() => { window.__lengths = [];
        new MutationObserver(() => window.__lengths.push(document.getElementById('pg-output').textContent.length))
          .observe(document.getElementById('pg-output'), {childList: true, characterData: true, subtree: true}); }"""
    )
    p.fill("#pg-input", "Name three colours.")
    p.fill("#pg-max-tokens", "24")
    p.fill("#pg-temperature", "0")
    p.click("#pg-send")
    p.wait_for_selector("#pg-status[data-state=done]", timeout=180_000)
    reply = p.inner_text("#pg-output")
    assert reply.strip(), "the playground showed no reply"
    assert int(p.get_attribute("#pg-output", "data-chunks") or 0) >= 2
    lengths = p.evaluate("window.__lengths")
    assert len({n for n in lengths if n > 0}) >= 2, f"the reply did not stream: {lengths}"
    assert "done:" in p.inner_text("#pg-status")
    # The tier table and the traffic numbers follow (polled from /admin/status or /health, and /metrics).
    p.wait_for_function(READY)
    p.wait_for_function("() => Number(document.getElementById('stat-tokens').textContent) > 0")
    ARTIFACTS.mkdir(exist_ok=True)
    p.screenshot(path=str(ARTIFACTS / "admin-dashboard.png"), full_page=True)
    assert page.errors == []


@pytest.mark.real
def test_unload_button_unloads_the_tier(dashboard_server: LiveServer, page: Page) -> None:
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "light", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    with httpx.Client(base_url=dashboard_server.url, timeout=120, headers=headers) as http:
        assert http.post("/v1/chat/completions", json=body).status_code == 200  # make sure it is loaded
        p = page.open_with_key(dashboard_server.url)
        p.wait_for_function(READY)
        button = "#tiers tr[data-tier=light] button[data-action=unload]"
        p.wait_for_selector(f"{button}:not([disabled])")
        p.click(button)
        p.wait_for_function(READY.replace("'ready'", "'unloaded'"))
        assert http.get("/health").json()["tiers"]["light"]["state"] == "unloaded"
        ARTIFACTS.mkdir(exist_ok=True)
        p.screenshot(path=str(ARTIFACTS / "admin-dashboard-unloaded.png"), full_page=True)
        if "/admin/tiers/{tier}/load" in dashboard_server.app.openapi().get("paths", {}):
            p.click("#tiers tr[data-tier=light] button[data-action=load]")
            p.wait_for_function(READY)
            assert http.get("/health").json()["tiers"]["light"]["state"] == "ready"
    assert page.errors == []


@pytest.mark.real
def test_cache_panel_shows_entries_and_clears(dashboard_server: LiveServer, page: Page) -> None:
    if "/admin/cache" not in dashboard_server.app.openapi().get("paths", {}):
        pytest.skip("this build has no /admin/cache (the response cache is not merged)")
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "light", "messages": [{"role": "user", "content": "cache me"}], "max_tokens": 4, "temperature": 0}
    with httpx.Client(base_url=dashboard_server.url, timeout=120, headers=headers) as http:
        assert http.post("/v1/chat/completions", json=body).status_code == 200  # deterministic: cached
        assert http.get("/admin/cache").json()["entries"] >= 1
        p = page.open_with_key(dashboard_server.url)
        p.wait_for_function("() => Number(document.getElementById('cache-entries').textContent) >= 1")
        p.click("#cache-clear")
        p.wait_for_function("() => document.getElementById('cache-msg').textContent.startsWith('cleared')")
        p.wait_for_function("() => document.getElementById('cache-entries').textContent === '0'")
        assert http.get("/admin/cache").json()["entries"] == 0
    assert page.errors == []


@pytest.mark.real
def test_playground_embeddings_and_rerank(request: pytest.FixtureRequest, make_client: Any, page: Page) -> None:
    paths = make_client().app.openapi().get("paths", {})
    if "/v1/embeddings" not in paths or "/v1/rerank" not in paths:
        pytest.skip("this build has no /v1/embeddings or /v1/rerank (the RAG routes are not merged)")
    live: LiveServer = request.getfixturevalue("real_server")  # MiniLM embedding + similarity reranker, no key
    p = page.page
    p.goto(live.url + "/admin")
    p.wait_for_function("() => document.getElementById('conn').textContent.startsWith('live')")
    p.select_option("#pg-mode", "embeddings")
    p.wait_for_function("() => document.getElementById('pg-tier').value === 'embedding'")
    p.fill("#pg-input", "the cat sat on the mat\nquantum chromodynamics")
    p.click("#pg-send")
    p.wait_for_selector("#pg-status[data-state=done]", timeout=180_000)
    rows = p.inner_text("#pg-output").splitlines()
    assert len(rows) == 2 and all("[384 dims]" in row for row in rows), rows
    p.select_option("#pg-mode", "rerank")
    p.wait_for_function("() => document.getElementById('pg-tier').value === 'reranker'")
    p.fill("#pg-query", "Which animal purrs?")
    p.fill("#pg-input", "Stock markets fell on Tuesday.\nCats purr when they are content.")
    p.click("#pg-send")
    p.wait_for_function("() => document.getElementById('pg-status').textContent.includes('results')", timeout=180_000)
    ranked = p.inner_text("#pg-output").splitlines()
    assert len(ranked) == 2 and "Cats purr" in ranked[0], ranked
    ARTIFACTS.mkdir(exist_ok=True)
    p.screenshot(path=str(ARTIFACTS / "admin-dashboard-rerank.png"), full_page=True)
    assert page.errors == []


@pytest.fixture
def fake_speech_server() -> Iterator[LiveServer]:
    """Fake chat models plus a fake Whisper that decodes uploads for real (tests/audio_fixtures.py)."""
    from config import load_settings
    from server import create_app
    from tests.audio_fixtures import FakeTranscriber
    from tests.fakes import FakeRegistry

    env = {**FAKE_ENV, "SPEECH_MODEL_PATH": "/models/fake-whisper", "SPEECH_BACKEND": "faster_whisper"}
    factories = {**FakeRegistry().factories(), "speech:faster_whisper": lambda tier, settings: FakeTranscriber(tier)}
    with LiveServer(create_app(load_settings(env), factories=factories)) as live:
        yield live


def test_playground_transcribes_an_uploaded_wav(fake_speech_server: LiveServer, page: Page) -> None:
    from tests.audio_fixtures import tone_wav

    p = page.page
    p.goto(fake_speech_server.url + "/admin")
    p.wait_for_function("() => document.getElementById('conn').textContent.startsWith('live')")
    p.select_option("#pg-mode", "transcription")
    p.wait_for_function("() => document.getElementById('pg-tier').value === 'speech'")
    assert p.is_visible("#pg-audio") and not p.is_visible("#pg-image")
    p.set_input_files("#pg-audio", files=[{"name": "clip.wav", "mimeType": "audio/wav", "buffer": tone_wav(1.5)}])
    p.click("#pg-send")
    p.wait_for_selector("#pg-status[data-state=done]")
    assert p.inner_text("#pg-output") == "Hello there. General Kenobi."
    assert "1.5 s of audio" in p.inner_text("#pg-status") and "2 segments" in p.inner_text("#pg-status")
    p.set_input_files("#pg-audio", files=[{"name": "notes.wav", "mimeType": "audio/wav", "buffer": b"not audio" * 9}])
    p.click("#pg-send")
    p.wait_for_selector("#pg-status[data-state=error]")
    assert "could not be decoded as audio" in p.inner_text("#pg-status")
    ARTIFACTS.mkdir(exist_ok=True)
    p.screenshot(path=str(ARTIFACTS / "admin-dashboard-transcription.png"), full_page=True)
    assert all("status of 400" in e for e in page.errors), page.errors  # only the refused upload's own 400


def test_playground_attaches_an_image_to_the_chat_message(fake_speech_server: LiveServer, page: Page) -> None:
    """The page builds OpenAI's request: a text part and an `image_url` part holding a data: URI."""
    png = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
    )
    sent: list[dict[str, Any]] = []

    def answer(route: Any) -> None:  # stands in for a vision tier: records the request, streams one word
        sent.append(json.loads(route.request.post_data))
        chunk = {"choices": [{"index": 0, "delta": {"content": "red"}, "finish_reason": "stop"}]}
        stream = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"
        route.fulfill(status=200, content_type="text/event-stream", body=stream)

    p = page.page
    p.route("**/v1/chat/completions", answer)
    p.goto(fake_speech_server.url + "/admin")
    p.wait_for_function("() => document.getElementById('conn').textContent.startsWith('live')")
    p.set_input_files("#pg-image", files=[{"name": "dot.png", "mimeType": "image/png", "buffer": png}])
    p.wait_for_selector("#pg-image-preview:not(.hidden)")
    p.fill("#pg-input", "What colour is this?")
    p.click("#pg-send")
    p.wait_for_selector("#pg-status[data-state=done]")
    assert p.inner_text("#pg-output") == "red"
    content = sent[0]["messages"][0]["content"]
    assert content[0] == {"type": "text", "text": "What colour is this?"}
    assert content[1]["type"] == "image_url"
    assert content[1]["image_url"]["url"] == "data:image/png;base64," + base64.b64encode(png).decode()
    p.click("#pg-image-clear")  # without the image the message is plain text again
    p.click("#pg-send")
    p.wait_for_function("() => document.getElementById('pg-status').dataset.state === 'done'")
    p.wait_for_function("() => document.getElementById('pg-image-preview').classList.contains('hidden')")
    assert len(sent) == 2 and sent[1]["messages"][0]["content"] == "What colour is this?"
    assert page.errors == []
