"""A swap under a MAX_MEMORY_GB that cannot hold the old and the new model together (manager/swap.py):
the old model drains and unloads, new requests wait, then the new one loads; if it fails, the old one is
loaded again and the answer says why. The model files are real (small) so the budget counts them."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from config import Settings, TierConfig, load_settings
from server import create_app
from tests.conftest import LiveServer
from tests.fakes import FakeChat
from tests.test_admin import StreamReader
from tests.test_swap import NamedRegistry, answer, chat, env_for
from tests.waiting import DEADLINE_S, wait_for

MODEL_BYTES = 700  # each model file; the budget below holds one, not two
BUDGET_GB = str(1000 / 1024**3)


class WatchedRegistry(NamedRegistry):
    """Also notes, at every load, which earlier models were still open (never closed)."""

    def __init__(self) -> None:
        super().__init__()
        self.open_at_load: list[list[str]] = []

    def _load_chat(self, tier: TierConfig, settings: Settings) -> FakeChat:
        self.open_at_load.append([Path(m.tier.model_path).stem for m in self.loaded if not m.closed])
        return super()._load_chat(tier, settings)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    out = {}
    for stem in ("old-light", "new-light", "missing-light"):
        path = tmp_path / f"{stem}.gguf"
        path.write_bytes(b"\0" * MODEL_BYTES)
        out[stem] = str(path)
    return out


@pytest.fixture
def registry() -> WatchedRegistry:
    return WatchedRegistry()


@pytest.fixture
def live(registry: WatchedRegistry, files: dict[str, str], tmp_path: Path) -> Iterator[LiveServer]:
    env = env_for(tmp_path, MAX_MEMORY_GB=BUDGET_GB, LIGHT_MODEL_PATH=files["old-light"])
    with LiveServer(create_app(load_settings(env), factories=registry.factories())) as server:
        yield server


def test_the_old_model_drains_and_unloads_before_the_new_one_loads(
    live: LiveServer, registry: WatchedRegistry, files: dict[str, str]
) -> None:
    url, manager = live.url, live.app.state.llm.manager
    assert answer(httpx.post(f"{url}/v1/chat/completions", json=chat(), timeout=DEADLINE_S)) == "[old-light] echo: hi"
    old = registry.model("old-light")
    old.hold_gate = threading.Event()
    stream = StreamReader(f"{url}/v1/chat/completions", chat(content="long story"))
    wait_for(lambda: manager.tiers["light"].in_flight == 1, "a stream on the old model")

    swap: dict[str, httpx.Response] = {}
    swapper = threading.Thread(
        target=lambda: swap.update(
            r=httpx.post(f"{url}/admin/tiers/light/model", json={"model_path": files["new-light"]}, timeout=DEADLINE_S)
        )
    )
    swapper.start()
    wait_for(lambda: manager.gates.closed("light"), "the tier closed to new requests")
    late: dict[str, httpx.Response] = {}
    waiter = threading.Thread(
        target=lambda: late.update(r=httpx.post(f"{url}/v1/chat/completions", json=chat(), timeout=DEADLINE_S))
    )
    waiter.start()
    wait_for(lambda: manager.gates.waiting.get("light") == 1, "a new request waiting for the new model")
    status = httpx.get(f"{url}/admin/status").json()["tiers"]["light"]
    assert status["replacing_in_place"] == {"waiting": 1} and status["model"].endswith("old-light")
    assert [Path(m.tier.model_path).stem for m in registry.loaded] == ["old-light"]  # the new one waits for memory
    assert not old.closed

    old.hold_gate.set()  # the stream finishes on the old model; then it unloads and the new one loads
    swapper.join(DEADLINE_S)
    waiter.join(DEADLINE_S)
    assert swap["r"].status_code == 200, swap["r"].text
    assert swap["r"].json()["model"] == "light/new-light"
    assert answer(late["r"]) == "[new-light] echo: hi"
    assert stream.finished.wait(DEADLINE_S)
    text = "".join(
        e["choices"][0]["delta"].get("content") or "" for e in stream.events if e != "[DONE]" and e["choices"]
    )
    assert text == "[old-light] echo: long story"
    assert registry.open_at_load == [[], []]  # the new model loaded with nothing else open
    assert not manager.gates.closed("light")


def test_a_new_model_that_fails_to_load_brings_the_old_one_back(
    live: LiveServer, registry: WatchedRegistry, files: dict[str, str]
) -> None:
    url = live.url
    assert answer(httpx.post(f"{url}/v1/chat/completions", json=chat(), timeout=DEADLINE_S)) == "[old-light] echo: hi"
    failed = httpx.post(
        f"{url}/admin/tiers/light/model", json={"model_path": files["missing-light"]}, timeout=DEADLINE_S
    )
    assert failed.status_code == 503, failed.text
    message = failed.json()["error"]["message"]
    assert "did not fit beside the old one under MAX_MEMORY_GB, so the old one was unloaded first" in message
    assert "The light tier's model file does not exist" in message and "the old model is loaded again" in message
    light = httpx.get(f"{url}/admin/status").json()["tiers"]["light"]
    assert (light["state"], light["model"], light["source"]) == ("ready", "light/old-light", "env")
    assert answer(httpx.post(f"{url}/v1/chat/completions", json=chat(), timeout=DEADLINE_S)) == "[old-light] echo: hi"
    assert [Path(m.tier.model_path).stem for m in registry.loaded] == ["old-light", "old-light"]


def test_a_model_too_big_even_alone_is_refused_without_touching_the_old_one(
    live: LiveServer, registry: WatchedRegistry, tmp_path: Path
) -> None:
    url = live.url
    assert answer(httpx.post(f"{url}/v1/chat/completions", json=chat(), timeout=DEADLINE_S)) == "[old-light] echo: hi"
    big = tmp_path / "big-light.gguf"
    big.write_bytes(b"\0" * 4 * MODEL_BYTES)
    refused = httpx.post(f"{url}/admin/tiers/light/model", json={"model_path": str(big)}, timeout=DEADLINE_S)
    assert refused.status_code == 503 and "over MAX_MEMORY_GB" in refused.json()["error"]["message"]
    assert not registry.model("old-light").closed
