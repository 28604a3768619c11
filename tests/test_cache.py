"""Response cache: key derivation, memory and disk tiers, disk safety, and the HTTP behaviour."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import logging
import os
import sqlite3
import stat
from pathlib import Path
from typing import Any

import diskcache
import pytest

import cache as cache_mod
from api import schemas
from api.schemas import ChatCompletionRequest
from cache import ResponseCache
from config import TierConfig, load_settings
from core.cache_keys import (
    IGNORED_FIELDS,
    KEYED_FIELDS,
    is_deterministic,
    normalise_request,
    request_key,
    text_keys,
    unclassified_fields,
    unclassified_tier_fields,
)
from tests.conftest import FAKE_ENV
from tests.fakes import FakeRegistry

CHAT = {"model": "light", "messages": [{"role": "user", "content": "hi"}], "temperature": 0}


def request_schemas() -> list[type[Any]]:
    found: list[type[Any]] = []
    pending = list(schemas._Request.__subclasses__())
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if cls.__module__ == schemas.__name__ and not cls.__name__.startswith("_"):
            found.append(cls)
    return found


def settings(tmp_path: Path, **extra: str) -> Any:
    return load_settings({**FAKE_ENV, "CACHE_DIR": str(tmp_path / "cache"), **extra})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------- keys


def test_every_request_field_is_classified_as_keyed_or_ignored() -> None:
    found = request_schemas()
    assert {cls.__name__ for cls in found} >= {"ChatCompletionRequest", "CompletionRequest"}
    for cls in found:
        assert unclassified_fields(cls) == set(), f"{cls.__name__}: classify these fields in cache_keys.KEYED_FIELDS"
        assert KEYED_FIELDS[cls.__name__] <= set(cls.model_fields), f"{cls.__name__}: stale keyed names"


def test_a_new_unclassified_field_is_caught() -> None:
    class ChatCompletionRequest(schemas.ChatCompletionRequest):  # same name, one extra field
        reasoning_effort: str | None = None

    assert unclassified_fields(ChatCompletionRequest) == {"reasoning_effort"}


def test_every_tier_setting_is_classified_as_keyed_or_operational() -> None:
    assert unclassified_tier_fields() == set(), "add the TierConfig field to config.TIER_KEYS with its cache_key"


def test_a_new_unclassified_tier_setting_is_caught() -> None:
    @dataclasses.dataclass(frozen=True)
    class Wider(TierConfig):
        min_p: float = 0.0

    assert unclassified_tier_fields(Wider) == {"min_p"}


def test_normalised_request_holds_exactly_the_keyed_fields() -> None:
    body = ChatCompletionRequest.model_validate({**CHAT, "stream": True, "user": "u1"})
    assert set(normalise_request(body)) == KEYED_FIELDS["ChatCompletionRequest"]
    assert not IGNORED_FIELDS & set(normalise_request(body))


def _key(tier: Any, **changes: Any) -> str:
    body = ChatCompletionRequest.model_validate({**CHAT, **changes})
    return request_key("chat.completions", tier, normalise_request(body))


def test_ignored_fields_do_not_change_the_key_and_keyed_ones_do(tmp_path: Path) -> None:
    tier = settings(tmp_path).tiers["light"]
    base = _key(tier)
    assert _key(tier, stream=True, user="someone", stream_options={"include_usage": True}) == base
    for change in (
        {"temperature": 0.5},
        {"seed": 3},
        {"max_tokens": 7},
        {"stop": ["x"]},
        {"model": "gpt-3.5-turbo"},
        {"messages": [{"role": "user", "content": "hello"}]},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
    ):
        assert _key(tier, **change) != base, change


def test_the_key_follows_the_model_file_and_the_tier_settings(tmp_path: Path) -> None:
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF-one")
    off = {"EMBEDDING_MODEL_PATH": "", "RERANKER_MODEL_PATH": ""}
    tier = load_settings({"LIGHT_MODEL_PATH": str(model), **off}).tiers["light"]
    first = _key(tier)
    assert _key(tier) == first
    model.write_bytes(b"GGUF-two-longer")  # a swapped model file
    assert _key(tier) != first
    warmer = load_settings({"LIGHT_MODEL_PATH": str(model), "LIGHT_TEMPERATURE": "0.2", **off})
    assert _key(warmer.tiers["light"]) != _key(tier)
    longer_ttl = load_settings({"LIGHT_MODEL_PATH": str(model), "LIGHT_TTL": "60", **off})
    assert _key(longer_ttl.tiers["light"]) == _key(tier)


def test_only_explicitly_deterministic_requests_are_cacheable() -> None:
    def parse(**fields: Any) -> ChatCompletionRequest:
        return ChatCompletionRequest.model_validate({"model": "light", "messages": CHAT["messages"], **fields})

    assert not is_deterministic(parse())
    assert not is_deterministic(parse(temperature=0.7))
    assert is_deterministic(parse(temperature=0))
    assert is_deterministic(parse(temperature=0.9, seed=1))


def test_text_keys_are_per_text_and_depend_on_options(tmp_path: Path) -> None:
    tier = settings(tmp_path).tiers["light"]
    a, b, a2 = text_keys("embeddings", tier, ["a", "b", "a"], {"dimensions": None})
    assert a == a2 and a != b
    assert text_keys("embeddings", tier, ["a"], {"dimensions": 8})[0] != a


# ---------------------------------------------------------------- memory tier


def test_get_many_returns_values_in_order_with_gaps_for_misses(tmp_path: Path) -> None:
    async def scenario() -> None:
        cache = ResponseCache(settings(tmp_path))
        await cache.put_many({"k1": [1.0, 2.0], "k3": {"x": 1}})
        assert await cache.get_many(["k1", "k2", "k3"]) == [[1.0, 2.0], None, {"x": 1}]
        assert cache.stats()["hits"] == 2 and cache.stats()["misses"] == 1

    asyncio.run(scenario())


def test_a_batch_with_known_texts_computes_only_the_new_ones_in_order(tmp_path: Path) -> None:
    tier = settings(tmp_path).tiers["light"]
    computed: list[list[str]] = []

    async def embed(texts: list[str]) -> list[list[float]]:
        computed.append(texts)
        return [[float(len(t)), float(ord(t[0]))] for t in texts]

    async def scenario() -> None:
        cache = ResponseCache(settings(tmp_path, CACHE_PERSIST_TO_DISK="true"))
        first = ["apple", "kiwi"]
        values, hits = await cache.get_or_compute_many(text_keys("e", tier, first, {}), first, embed)
        assert (values, hits) == ([[5.0, 97.0], [4.0, 107.0]], 0)
        batch = ["fig", "kiwi", "fig", "apple", "date"]
        values, hits = await cache.get_or_compute_many(text_keys("e", tier, batch, {}), batch, embed)
        assert values == [[3.0, 102.0], [4.0, 107.0], [3.0, 102.0], [5.0, 97.0], [4.0, 100.0]]
        assert hits == 2
        assert computed == [["apple", "kiwi"], ["fig", "date"]]  # each new text once, known ones never
        cache.close()

    asyncio.run(scenario())


def test_memory_entries_expire_after_the_ttl(tmp_path: Path) -> None:
    clock = Clock()

    async def scenario() -> None:
        cache = ResponseCache(settings(tmp_path, CACHE_TTL_SECONDS="10"), clock=clock)
        await cache.put("k", "v")
        clock.now += 9
        assert await cache.get("k") == "v"
        clock.now += 2
        assert await cache.get("k") is None

    asyncio.run(scenario())


def test_memory_tier_is_lru_bounded(tmp_path: Path) -> None:
    async def scenario() -> None:
        cache = ResponseCache(settings(tmp_path, CACHE_MAX_SIZE="2"))
        await cache.put("a", 1)
        await cache.put("b", 2)
        assert await cache.get("a") == 1  # a is now the most recent
        await cache.put("c", 3)
        assert await cache.get_many(["a", "b", "c"]) == [1, None, 3]

    asyncio.run(scenario())


def test_disabled_cache_stores_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        cache = ResponseCache(settings(tmp_path, ENABLE_CACHE="false", CACHE_PERSIST_TO_DISK="true"))
        await cache.put("k", 1)
        assert await cache.get("k") is None
        assert not (tmp_path / "cache").exists()

    asyncio.run(scenario())


# ---------------------------------------------------------------- disk tier


def disk_settings(tmp_path: Path, **extra: str) -> Any:
    return settings(tmp_path, CACHE_PERSIST_TO_DISK="true", **extra)


def test_disk_entries_survive_a_restart_in_a_0700_directory(tmp_path: Path) -> None:
    async def scenario() -> None:
        first = ResponseCache(disk_settings(tmp_path))
        await first.put("k", {"answer": 42})
        first.close()
        second = ResponseCache(disk_settings(tmp_path))
        assert await second.get("k") == {"answer": 42}
        second.close()

    asyncio.run(scenario())
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700


def _raw_disk(tmp_path: Path) -> diskcache.Cache:
    return diskcache.Cache(str(tmp_path / "cache"))


@pytest.mark.parametrize("size", [10, 100_000], ids=["in-sqlite", "in-file"])
def test_an_entry_stored_under_another_key_is_a_miss_and_deleted(tmp_path: Path, size: int) -> None:
    async def scenario() -> None:
        cache = ResponseCache(disk_settings(tmp_path, CACHE_MAX_SIZE="0"))
        with _raw_disk(tmp_path) as raw:
            raw.set("victim", cache_mod.encode_entry("other-key", "x" * size))
        assert await cache.get("victim") is None
        with _raw_disk(tmp_path) as raw:
            assert "victim" not in raw
        cache.close()

    asyncio.run(scenario())


def test_a_truncated_entry_file_is_a_miss_and_deleted(tmp_path: Path) -> None:
    async def scenario() -> None:
        cache = ResponseCache(disk_settings(tmp_path, CACHE_MAX_SIZE="0"))
        await cache.put("big", "y" * 100_000)  # over diskcache's 32 KiB: lives in its own file
        files = list((tmp_path / "cache").rglob("*.val"))
        assert len(files) == 1
        files[0].write_bytes(files[0].read_bytes()[:5000])
        assert await cache.get("big") is None
        assert await cache.get("big") is None
        assert cache.stats()["disk_entries"] == 0
        cache.close()

    asyncio.run(scenario())


class Planted:
    """Unpickling this object opens (creates) a marker file: proof that pickle data was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("size", [10, 100_000], ids=["in-sqlite", "in-file"])
