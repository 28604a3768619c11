"""A llama.cpp request's sampler chain, built from its sampling parameters (chat/llama_engine.py uses it)."""

from __future__ import annotations

import random
from typing import Any

from core.errors import InvalidRequest
from core.protocols import SamplingParams

PENALTY_WINDOW = 64  # tokens of history the repetition penalties look at


def build_sampler(lib: Any, n_vocab: int, params: SamplingParams) -> Any:
    """The request's llama.cpp sampler chain: logit bias, penalties, then greedy or top-k/top-p/temperature."""
    if any(not 0 <= token < n_vocab for token, _ in params.logit_bias):
        raise InvalidRequest(f"logit_bias names a token outside the vocabulary (0..{n_vocab - 1})", param="logit_bias")
    chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
    add = lambda sampler: lib.llama_sampler_chain_add(chain, sampler)  # noqa: E731
    if params.logit_bias:
        biases = (lib.llama_logit_bias * len(params.logit_bias))(*params.logit_bias)
        add(lib.llama_sampler_init_logit_bias(n_vocab, len(params.logit_bias), biases))
    repeat = params.repeat_penalty or 1.0
    if repeat != 1.0 or params.frequency_penalty or params.presence_penalty:
        keep = 1 if params.temperature <= 0.0 else params.top_k
        if keep > 0 and repeat >= 1.0 and params.frequency_penalty >= 0 and params.presence_penalty >= 0:
            # Penalties only lower logits, and of at most PENALTY_WINDOW tokens, so the top `keep` after
            # them lie within the top keep + PENALTY_WINDOW before them. Pruning first makes the
            # penalty pass ~100 candidates instead of the whole vocabulary (2 ms -> 0.4 ms on Gemma).
            add(lib.llama_sampler_init_top_k(keep + PENALTY_WINDOW))
        add(
            lib.llama_sampler_init_penalties(
                n_vocab, PENALTY_WINDOW, repeat, params.frequency_penalty, params.presence_penalty
            )
        )
    if params.temperature <= 0.0:
        add(lib.llama_sampler_init_greedy())
        return chain
    if params.top_k > 0:
        add(lib.llama_sampler_init_top_k(params.top_k))
    if params.top_p < 1.0:
        add(lib.llama_sampler_init_top_p(params.top_p, 1))
    add(lib.llama_sampler_init_temp(params.temperature))
    seed = params.seed if params.seed is not None else random.getrandbits(32)
    add(lib.llama_sampler_init_dist(seed & 0xFFFFFFFF))
    return chain
