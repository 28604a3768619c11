"""Micro-batching: concurrent requests merge into one batch, results go back in order, and merged
results equal unbatched ones. The owner thread is held on a gate while requests queue up, so merging
is deterministic without sleeps."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
import pytest

from core.errors import InvalidRequest, Overloaded
from core.microbatch import BatchWorker
from tests.waiting import DEADLINE_S


class RecordingModel:
    """Doubles numbers; records every batch it was given; fails on negative numbers."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def run(self, items: Sequence[int]) -> list[int]:
        self.batches.append(list(items))
        if any(i < 0 for i in items):
            raise InvalidRequest("negative input")
        return [2 * i for i in items]


def double(model: RecordingModel, items: Sequence[int]) -> list[int]:
    return model.run(items)


def hold(worker: BatchWorker) -> tuple[threading.Event, Future[Any]]:
    """Occupy the owner thread until the returned event is set."""
    gate, entered = threading.Event(), threading.Event()

    def blocker(model: Any) -> None:
        entered.set()
        gate.wait(DEADLINE_S)

    future = worker.submit(blocker)
    assert entered.wait(DEADLINE_S)
    return gate, future


@pytest.fixture
def worker() -> Any:
    model = RecordingModel()
    w = BatchWorker(lambda: model, "test", max_queue=16, wait_ms=0, max_batch=8)
    w.ready.result(DEADLINE_S)
    yield w
    w.shutdown()


def test_queued_requests_merge_and_split_in_order(worker: BatchWorker) -> None:
    gate, _ = hold(worker)
    futures = [worker.submit_batch("k", [i, i + 100], double) for i in range(3)]
    gate.set()
    assert [f.result(DEADLINE_S) for f in futures] == [[0, 200], [2, 202], [4, 204]]
    assert worker.model.batches == [[0, 100, 1, 101, 2, 102]]
    assert worker.largest_batch == 3


def test_different_keys_never_merge(worker: BatchWorker) -> None:
    gate, _ = hold(worker)
    a = worker.submit_batch("a", [1], double)
    b = worker.submit_batch("b", [2], double)
    c = worker.submit_batch("a", [3], double)
    gate.set()
    assert (a.result(DEADLINE_S), b.result(DEADLINE_S), c.result(DEADLINE_S)) == ([2], [4], [6])
    assert worker.model.batches == [[1, 3], [2]]


def test_max_batch_caps_a_merged_batch(worker: BatchWorker) -> None:
    gate, _ = hold(worker)
    futures = [worker.submit_batch("k", [i] * 3, double) for i in range(4)]  # 12 inputs, max_batch 8
    gate.set()
    assert [f.result(DEADLINE_S) for f in futures] == [[2 * i] * 3 for i in range(4)]
    assert [len(b) for b in worker.model.batches] == [6, 6]


def test_a_bad_request_fails_alone(worker: BatchWorker) -> None:
    gate, _ = hold(worker)
    good = worker.submit_batch("k", [1, 2], double)
    bad = worker.submit_batch("k", [-1], double)
    other = worker.submit_batch("k", [3], double)
    gate.set()
    assert good.result(DEADLINE_S) == [2, 4] and other.result(DEADLINE_S) == [6]
    with pytest.raises(InvalidRequest):
        bad.result(DEADLINE_S)


def test_a_full_queue_is_refused_at_once() -> None:
    model = RecordingModel()
    w = BatchWorker(lambda: model, "tiny", max_queue=1, wait_ms=0, max_batch=8)
    w.ready.result(DEADLINE_S)
    gate, _ = hold(w)
    try:
        w.submit_batch("k", [1], double)
        w.submit_batch("k", [2], double)
        with pytest.raises(Overloaded) as refused:
            w.submit_batch("k", [3], double)
        assert refused.value.status == 503 and "Retry-After" in refused.value.headers
    finally:
        gate.set()
        w.shutdown()


def test_a_cancelled_request_is_skipped(worker: BatchWorker) -> None:
    gate, _ = hold(worker)
    dropped = worker.submit_batch("k", [7], double)
    kept = worker.submit_batch("k", [8], double)
    assert dropped.cancel()
    gate.set()
    assert kept.result(DEADLINE_S) == [16]
    assert worker.model.batches == [[8]]


@pytest.mark.real
def test_micro_batched_embeddings_equal_unbatched_ones(minilm_path: Any) -> None:
    from api.rag import _embed_run
    from config import PACKAGED_MINILM, load_settings
    from embedders import load_sentence_transformers

    settings = load_settings({"LIGHT_MODEL_PATH": "", "EMBEDDING_N_THREADS": "2"})
    tier = settings.tiers["embedding"]
    assert tier.model_path == PACKAGED_MINILM
    w = BatchWorker(lambda: load_sentence_transformers(tier, settings), "embedding", 64, wait_ms=5, max_batch=64)
    try:
        w.ready.result(120)
        texts = [f"sentence number {i} about {topic}" for i, topic in enumerate(["cats", "rivers", "tax", "jazz"] * 4)]
        run = _embed_run(("dense",), False)
        alone = [w.submit_batch(("embed", ("dense",), False), [t], run).result(DEADLINE_S)[0].dense for t in texts]
        gate, _ = hold(w)
        futures = [w.submit_batch(("embed", ("dense",), False), [t], run) for t in texts]
        gate.set()
        merged = [f.result(DEADLINE_S)[0].dense for f in futures]
        assert w.largest_batch == len(texts)
    finally:
        w.shutdown()
    a, b = np.array(alone), np.array(merged)
    cosine = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() > 0.9999


def test_a_request_that_waited_past_the_queue_timeout_gets_a_503() -> None:
    model = RecordingModel()
    now = [100.0]  # a clock the test moves
    w = BatchWorker(lambda: model, "slow", max_queue=4, wait_ms=0, max_batch=8, queue_timeout=30, clock=lambda: now[0])
    w.ready.result(DEADLINE_S)
    try:
        gate, _ = hold(w)
        late = w.submit_batch("k", [1], double)
        now[0] += 31
        on_time = w.submit_batch("k", [2], double)
        gate.set()
        assert on_time.result(DEADLINE_S) == [4]
        with pytest.raises(Overloaded) as refused:
            late.result(DEADLINE_S)
        assert refused.value.status == 503 and "Waited over" in refused.value.message
        assert model.batches == [[2]]
    finally:
        w.shutdown()


def test_a_lone_request_is_not_held_for_the_window_until_requests_overlap() -> None:
    # The clock never moves: a request held for the (60 s) window would run only once max_batch filled.
    model = RecordingModel()
    w = BatchWorker(lambda: model, "lone", max_queue=8, wait_ms=60_000, max_batch=2, clock=lambda: 100.0)
    w.ready.result(DEADLINE_S)
    try:
        assert [w.submit_batch("k", [i], double).result(DEADLINE_S) for i in range(3)] == [[0], [2], [4]]
        gate, _ = hold(w)
        pair = [w.submit_batch("k", [i], double) for i in (5, 6)]
        gate.set()
        assert [f.result(DEADLINE_S) for f in pair] == [[10], [12]]
        later = w.submit_batch("k", [7], double)  # requests overlapped: the window is back
        last = w.submit_batch("k", [8], double)
        assert (later.result(DEADLINE_S), last.result(DEADLINE_S)) == ([14], [16])
        assert model.batches == [[0], [1], [2], [5, 6], [7, 8]]
    finally:
        w.shutdown()