def test_a_planted_pickle_is_never_unpickled(tmp_path: Path, size: int) -> None:
    marker = tmp_path / "pwned"

    async def scenario() -> None:
        cache = ResponseCache(disk_settings(tmp_path, CACHE_MAX_SIZE="0"))
        with _raw_disk(tmp_path) as raw:
            raw.reset("disk_min_file_size", 0 if size > 1000 else 2**20)
            raw.set("k", [Planted(marker), "pad" * size])  # default Disk: stored as a pickle
        assert await cache.get("k") is None
        with _raw_disk(tmp_path) as raw:
            assert "k" not in raw
        cache.close()

    asyncio.run(scenario())
    assert not marker.exists()


def test_a_full_disk_serves_from_memory_with_one_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        cache = ResponseCache(disk_settings(tmp_path))

        def disk_full(*args: Any, **kwargs: Any) -> None:
            raise OSError(errno.ENOSPC, "No space left on device")

        cache.disk.set = disk_full  # type: ignore[union-attr, method-assign]
        with caplog.at_level(logging.WARNING, logger="llmservice.cache"):
            await cache.put("a", 1)
            await cache.put("b", 2)
        assert await cache.get_many(["a", "b"]) == [1, 2]
        cache.close()

    asyncio.run(scenario())
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "No space left" in warnings[0].getMessage()


