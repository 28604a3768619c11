"""Sampling from the pruned candidate set (chat/llama_sampling.py) draws what the whole vocabulary draws.

Two chains built from the same parameters and seed: one is given every token, as `llama_sampler_sample`
does, the other only `candidates()`; over many random logit vectors they must pick the same token every
time, penalties' history and random state included.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from chat.llama_sampling import ROWS, build_sampler, candidates, sample_pruned
from core.protocols import SamplingParams

llama_cpp = pytest.importorskip("llama_cpp")
VOCAB = 262_144  # Gemma 3's
DRAWS = 150


def _params(**overrides: object) -> SamplingParams:
    base: dict[str, object] = {"temperature": 0.7, "top_p": 0.95, "top_k": 40, "max_tokens": 1, "seed": 11}
    return SamplingParams(**{**base, **overrides})  # type: ignore[arg-type]


def _sample_whole(chain: object, logits: np.ndarray) -> int:
    data = np.empty(len(logits), dtype=[("id", np.intc), ("logit", np.single), ("p", np.single)])
    data["id"] = np.arange(len(logits))
    data["logit"] = logits
    data["p"] = 0.0
    array = llama_cpp.llama_token_data_array(
        data=data.ctypes.data_as(llama_cpp.llama_token_data_p), size=len(logits), selected=-1, sorted=False
    )
    llama_cpp.llama_sampler_apply(chain, ctypes.byref(array))
    token = int(array.data[array.selected].id)
    llama_cpp.llama_sampler_accept(chain, token)
    return token


CASES = {
    "sampled, repetition penalty, banned end tokens (the server's defaults)": _params(
        repeat_penalty=1.1, logit_bias=((1, -100.0), (106, -100.0))
    ),
    "sampled, top-k only": _params(top_p=1.0, temperature=1.0),
    "greedy": _params(temperature=0.0),
    "greedy with penalties": _params(temperature=0.0, repeat_penalty=1.3, presence_penalty=0.5),
    "a bias lifting a far-down token into the top": _params(top_k=5, logit_bias=((77, 25.0), (5, -3.0))),
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_pruned_set_draws_the_same_tokens_as_the_whole_vocabulary(name: str) -> None:
    params = CASES[name]
    whole = build_sampler(llama_cpp, VOCAB, params)
    pruned = build_sampler(llama_cpp, VOCAB, params)
    assert pruned.keep > 0
    rng = np.random.default_rng(5)
    lifted = 0
    try:
        for _ in range(DRAWS):
            logits = (rng.standard_normal(VOCAB) * 3).astype(np.float32)
            logits[77] = -4.0  # far down: only its bias can make it a candidate
            expected = _sample_whole(whole.chain, logits)
            assert sample_pruned(llama_cpp, pruned, logits) == expected
            lifted += expected == 77
    finally:
        llama_cpp.llama_sampler_free(whole.chain)
        llama_cpp.llama_sampler_free(pruned.chain)
    if 77 in dict(params.logit_bias):
        assert lifted > 0  # the case tests what it says


def test_chains_that_need_every_token_are_not_pruned() -> None:
    for params in (_params(top_k=0), _params(top_k=0, repeat_penalty=1.2), _params(repeat_penalty=0.8)):
        sampler = build_sampler(llama_cpp, VOCAB, params)
        try:
            assert sampler.keep == 0
        finally:
            llama_cpp.llama_sampler_free(sampler.chain)


@pytest.mark.parametrize("vocab", [VOCAB, 50_257, 32_000 + ROWS - 1])
def test_candidates_hold_the_top_k_and_every_biased_token(vocab: int) -> None:
    rng = np.random.default_rng(vocab)
    biased = np.array([3, vocab - 1], dtype=np.intc)
    for _ in range(20):
        logits = rng.standard_normal(vocab).astype(np.float32)
        logits[rng.integers(0, vocab, 200)] = 2.5  # ties around the threshold
        logits[vocab - 5 :] = 9.0  # the best tokens in the tail that is not a multiple of ROWS
        ids = candidates(logits, 40, biased)
        assert ids is not None and len(ids) < vocab // 4
        top = np.flatnonzero(logits >= np.sort(logits)[-(40 + len(biased))])
        assert set(top) <= set(ids.tolist())
        assert set(biased.tolist()) <= set(ids.tolist())
        assert list(ids) == sorted(ids)


def test_no_small_set_means_the_whole_vocabulary() -> None:
    none = np.array([], dtype=np.intc)
    assert candidates(np.zeros(VOCAB, dtype=np.float32), 40, none) is None  # all tied
    assert candidates(np.full(VOCAB, np.nan, dtype=np.float32), 40, none) is None
    assert candidates(np.ones(1000, dtype=np.float32), 40, none) is None  # too small to be worth it
