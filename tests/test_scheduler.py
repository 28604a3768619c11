"""The scheduler's stop strings (chat/scheduler.py): text that may start a stop string is held back, a
stop string split across tokens is cut, held text is flushed when the sequence ends without a match.

Driven directly, without HTTP, over a model whose tokens are whole pieces of text, so a stop string
can arrive split across tokens at any point.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from chat.scheduler import ChatScheduler
from core.events import DoneEvent, ErrorEvent, Event, TextEvent
from core.protocols import GenerationJob, SamplingParams, StepOutput
from tests.fakes import EOS
from tests.waiting import DEADLINE_S


class ScriptedChat:
    """A ChatModel whose every sequence produces `pieces`, one token each, then end of generation."""

    max_parallel = 2
    context_length = 4096

    def __init__(self, pieces: Sequence[str]) -> None:
        self.pieces = list(pieces)
        self.positions: dict[int, tuple[GenerationJob, int]] = {}
        self.removed: list[GenerationJob] = []

    def tokenize(self, text: str) -> list[int]:
        return [ord(ch) for ch in text]

    def insert(self, job: GenerationJob) -> None:
        self.positions[id(job)] = (job, 0)

    def step(self) -> list[StepOutput]:
        outputs = []
        for key, (job, position) in list(self.positions.items()):
            if position == len(self.pieces):
                outputs.append(StepOutput(job, "", EOS, True))
                continue
            self.positions[key] = (job, position + 1)
            outputs.append(StepOutput(job, self.pieces[position], position, False))
        return outputs

    def remove(self, job: GenerationJob) -> None:
        self.positions.pop(id(job), None)
        self.removed.append(job)

    def close(self) -> None:
        pass


class Recorder:
    """A sink: every event, in order; `done` is set by the last one. With `cancel`, the first text
    event cancels the job (on the owner thread, so before the next step)."""

    def __init__(self, cancel: threading.Event | None = None) -> None:
        self.events: list[Event] = []
        self.done = threading.Event()
        self.cancel = cancel

    def __call__(self, event: Event) -> None:
        self.events.append(event)
        if isinstance(event, TextEvent) and self.cancel is not None:
            self.cancel.set()
        if isinstance(event, DoneEvent | ErrorEvent):
            self.done.set()

    @property
    def texts(self) -> list[str]:
        return [e.text for e in self.events if isinstance(e, TextEvent)]

    @property
    def finish(self) -> DoneEvent:
        last = self.events[-1]
        assert isinstance(last, DoneEvent), self.events
        return last


@pytest.fixture
def run() -> Iterator[Any]:
    """Run one sequence of `pieces` with `stop` through a real ChatScheduler; its events, in order."""
    schedulers: list[ChatScheduler] = []

    def generate(pieces: Sequence[str], stop: tuple[str, ...], max_tokens: int = 100, cancel: bool = False) -> Recorder:
        scheduler = ChatScheduler(lambda: ScriptedChat(pieces), "light", max_queue=4, queue_timeout=DEADLINE_S)
        schedulers.append(scheduler)
        scheduler.ready.result(DEADLINE_S)
        params = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=max_tokens, stop=stop)
        job = GenerationJob(prompt_tokens=[1, 2, 3], params=params)
        recorder = Recorder(job.cancelled if cancel else None)
        scheduler.submit(job, recorder)
        assert recorder.done.wait(DEADLINE_S), recorder.events
        assert [e for e in recorder.events if not isinstance(e, TextEvent)] == [recorder.events[-1]]
        return recorder

    yield generate
    for scheduler in schedulers:
        scheduler.shutdown()


def test_a_stop_string_split_across_tokens_is_cut(run: Any) -> None:
    out = run(["Hel", "lo E", "ND", " never sent"], stop=("END",))
    assert out.texts == ["Hel", "lo "]  # "E" was held back: it may start "END"
    assert out.finish.finish_reason == "stop"
    assert out.finish.completion_tokens == 3


def test_a_stop_string_inside_one_token_cuts_that_token(run: Any) -> None:
    out = run(["ab", "c END d", "e"], stop=("END",))
    assert out.texts == ["ab", "c "]
    assert (out.finish.finish_reason, out.finish.completion_tokens) == ("stop", 2)


def test_a_stop_string_at_the_very_start_sends_no_text(run: Any) -> None:
    out = run(["EN", "D", "x"], stop=("END",))
    assert out.texts == []
    assert out.finish.finish_reason == "stop"


def test_held_text_that_turns_out_not_to_stop_is_sent_with_what_follows(run: Any) -> None:
    out = run(["one E", "N", "Dless"], stop=("ENDS",))
    # "E", then "EN", then "END" may start "ENDS"; "ENDl" cannot, so all of it goes out at once.
    assert out.texts == ["one ", "ENDless"]
    assert (out.finish.finish_reason, out.finish.completion_tokens) == ("stop", 3)


def test_held_text_is_flushed_when_generation_ends_without_a_match(run: Any) -> None:
    out = run(["abc E", "N"], stop=("END",))
    assert out.texts == ["abc ", "EN"]  # "EN" held until the end of generation, then sent
    assert (out.finish.finish_reason, out.finish.completion_tokens) == ("stop", 2)


def test_held_text_is_flushed_when_the_token_budget_runs_out(run: Any) -> None:
    out = run(["abc E", "N", "D"], stop=("END",), max_tokens=2)
    assert out.texts == ["abc ", "EN"]
    assert (out.finish.finish_reason, out.finish.completion_tokens) == ("length", 2)


def test_the_earliest_of_several_stop_strings_wins(run: Any) -> None:
    out = run(["xHE", "LLO"], stop=("LO", "EL"))
    assert out.texts == ["xH"]
    assert out.finish.finish_reason == "stop"


def test_a_stop_string_that_overlaps_itself_is_found_after_a_false_start(run: Any) -> None:
    out = run(["a", "a", "a", "b", "c"], stop=("aab",))
    assert out.texts == ["a"]  # "aaab": the match starts at the second "a"
    assert (out.finish.finish_reason, out.finish.completion_tokens) == ("stop", 4)


def test_without_stop_strings_every_piece_goes_out_as_it_comes(run: Any) -> None:
    out = run(["E", "N", "D"], stop=())
    assert out.texts == ["E", "N", "D"]
    assert (out.finish.finish_reason, out.finish.completion_tokens) == ("stop", 3)


def test_a_cancelled_sequence_drops_its_held_text(run: Any) -> None:
    out = run(["ab E", "ND"], stop=("END",), cancel=True)
    assert out.texts == ["ab "]  # the held "E" is not sent
    assert out.finish.finish_reason == "cancelled"