def test_a_broken_cache_database_means_running_without_the_disk(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "cache.db").write_bytes(b"this is not a sqlite database" * 100)

    async def scenario() -> None:
        with caplog.at_level(logging.WARNING, logger="llmservice.cache"):
            cache = ResponseCache(disk_settings(tmp_path))
        assert cache.disk is None
        await cache.put("k", 1)
        assert await cache.get("k") == 1

    asyncio.run(scenario())
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


# A row whose filename was rewritten to name a file outside the cache directory, each way a path can escape.
ESCAPES = ["relative", "absolute", "dotdot-after-a-valid-prefix", "symlinked-value-file"]


def _tamper_row(tmp_path: Path, key: str, escape: str, outside: Path) -> None:
    folder = tmp_path / "cache"
    with sqlite3.connect(folder / "cache.db") as db:
        ((filename,),) = db.execute("SELECT filename FROM Cache WHERE key = ?", (key,)).fetchall()
        assert filename is not None  # the value lives in its own file
        if escape == "symlinked-value-file":
            (folder / filename).unlink()
            (folder / filename).symlink_to(outside)
            return
        forged = {
            "relative": os.path.relpath(outside, folder),
            "absolute": str(outside),
            "dotdot-after-a-valid-prefix": f"{Path(filename).parent}/../../{os.path.relpath(outside, folder)}",
        }[escape]
        db.execute("UPDATE Cache SET filename = ? WHERE key = ?", (forged, key))


