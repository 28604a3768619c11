"""Swapping a tier's model at run time (POST /admin/tiers/{tier}/model), pinning and eviction priority
under MAX_MEMORY_GB, and the refusal of {TIER}_EMBEDDING_MODE values this service would ignore.

The fake chat models here say which model file answered, so a test sees which model served it.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import cache
from config import ConfigError, Settings, TierConfig, load_settings
from core.errors import ModelUnavailable
from model_manager import READY, UNLOADED, ModelManager
from models_admin.overrides import OverrideStore
from server import create_app
from tests.conftest import LiveServer
from tests.fakes import FakeChat, FakeRegistry
from tests.test_admin import StreamReader
from tests.waiting import DEADLINE_S, wait_for, wait_for_async

GIB = 1024**3
OLD, NEW = "/models/old-light.gguf", "/models/new-light.gguf"


class NamedChat(FakeChat):
    def reply_for(self, prompt: str) -> str:  # type: ignore[override]
        return f"[{Path(self.tier.model_path).stem}] {FakeChat.reply_for(prompt)}"


class NamedRegistry(FakeRegistry):
    """Loads NamedChat models, all of them kept in `loaded`; a path with "missing" in it fails to load."""

    def __init__(self) -> None:
        super().__init__()
        self.loaded: list[NamedChat] = []

    def _load_chat(self, tier: TierConfig, settings: Settings) -> FakeChat:
        if "missing" in tier.model_path:
            raise ModelUnavailable(f"The {tier.name} tier's model file does not exist")
        model = NamedChat(tier)
        self.loaded.append(model)
        self.models[tier.name] = model
        return model

    def model(self, stem: str) -> NamedChat:
        return next(m for m in self.loaded if Path(m.tier.model_path).stem == stem)


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "LIGHT_MODEL_PATH": OLD,
        "EMBEDDING_MODEL_PATH": "",
        "RERANKER_MODEL_PATH": "",
        "SPEECH_MODEL_PATH": "",
        "MODELS_DIR": str(tmp_path / "models"),
        "CACHE_DIR": str(tmp_path / "cache"),
        **extra,
    }


def chat(model: str = "light", content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def answer(response: httpx.Response) -> str:
    assert response.status_code == 200, response.text
    text: str = response.json()["choices"][0]["message"]["content"]
    return text


@pytest.fixture
def registry() -> NamedRegistry:
    return NamedRegistry()


@pytest.fixture
def live(registry: NamedRegistry, tmp_path: Path) -> Iterator[LiveServer]:
    with LiveServer(create_app(load_settings(env_for(tmp_path)), factories=registry.factories())) as server:
        yield server


# ---------------------------------------------------------------- swap


def test_a_swap_lets_streams_on_the_old_model_finish_and_sends_new_requests_to_the_new(
    live: LiveServer, registry: NamedRegistry
) -> None:
    url = live.url
    assert answer(httpx.post(f"{url}/v1/chat/completions", json=chat(), timeout=DEADLINE_S)) == "[old-light] echo: hi"
    old = registry.model("old-light")
    old.hold_gate = threading.Event()  # the old model's decode steps wait: a stream stays in flight
    stream = StreamReader(f"{url}/v1/chat/completions", chat(content="long story"))
    manager = live.app.state.llm.manager
    wait_for(lambda: manager.tiers["light"].in_flight == 1, "the stream on the old model")

    swapped = httpx.post(f"{url}/admin/tiers/light/model", json={"model_path": NEW}, timeout=DEADLINE_S)
    assert swapped.status_code == 200, swapped.text
    status = swapped.json()
    assert (status["model"], status["state"], status["source"]) == ("light/new-light", "ready", "admin")
    assert status["retiring"] == [{"model": "light/old-light", "in_flight": 1}]
    assert answer(httpx.post(f"{url}/v1/chat/completions", json=chat(), timeout=DEADLINE_S)) == "[new-light] echo: hi"
    assert [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]] == ["light/new-light"]
    assert not old.closed and not stream.finished.is_set()

    old.hold_gate.set()
    assert stream.finished.wait(DEADLINE_S)
    text = "".join(
        e["choices"][0]["delta"].get("content") or "" for e in stream.events if e != "[DONE]" and e["choices"]
    )
    assert text == "[old-light] echo: long story" and stream.events[-1] == "[DONE]"
    wait_for(lambda: old.closed, "the old model unloaded once its stream ended")
    assert "retiring" not in httpx.get(f"{url}/admin/status").json()["tiers"]["light"]


def test_no_request_is_refused_while_a_tier_swaps_under_load(live: LiveServer, registry: NamedRegistry) -> None:
    url = live.url
    answers: list[str | int] = []
    stop = threading.Event()

    def load() -> None:  # one client after another, as fast as they are answered
        with httpx.Client(base_url=url, timeout=DEADLINE_S) as client:
            while not stop.is_set():
                response = client.post("/v1/chat/completions", json=chat())
                answers.append(answer(response) if response.status_code == 200 else response.status_code)

    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    wait_for(lambda: len(answers) >= 20, "requests served by the old model")
    swapped = httpx.post(f"{url}/admin/tiers/light/model", json={"model_path": NEW}, timeout=DEADLINE_S)
    seen = len(answers)
    wait_for(lambda: len(answers) >= seen + 20, "requests served after the swap")
    stop.set()
    for thread in threads:
        thread.join(DEADLINE_S)
    assert swapped.status_code == 200, swapped.text
    assert [a for a in answers if not isinstance(a, str)] == []  # nothing refused
    assert set(answers) == {"[old-light] echo: hi", "[new-light] echo: hi"}
    assert answers[-1] == "[new-light] echo: hi"
    wait_for(lambda: registry.model("old-light").closed, "the old model unloaded")


def test_a_model_that_fails_to_load_leaves_the_old_one_serving(live: LiveServer) -> None:
    url = live.url
    failed = httpx.post(f"{url}/admin/tiers/light/model", json={"model_path": "/models/missing.gguf"})
    assert failed.status_code == 503
    assert (
        "new model could not be loaded: The light tier's model file does not exist" in failed.json()["error"]["message"]
    )
    assert answer(httpx.post(f"{url}/v1/chat/completions", json=chat(), timeout=DEADLINE_S)) == "[old-light] echo: hi"
    light = httpx.get(f"{url}/admin/status").json()["tiers"]["light"]
    assert (light["model"], light["source"]) == ("light/old-light", "env")


def test_the_cache_never_answers_for_the_old_model(live: LiveServer) -> None:
    url, body = live.url, chat(temperature=0)
    first = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=DEADLINE_S)
    again = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=DEADLINE_S)
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("MISS", "HIT")
    assert httpx.post(f"{url}/admin/tiers/light/model", json={"model_path": NEW}).status_code == 200
    after = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=DEADLINE_S)
    assert (after.headers["x-cache"], answer(after)) == ("MISS", "[new-light] echo: hi")
    assert httpx.delete(f"{url}/admin/tiers/light/model").status_code == 200  # back to the .env model
    back = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=DEADLINE_S)
    assert (back.headers["x-cache"], answer(back)) == ("HIT", "[old-light] echo: hi")


def test_a_tier_can_be_turned_on_with_its_settings_and_reset(live: LiveServer) -> None:
    url = live.url
    before = httpx.post(f"{url}/v1/chat/completions", json=chat("medium"), timeout=DEADLINE_S)
    assert before.headers["x-tier"] == "light"  # medium is off: the nearest tier serves it
    on = httpx.post(f"{url}/admin/tiers/medium/model", json={"model_path": "/models/med.gguf", "parallel": 2})
    assert on.status_code == 200, on.text
    assert on.json()["overrides"] == {"model_path": "/models/med.gguf", "parallel": "2"}
    served = httpx.post(f"{url}/v1/chat/completions", json=chat("medium"), timeout=DEADLINE_S)
    assert (served.headers["x-tier"], answer(served)) == ("medium", "[med] echo: hi")
    assert live.app.state.llm.settings.tiers["medium"].parallel == 2
    off = httpx.delete(f"{url}/admin/tiers/medium/model")
    assert off.json()["state"] == "off"
    after = httpx.post(f"{url}/v1/chat/completions", json=chat("medium"), timeout=DEADLINE_S)
    assert after.headers["x-tier"] == "light"


@pytest.mark.parametrize(
    ("tier", "body", "status", "message"),
    [
        ("light", {"n_ctx": "big"}, 400, "LIGHT_N_CTX has value 'big': not an integer"),
        ("light", {"model_path": NEW, "flux": 1}, 400, "the light tier has no setting 'flux'"),
        ("light", {"download_id": "nope"}, 404, "No download 'nope'"),
        ("light", {"model_path": "not-downloaded.gguf"}, 404, "No model 'not-downloaded.gguf' in MODELS_DIR"),
        ("light", {}, 400, "Give model_path, download_id or a tier setting"),
        ("giant", {"model_path": NEW}, 404, "No tier 'giant'"),
    ],
)
def test_bad_swaps_are_refused_naming_the_problem(
    live: LiveServer, tier: str, body: dict[str, Any], status: int, message: str
) -> None:
    refused = httpx.post(f"{live.url}/admin/tiers/{tier}/model", json=body)
    assert refused.status_code == status and message in refused.json()["error"]["message"], refused.text


def test_a_swap_survives_a_restart_until_it_is_reset(registry: NamedRegistry, tmp_path: Path) -> None:
    env = env_for(tmp_path)
    with LiveServer(create_app(load_settings(env), factories=registry.factories())) as first:
        assert httpx.post(f"{first.url}/admin/tiers/light/model", json={"model_path": NEW}).status_code == 200
    saved = json.loads((tmp_path / "models" / ".tier-overrides.json").read_text())
    assert saved["tiers"] == {"light": {"model_path": NEW}}
    with LiveServer(create_app(load_settings(env), factories=registry.factories())) as second:
        light = httpx.get(f"{second.url}/admin/status").json()["tiers"]["light"]
        assert (light["model"], light["source"]) == ("light/new-light", "admin")
        reset = httpx.delete(f"{second.url}/admin/tiers/light/model").json()
        assert (reset["model"], reset["source"]) == ("light/old-light", "env")
    assert json.loads((tmp_path / "models" / ".tier-overrides.json").read_text())["tiers"] == {}


def test_an_unusable_overrides_file_stops_the_start_up(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / ".tier-overrides.json").write_text('{"tiers": {"light": {"n_ctx": "big"}}}')
    with pytest.raises(ConfigError, match=r"tier-overrides\.json: LIGHT_N_CTX has value 'big'"):
        ModelManager(load_settings(env_for(tmp_path)), NamedRegistry().factories())


def test_a_request_resolved_before_the_switch_is_served_by_the_model_its_cache_key_names() -> None:
    registry = NamedRegistry()

    async def scenario() -> None:
        manager = ModelManager(
            load_settings(env_for(Path("/nonexistent"))), registry.factories(), store=OverrideStore(None)
        )
        old_config = manager.tiers["light"].config
        async with manager.lease("light", old_config) as old_worker:
            await manager.change_tier("light", {"model_path": NEW})
            async with manager.lease("light", old_config) as worker:
                assert worker is old_worker  # the old model still runs: it serves what was resolved for it
            async with manager.lease("light", manager.tiers["light"].config) as worker:
                assert worker is not old_worker
        await wait_for_async(lambda: registry.model("old-light").closed, "the old model unloaded")

        async def late_request() -> bool:
            async with manager.lease("light", old_config) as worker:
                assert worker is manager.tiers["light"].worker  # the new model serves it ...
            return cache._skip_storing.get()  # ... and nothing it computed goes under the old model's key

        assert await asyncio.ensure_future(late_request())
        assert not cache._skip_storing.get()
        await manager.close()

    asyncio.run(scenario())


# ---------------------------------------------------------------- pinning and priority under MAX_MEMORY_GB


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def budget_manager(extra: dict[str, str], clock: Clock) -> ModelManager:
    env = {
        "LIGHT_MODEL_PATH": "/m/light.gguf",
        "MEDIUM_MODEL_PATH": "/m/medium.gguf",
        "HEAVY_MODEL_PATH": "/m/heavy.gguf",
        "EMBEDDING_MODEL_PATH": "",
        "RERANKER_MODEL_PATH": "",
        "SPEECH_MODEL_PATH": "",
        "MAX_MEMORY_GB": "2",
        "LIGHT_QUEUE_TIMEOUT": "0",
        "MEDIUM_QUEUE_TIMEOUT": "0",
        "HEAVY_QUEUE_TIMEOUT": "0",
        **extra,
    }
    estimator: Callable[[TierConfig], int] = lambda tier: GIB  # noqa: E731
    return ModelManager(
        load_settings(env), FakeRegistry().factories(), clock=clock, estimator=estimator, store=OverrideStore(None)
    )


async def use(manager: ModelManager, tier: str, clock: Clock) -> None:
    async with manager.lease(tier):
        pass
    clock.now += 10


def states(manager: ModelManager) -> dict[str, str]:
    return {name: rt.state for name, rt in manager.tiers.items()}


def test_a_pinned_tier_is_never_evicted_for_memory() -> None:
    async def scenario() -> None:
        clock = Clock()
        manager = budget_manager({"LIGHT_PIN": "true"}, clock)
        await use(manager, "light", clock)  # least recently used, but pinned
        await use(manager, "medium", clock)
        await use(manager, "heavy", clock)
        assert states(manager) == {"light": READY, "medium": UNLOADED, "heavy": READY}
        status = manager.detailed_status("light")
        assert (status["pin"], status["priority"]) == (True, 0)
        await manager.close()

    asyncio.run(scenario())


def test_lower_priority_idle_tiers_are_evicted_first() -> None:
    async def scenario() -> None:
        clock = Clock()
        manager = budget_manager({"LIGHT_PRIORITY": "5", "MEDIUM_PRIORITY": "-1"}, clock)
        await use(manager, "light", clock)  # the least recently used ...
        await use(manager, "medium", clock)  # ... but medium's priority is lower
        await use(manager, "heavy", clock)
        assert states(manager) == {"light": READY, "medium": UNLOADED, "heavy": READY}
        await use(manager, "medium", clock)  # now light (5) outranks heavy (0): heavy goes
        assert states(manager) == {"light": READY, "medium": READY, "heavy": UNLOADED}
        await manager.close()

    asyncio.run(scenario())


def test_when_only_pinned_tiers_could_make_room_the_load_is_a_503_saying_so() -> None:
    async def scenario() -> None:
        clock = Clock()
        manager = budget_manager({"LIGHT_PIN": "true", "MEDIUM_PIN": "true"}, clock)
        await use(manager, "light", clock)
        await use(manager, "medium", clock)
        with pytest.raises(Exception, match="busy or pinned"):
            await use(manager, "heavy", clock)
        await manager.close()

    asyncio.run(scenario())


# ---------------------------------------------------------------- EMBEDDING_MODE


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LIGHT_EMBEDDING_MODE": "true"}, "LIGHT_EMBEDDING_MODE has value 'true': a chat tier does not also answer"),
        ({"RERANKER_EMBEDDING_MODE": "yes"}, "RERANKER_EMBEDDING_MODE has value 'yes': a rerank tier does not"),
        (
            {"EMBEDDING_EMBEDDING_MODE": "false"},
            "EMBEDDING_EMBEDDING_MODE has value 'false': the embedding tier always",
        ),
    ],
)
def test_embedding_mode_is_never_ignored(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(env)


def test_embedding_mode_values_that_match_what_the_tiers_do_are_accepted() -> None:
    settings = load_settings({"EMBEDDING_EMBEDDING_MODE": "true", "LIGHT_EMBEDDING_MODE": "false"})
    assert settings.tiers["embedding"].embedding_mode and not settings.tiers["light"].embedding_mode


# ---------------------------------------------------------------- the dashboard's models panel (Chromium)


@pytest.fixture
def chromium_page() -> Iterator[tuple[Any, list[str]]]:
    from tests.test_dashboard_browser import CHROMIUM_FLAGS, chromium_path

    executable = chromium_path()
    if executable is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does this in CI)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (requirements-dev.txt)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=CHROMIUM_FLAGS)
        context = browser.new_context(viewport={"width": 1280, "height": 1000})
        context.set_default_timeout(int(DEADLINE_S * 1000))
        page = context.new_page()
        errors: list[str] = []
        page.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
        yield page, errors
        browser.close()


def test_the_dashboard_assigns_a_local_model_to_a_tier_and_resets_it(
    registry: NamedRegistry, tmp_path: Path, chromium_page: tuple[Any, list[str]]
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "spare.gguf").write_bytes(b"GGUF")
    page, errors = chromium_page
    with LiveServer(create_app(load_settings(env_for(tmp_path)), factories=registry.factories())) as live:
        page.goto(live.url + "/admin")
        page.wait_for_selector("#models tr[data-model='spare.gguf']")
        page.click("#models tr[data-model='spare.gguf'] button:text('use')")
        page.select_option("#swap-tier", "light")
        page.click("#swap-go")
        page.wait_for_function("() => document.getElementById('swap-msg').textContent.startsWith('light: light/spare')")
        page.wait_for_function(
            "() => document.querySelector('#tiers tr[data-tier=light] td.model').textContent"
            ".includes('light/spare (set by admin)')"
        )
        page.wait_for_function(
            "() => document.querySelector(\"#models tr[data-model='spare.gguf']\").children[4].textContent === 'light'"
        )
        assert (
            answer(httpx.post(f"{live.url}/v1/chat/completions", json=chat(), timeout=DEADLINE_S)) == "[spare] echo: hi"
        )
        page.click("#swap-reset")
        page.wait_for_function("() => document.getElementById('swap-msg').textContent.startsWith('light: light/old')")
    assert errors == []
