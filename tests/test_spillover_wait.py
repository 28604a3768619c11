"""Spill-over on the expected wait (`{TIER}_SPILLOVER_AFTER_MS`): a local tier with its slots taken sends a
request to its upstreams when the turns ahead of it would take longer than the setting, estimated from
how long its recent local turns lasted (remote/spillover.py). Fakes for both sides, a stepped clock."""

from __future__ import annotations

import asyncio
from concurrent.futures import Future
from dataclasses import dataclass, field
from types import SimpleNamespace

from config import load_settings
from core.errors import Overloaded
from core.turns import JsonValue, Turn, TurnRequest
from remote.spillover import SpillOver

REQUEST = TurnRequest(kind="chat", sampling=SimpleNamespace())  # type: ignore[arg-type]


@dataclass
class Local:
    active: int = 0
    queued: int = 0
    parallel: int = 2
    full: bool = False
    started: list[Turn] = field(default_factory=list)
    ready: Future[None] = field(default_factory=Future)

    def status(self) -> dict[str, JsonValue]:
        return {"active": self.active, "queued": self.queued, "parallel": self.parallel}

    async def start_turn(self, request: TurnRequest) -> Turn:
        if self.full:
            raise Overloaded("queue full")
        turn = Turn(choices=[], prompt_tokens=1)
        self.started.append(turn)
        return turn


@dataclass
class Remote:
    config: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(name="light"))
    started: int = 0

    async def start_turn(self, request: TurnRequest) -> Turn:
        self.started += 1
        return Turn(choices=[], prompt_tokens=1, upstream="http://gpu1")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def backend(after_ms: float) -> tuple[SpillOver, Local, Remote, Clock]:
    local, remote, clock = Local(), Remote(), Clock()
    return SpillOver(local, remote, after_ms, clock), local, remote, clock  # type: ignore[arg-type]


def run_local_turn(spill: SpillOver, clock: Clock, seconds: float) -> None:
    async def scenario() -> None:
        turn = await spill.start_turn(REQUEST)
        assert turn.upstream is None
        clock.now += seconds
        await turn.aclose()

    asyncio.run(scenario())


def test_the_wait_is_the_turns_ahead_parallel_at_a_time_each_as_long_as_recent_ones() -> None:
    spill, local, _, clock = backend(after_ms=500)
    assert spill.expected_wait() == 0.0  # nothing known before a local turn ends
    run_local_turn(spill, clock, 2.0)
    assert spill.turn_seconds == 2.0
    run_local_turn(spill, clock, 1.0)
    assert spill.turn_seconds == 0.8 * 2.0 + 0.2 * 1.0  # recent turns weigh more
    local.active, local.queued = 1, 0
    assert spill.expected_wait() == 0.0  # a slot is free
    local.active, local.queued = 2, 0
    assert spill.expected_wait() == spill.turn_seconds  # the next slot frees when a running turn ends
    local.active, local.queued = 2, 3  # four ahead, two at a time
    assert spill.expected_wait() == 2 * spill.turn_seconds


def test_a_request_spills_when_its_slot_is_further_away_than_the_setting() -> None:
    spill, local, remote, clock = backend(after_ms=1500)
    run_local_turn(spill, clock, 1.0)  # turns last 1 s
    local.active = 2  # both slots busy: ~1 s to a slot, under 1.5 s: stays local
    assert asyncio.run(spill.start_turn(REQUEST)).upstream is None
    local.queued = 2  # two more ahead: ~2 s: over the setting
    assert asyncio.run(spill.start_turn(REQUEST)).upstream == "http://gpu1"
    assert (remote.started, spill.spilled) == (1, 1)
    local.queued, local.full = 0, True  # a full queue still spills, whatever the estimate
    assert asyncio.run(spill.start_turn(REQUEST)).upstream == "http://gpu1"
    assert spill.spilled == 2


def test_without_the_setting_only_a_full_queue_spills() -> None:
    spill, local, remote, clock = backend(after_ms=0)
    run_local_turn(spill, clock, 30.0)
    local.active, local.queued = 2, 50
    assert asyncio.run(spill.start_turn(REQUEST)).upstream is None
    assert remote.started == 0
    assert load_settings({"LIGHT_SPILLOVER_AFTER_MS": "250"}).tiers["light"].spillover_after_ms == 250.0