def _outside_file(tmp_path: Path, key: str) -> tuple[Path, bytes]:
    """A file outside the cache holding a valid entry for `key`: served, it would be a hit on "planted"."""
    outside = tmp_path / "elsewhere" / "secret.val"
    outside.parent.mkdir()
    content = cache_mod.encode_entry(key, "planted")
    outside.write_bytes(content)
    return outside, content


@pytest.mark.parametrize("escape", ESCAPES)
def test_a_row_naming_a_file_outside_the_cache_is_a_miss_and_the_file_is_neither_read_nor_deleted(
    tmp_path: Path, escape: str
) -> None:
    outside, content = _outside_file(tmp_path, "k")

    async def scenario() -> None:
        cache = ResponseCache(disk_settings(tmp_path, CACHE_MAX_SIZE="0"))
        await cache.put("k", "y" * 100_000)  # over diskcache's 32 KiB: lives in its own file
        _tamper_row(tmp_path, "k", escape, outside)
        assert await cache.get("k") is None
        assert cache.stats()["disk_entries"] == 0  # the bad row was dropped
        await cache.put("k", "fresh")  # and the cache keeps working
        assert await cache.get("k") == "fresh"
        cache.close()

    asyncio.run(scenario())
    assert outside.read_bytes() == content


@pytest.mark.parametrize("escape", ESCAPES)
def test_deleting_or_clearing_tampered_rows_never_deletes_outside_the_cache(tmp_path: Path, escape: str) -> None:
    outside, content = _outside_file(tmp_path, "a")

    async def scenario() -> None:
        cache = ResponseCache(disk_settings(tmp_path, CACHE_MAX_SIZE="0"))
        await cache.put_many({"a": "y" * 100_000, "b": "z" * 100_000})
        _tamper_row(tmp_path, "a", escape, outside)
        assert cache.disk is not None
        assert cache.disk.delete("a")
        _tamper_row(tmp_path, "b", escape, outside)
        assert (await cache.clear())["removed"] == 1
        assert cache.stats()["disk_entries"] == 0
        cache.close()

    asyncio.run(scenario())
    assert outside.read_bytes() == content


