"""Fake backends that implement the real protocols, for fast tests of the whole HTTP stack.

They behave like tiny deterministic models and record what they were asked, so tests can assert on
the parameters the server passed down.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

from config import Settings, TierConfig
from core.errors import BackendError
from core.protocols import EmbeddingResult, GenerationJob, StepOutput
from core.turns import Message
from tests.waiting import DEADLINE_S

EOS = -1
_HOLD = re.compile(r"HOLD:([^<\s]+)")


class FakeChat:
    """One token per character. The reply to a prompt is `reply_for(prompt)`; then end of generation.

    The reply echoes the last message, or is exactly the text after "SAY:" when the message starts so.

    Prompts containing "BOOM" fail after three tokens (an error in mid-stream); prompts containing
    "ENDLESS" never stop on their own (for max_tokens and cancellation tests). A prompt containing
    "HOLD:<path>" makes every step wait until that file exists (tests in another process release it);
    `hold_gate` does the same from a test in this process. A held step gives up when every active
    sequence has been cancelled, as a real decode step would end. (`step_gate` is different: each
    step waits for it whatever is cancelled.) A step waiting on a gate keeps the scheduler's owner
    thread, as a long decode step would: requests submitted meanwhile stay queued until it returns.
    A forgotten gate gives up at the tests' deadline.
    """

    def __init__(self, tier: TierConfig, context_length: int = 2048, max_parallel: int = 2) -> None:
        self.tier = tier
        self.context_length = context_length
        self.max_parallel = max_parallel
        self.vocab_size = 0x110000  # one token per Unicode code point
        self.inserted: list[GenerationJob] = []
        self.removed: list[GenerationJob] = []
        self.active: dict[int, tuple[GenerationJob, str, int]] = {}
        self.step_gate: threading.Event | None = None  # when set by a test, each step waits for it
        self.hold_gate: threading.Event | None = None  # steps block until it is set (or all are cancelled)
        self.closed = False
        self.holds: dict[int, str] = {}  # job id -> file that must exist before the job advances

    def tokenize(self, text: str) -> list[int]:
        return [ord(ch) for ch in text]

    def chat_tokens(self, messages: Sequence[Message]) -> list[int]:
        return self.tokenize(self.render_chat(messages))

    def render_chat(self, messages: Sequence[Message]) -> str:
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    @staticmethod
    def reply_for(prompt: str) -> str:
        body = prompt.removesuffix("<assistant>")
        starts = [body.rfind(tag) + len(tag) for tag in ("<user>", "<tool>", "<system>") if tag in body]
        last = body[max(starts, default=0) :]
        if last.startswith("SAY:"):  # lets a test script the model's exact output
            return last[len("SAY:") :]
        return f"echo: {last}"

    def insert(self, job: GenerationJob) -> None:
        prompt = "".join(chr(t) for t in job.prompt_tokens)
        reply = ("x" * 100000) if "ENDLESS" in prompt else self.reply_for(prompt)
        self.inserted.append(job)
        hold = _HOLD.search(prompt)
        if hold:
            self.holds[id(job)] = hold.group(1)
        self.active[id(job)] = (job, reply, 0)

    def _held(self) -> bool:
        if self.hold_gate is not None and not self.hold_gate.is_set():
            return True
        return any(not os.path.exists(path) for key, path in self.holds.items() if key in self.active)

    def step(self) -> list[StepOutput]:
        if self.step_gate is not None:
            self.step_gate.wait(DEADLINE_S)
        give_up = time.monotonic() + DEADLINE_S  # a forgotten gate must not hang the suite
        while self._held() and time.monotonic() < give_up:
            if all(job.cancelled.is_set() for job, _, _ in self.active.values()):
                return []
            threading.Event().wait(0.01)  # a blocked "decode step"; nothing to wait on but the gate
        outputs = []
        for key, (job, reply, pos) in list(self.active.items()):
            prompt = "".join(chr(t) for t in job.prompt_tokens)
            if "BOOM" in prompt and pos == 3:
                raise RuntimeError("fake model failure")
            if "POISON" in prompt and pos == 3:  # this sequence alone fails, as a failed decode is isolated
                outputs.append(StepOutput(job, "", EOS, True, error=BackendError("The model failed on this input")))
                continue
            if pos >= len(reply):
                outputs.append(StepOutput(job, "", EOS, True))
                continue
            self.active[key] = (job, reply, pos + 1)
            outputs.append(StepOutput(job, reply[pos], ord(reply[pos]), False))
        return outputs

    def remove(self, job: GenerationJob) -> None:
        self.active.pop(id(job), None)
        self.removed.append(job)

    def close(self) -> None:
        self.closed = True


class FakeRegistry:
    """Factories that build fakes and remember them, keyed by tier name."""

    def __init__(self, **chat_kwargs: Any) -> None:
        self.models: dict[str, Any] = {}
        self.loads: dict[str, int] = {}
        self.chat_kwargs = chat_kwargs
        self.load_gate: threading.Event | None = None

    def _load_chat(self, tier: TierConfig, settings: Settings) -> FakeChat:
        if self.load_gate is not None:
            self.load_gate.wait(DEADLINE_S)
        self.loads[tier.name] = self.loads.get(tier.name, 0) + 1
        model = FakeChat(tier, **self.chat_kwargs)
        self.models[tier.name] = model
        return model

    def factories(self) -> dict[str, Any]:
        return {"chat:llamacpp": self._load_chat, "chat:mlx": self._load_chat}


class FakeUpstream:
    """A `ChatBackend` that serves whole turns itself, as a remote OpenAI upstream would: no template,
    no tokens, no owner thread. It answers "upstream: <last message>" (or the text after "SAY:") in
    three pieces, and records every `TurnRequest` it was given. "FAIL" in the message ends the choice
    with an error event after the first piece."""

    def __init__(self) -> None:
        from concurrent.futures import Future

        self.ready: Future[None] = Future()
        self.ready.set_result(None)
        self.requests: list[Any] = []
        self.cancelled: set[int] = set()  # ids of the choices told to stop (cancel may come twice)
        self.shut_down = False

    async def start_turn(self, request: Any) -> Any:
        from core.turns import Turn

        self.requests.append(request)
        last = str(request.messages[-1].get("content") or "") if request.messages else str(request.prompts[0])
        reply = last[len("SAY:") :] if last.startswith("SAY:") else f"upstream: {last}"
        return Turn([_UpstreamChoice(self, reply, "FAIL" in last) for _ in range(request.n)], prompt_tokens=7)

    def status(self) -> dict[str, int]:
        return {"active": 0, "queued": 0}

    def shutdown(self, timeout: float = 10.0) -> None:
        self.shut_down = True


class _UpstreamChoice:
    def __init__(self, upstream: FakeUpstream, reply: str, fail: bool) -> None:
        self.upstream, self.reply, self.fail = upstream, reply, fail

    async def events(self) -> Any:
        from core.errors import BackendError
        from core.events import DoneEvent, ErrorEvent, TextEvent

        third = max(1, len(self.reply) // 3)
        pieces = [self.reply[:third], self.reply[third : 2 * third], self.reply[2 * third :]]
        for piece in pieces:
            yield TextEvent(piece)
            if self.fail:
                yield ErrorEvent(BackendError("The upstream failed"))
                return
        yield DoneEvent("stop", prompt_tokens=7, completion_tokens=len(pieces))

    def cancel(self) -> None:
        self.upstream.cancelled.add(id(self))


class FakeEmbedder:
    """Vectors from character counts; "BOOM" in a text fails the batch. Records every batch."""

    dimension = 4
    max_input_tokens = 512
    supported_types = ("dense", "sparse")

    def __init__(self) -> None:
        self.batches: list[list[str]] = []

    def embed(self, texts: Sequence[str], types: Sequence[str], truncate: bool) -> EmbeddingResult:
        if any("BOOM" in text for text in texts):
            raise RuntimeError("fake embedder failure")
        self.batches.append(list(texts))
        dense = [[float(len(t)), float(t.count("a")), float(t.count("e")), 1.0] for t in texts]
        sparse = [{ord(t[0]): 0.5, 7: float(len(t))} for t in texts] if "sparse" in types else None
        return EmbeddingResult(dense=dense if "dense" in types else None, sparse=sparse, token_counts=[2] * len(texts))

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(t.split()) for t in texts]

    def close(self) -> None:
        pass


class FakeReranker:
    """Scores by shared words with the query. Records every batch of pairs."""

    kind = "fake"
    scores_are_logits = True
    max_input_tokens = 512

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, str]]] = []

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        self.batches.append(list(pairs))
        return [float(len(set(q.lower().split()) & set(d.lower().split()))) for q, d in pairs]

    def count_tokens(self, texts: Sequence[str]) -> list[int]:
        return [len(t.split()) for t in texts]

    def close(self) -> None:
        pass