# ---------------------------------------------------------------- over HTTP


def inserted(registry: FakeRegistry) -> int:
    model = registry.models.get("light")
    return len(model.inserted) if model is not None else 0


def sse_events(text: str) -> list[Any]:
    events = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block.removeprefix("data: ")
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def contents(events: list[Any]) -> list[str]:
    return [e["choices"][0]["delta"].get("content", "") for e in events if e != "[DONE]" and e.get("choices")]


def test_hit_and_miss_headers_and_the_model_runs_once(make_client: Any, fake_registry: FakeRegistry) -> None:
    client = make_client()
    first = client.post("/v1/chat/completions", json=CHAT)
    second = client.post("/v1/chat/completions", json={**CHAT, "user": "another"})
    assert first.status_code == second.status_code == 200
    assert (first.headers["x-cache"], second.headers["x-cache"]) == ("MISS", "HIT")
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["usage"] == first.json()["usage"]
    assert second.json()["id"] != first.json()["id"]
    assert inserted(fake_registry) == 1


def test_no_cache_header_bypasses_the_lookup(make_client: Any, fake_registry: FakeRegistry) -> None:
    client = make_client()
    client.post("/v1/chat/completions", json=CHAT)
    bypass = client.post("/v1/chat/completions", json=CHAT, headers={"Cache-Control": "no-cache, max-age=0"})
    assert bypass.headers["x-cache"] == "MISS"
    assert inserted(fake_registry) == 2
    assert client.post("/v1/chat/completions", json=CHAT).headers["x-cache"] == "HIT"  # refreshed, not dropped


def test_no_store_neither_reads_nor_writes(make_client: Any, fake_registry: FakeRegistry) -> None:
    client = make_client()
    first = client.post("/v1/chat/completions", json=CHAT, headers={"Cache-Control": "no-store"})
    assert first.headers["x-cache"] == "MISS"
    assert client.get("/admin/cache").json()["entries"] == 0
    assert client.post("/v1/chat/completions", json=CHAT).headers["x-cache"] == "MISS"
    assert inserted(fake_registry) == 2


def test_sampled_requests_are_never_cached(make_client: Any, fake_registry: FakeRegistry) -> None:
    client = make_client()
    body = {k: v for k, v in CHAT.items() if k != "temperature"}
    for _ in range(2):
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200 and "x-cache" not in response.headers
    assert inserted(fake_registry) == 2


def test_errors_are_never_cached(make_client: Any, fake_registry: FakeRegistry) -> None:
    client = make_client()
    body = {**CHAT, "messages": [{"role": "user", "content": "BOOM"}]}
    for _ in range(2):
        assert client.post("/v1/chat/completions", json=body).status_code == 500
    assert client.get("/admin/cache").json()["entries"] == 0


def test_a_stream_fills_the_cache_and_replays_identically(make_client: Any, fake_registry: FakeRegistry) -> None:
    client = make_client()
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    live = client.post("/v1/chat/completions", json=body)
    replay = client.post("/v1/chat/completions", json=body)
    assert (live.headers["x-cache"], replay.headers["x-cache"]) == ("MISS", "HIT")
    assert replay.headers["content-type"].startswith("text/event-stream")
    live_events, replay_events = sse_events(live.text), sse_events(replay.text)
    assert contents(replay_events) == contents(live_events) and len(contents(live_events)) > 3
    assert replay_events[-1] == "[DONE]"
    assert replay_events[-2]["usage"] == live_events[-2]["usage"]
    plain = client.post("/v1/chat/completions", json=CHAT)
    assert plain.headers["x-cache"] == "HIT"
    assert plain.json()["choices"][0]["message"]["content"] == "".join(contents(live_events))
    assert inserted(fake_registry) == 1


def test_a_plain_result_replays_as_a_stream(make_client: Any, fake_registry: FakeRegistry) -> None:
    client = make_client()
    plain = client.post("/v1/completions", json={"model": "light", "prompt": "abc", "seed": 5})
    streamed = client.post("/v1/completions", json={"model": "light", "prompt": "abc", "seed": 5, "stream": True})
    assert streamed.headers["x-cache"] == "HIT"
    events = sse_events(streamed.text)
    text = "".join(e["choices"][0]["text"] for e in events if e != "[DONE]" and e["choices"])
    assert text == plain.json()["choices"][0]["text"]
    assert events[-2]["choices"][0]["finish_reason"] == "stop" and events[-1] == "[DONE]"
    assert inserted(fake_registry) == 1


def test_the_disk_cache_serves_after_a_restart_without_loading_the_model(make_client: Any, tmp_path: Path) -> None:
    env = {**FAKE_ENV, "CACHE_PERSIST_TO_DISK": "true", "CACHE_DIR": str(tmp_path / "c")}
    before, after = FakeRegistry(), FakeRegistry()
    first = make_client(env, registry=before)
    answer = first.post("/v1/chat/completions", json=CHAT).json()
    first.__exit__(None, None, None)  # lifespan shutdown closes the disk cache
    second = make_client(env, registry=after)
    again = second.post("/v1/chat/completions", json=CHAT)
    assert again.headers["x-cache"] == "HIT"
    assert again.json()["choices"] == answer["choices"]
    assert after.loads == {}


def test_requests_succeed_when_the_disk_is_full(make_client: Any, tmp_path: Path) -> None:
    env = {**FAKE_ENV, "CACHE_PERSIST_TO_DISK": "true", "CACHE_DIR": str(tmp_path / "c")}
    client = make_client(env)

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    client.app.state.llm.cache.disk.set = disk_full
    client.app.state.llm.cache.disk.get = disk_full
    for content in ("one", "two"):
        body = {**CHAT, "messages": [{"role": "user", "content": content}]}
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200
        assert response.json()["choices"][0]["message"]["content"] == f"echo: {content}"


def test_cache_disabled_means_no_header_and_no_reuse(make_client: Any, fake_registry: FakeRegistry) -> None:
    client = make_client({**FAKE_ENV, "ENABLE_CACHE": "false"})
    for _ in range(2):
        assert "x-cache" not in client.post("/v1/chat/completions", json=CHAT).headers
    assert inserted(fake_registry) == 2


def test_cache_directory_is_private_even_with_a_loose_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        ResponseCache(disk_settings(tmp_path)).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700


def test_keys_made_by_earlier_versions_stay_valid() -> None:
    """Stored entries survive upgrades: these two keys were derived by the code before the chat-turn
    seam, the remote pools and sessions. A change here strands every disk entry: bump SCHEMA_VERSION
    deliberately instead, or keep new fields out of the key while they are unset."""
    from api.schemas import ChatCompletionRequest, CompletionRequest
    from config import load_settings
    from core.cache_keys import IGNORED_FIELDS, request_key

    env = {"LIGHT_MODEL_PATH": "/models/fake-light.gguf", "EMBEDDING_MODEL_PATH": "", "RERANKER_MODEL_PATH": ""}
    tier = load_settings(env).tiers["light"]
    chat = ChatCompletionRequest(model="light", messages=[{"role": "user", "content": "hi"}], temperature=0)
    completion = CompletionRequest(model="light", prompt="hi", seed=3)

    def key(endpoint: str, body: ChatCompletionRequest | CompletionRequest) -> str:
        wire = body.model_dump(mode="json")  # as chat/recording.py derives it from the turn's wire
        return request_key(endpoint, tier, {k: v for k, v in wire.items() if k not in IGNORED_FIELDS})

    assert key("chat.completions", chat) == "496a08687e28c9fdb197747a4a4556ffed6089ccebe948d70ffef9296bfca7db"
    assert key("completions", completion) == "a26523e75104b03ddbdb5fa7ef4355652d53a238bf1f700c036350c7aa7b3390"
