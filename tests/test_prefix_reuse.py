"""Shared-prefix KV reuse in LlamaCppChat on the packaged Gemma (chat/llama_engine.py).

The engine is driven as the scheduler drives it (insert, step, remove), so every test knows which
sequence holds what. Outputs are compared with an engine that prefills every prompt whole
(`PREFIX_REUSE=false`), each sequence decoded alone in both, so llama.cpp's batch non-invariance (a
sequence decoded next to others gets slightly different logits) stays out of the comparison.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import pytest

from chat.llama_engine import MIN_COPY_TOKENS, LlamaCppChat, common_prefix
from core.protocols import GenerationJob, SamplingParams
from tests.budgets import no_end_bias
from tests.conftest import real_settings
from tests.waiting import DEADLINE_S, wait_for

pytestmark = pytest.mark.real

TOKENS = 8


def engine_with(gemma_path: str, reuse: bool) -> LlamaCppChat:
    # Small batches: a ~300-token prompt takes several steps, so a second sequence can arrive mid-prefill.
    env = {"LIGHT_PARALLEL": "3", "LIGHT_N_CTX": "512", "LIGHT_N_BATCH": "64", "LIGHT_PREFIX_REUSE": str(reuse)}
    return LlamaCppChat(real_settings(env).tiers["light"], gemma_path)


@pytest.fixture(scope="module")
def engine(gemma_path: str) -> Iterator[LlamaCppChat]:
    model = engine_with(gemma_path, True)
    yield model
    model.close()


@pytest.fixture(scope="module")
def plain(gemma_path: str) -> Iterator[LlamaCppChat]:
    model = engine_with(gemma_path, False)
    yield model
    model.close()


@pytest.fixture(scope="module")
def params(gemma_path: str) -> SamplingParams:
    # Greedy, end tokens banned: every sequence generates exactly `max_tokens`.
    bias = tuple((int(token), value) for token, value in no_end_bias(gemma_path).items())
    return SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=TOKENS, logit_bias=bias)


def system_prompt(topic: str) -> str:
    """~300 tokens; a topic per test, so no test finds another's prefix in the module's engine."""
    return " ".join(f"Rule {n} of the {topic} archive: record {n * 7} is kept in room {n % 13}." for n in range(15))


def prompt(model: LlamaCppChat, topic: str, question: str) -> list[int]:
    messages = [{"role": "system", "content": system_prompt(topic)}, {"role": "user", "content": question}]
    return model.chat_tokens(messages)


def job(tokens: list[int], params: SamplingParams) -> GenerationJob:
    return GenerationJob(prompt_tokens=tokens, params=params)


def run(model: LlamaCppChat, *jobs: GenerationJob, until: GenerationJob | None = None) -> dict[int, list[int]]:
    """Step until every job has `max_tokens` tokens (or `until` has its first): the tokens per job."""
    tokens: dict[int, list[int]] = {id(j): [] for j in jobs}

    def done() -> bool:
        if until is not None:
            return bool(tokens[id(until)])
        return all(len(tokens[id(j)]) >= j.params.max_tokens for j in jobs)

    def advance() -> bool:
        for output in model.step():
            assert output.error is None and not output.end_of_generation
            if id(output.job) in tokens and len(tokens[id(output.job)]) < output.job.params.max_tokens:
                tokens[id(output.job)].append(output.token)
        return done()

    wait_for(advance, "the sequences to generate", DEADLINE_S)
    return tokens


def alone(model: LlamaCppChat, tokens: list[int], params: SamplingParams) -> tuple[GenerationJob, list[int]]:
    """One sequence inserted, generated and removed on its own."""
    j = job(tokens, params)
    model.insert(j)
    out = run(model, j)[id(j)]
    model.remove(j)
    return j, out


def test_a_prefix_a_busy_slot_holds_is_copied_and_the_answer_is_unchanged(
    engine: LlamaCppChat, plain: LlamaCppChat, params: SamplingParams
) -> None:
    first = job(prompt(engine, "harbour", "Which room holds record 21?"), params)
    engine.insert(first)
    run(engine, first, until=first)  # prefilled and generating: its slot is busy
    second_prompt = prompt(engine, "harbour", "Where is record 35 kept, and since when?")
    second = job(second_prompt, params)
    engine.insert(second)
    shared = common_prefix(first.prompt_tokens, second_prompt)
    assert shared > 250
    assert engine.copied_tokens(second) == engine.reused_tokens(second) == shared
    engine.remove(first)  # the copy is done at the next decode, from the KV the first left behind
    with_reuse = run(engine, second)[id(second)]
    engine.remove(second)

    reference, without_reuse = alone(plain, list(second_prompt), params)
    assert plain.reused_tokens(reference) == 0
    assert with_reuse == without_reuse


def test_concurrent_prompts_sharing_a_prefix_prefill_it_once(
    engine: LlamaCppChat, plain: LlamaCppChat, params: SamplingParams
) -> None:
    jobs = [job(prompt(engine, "orchard", q), params) for q in ("Which room?", "What record?", "Why room 4?")]
    for j in jobs:
        engine.insert(j)
    assert [engine.copied_tokens(j) for j in jobs] == [0, 0, 0]  # the second and third wait for the first
    run(engine, *jobs)
    shared = common_prefix(jobs[0].prompt_tokens, jobs[1].prompt_tokens)
    assert shared > 250
    for j in jobs[1:]:
        assert engine.copied_tokens(j) == common_prefix(jobs[0].prompt_tokens, j.prompt_tokens) >= shared
    for j in jobs:
        engine.remove(j)


def test_a_waiting_sequence_whose_source_leaves_copies_what_it_had_prefilled(
    engine: LlamaCppChat, params: SamplingParams
) -> None:
    source = job(prompt(engine, "quarry", "Which room?"), params)
    waiter = job(prompt(engine, "quarry", "What record is in room 5?"), params)
    engine.insert(source)
    engine.insert(waiter)
    engine.step()  # the source prefills its first chunk; the waiter waits
    engine.step()
    assert engine.copied_tokens(waiter) == 0
    engine.remove(source)  # cancelled mid-prefill: what it computed stays in its free slot
    run(engine, waiter)
    assert engine.copied_tokens(waiter) >= MIN_COPY_TOKENS
    assert engine.copied_tokens(waiter) < common_prefix(source.prompt_tokens, waiter.prompt_tokens)
    engine.remove(waiter)


def test_a_chats_next_turn_finds_its_own_slot_after_another_user_shared_its_prompt(
    engine: LlamaCppChat, params: SamplingParams
) -> None:
    longer = replace(params, max_tokens=4 * MIN_COPY_TOKENS // 3)
    first, answer = alone(engine, prompt(engine, "lighthouse", "Which room holds record 21?"), longer)
    # Another user with the same system prompt: copied into another slot, so the chat's own slot keeps its
    # question and answer (more than MIN_COPY_TOKENS past the shared prefix) for the next turn.
    other, _ = alone(engine, prompt(engine, "lighthouse", "Is record 14 in room 1?"), params)
    assert engine.copied_tokens(other) > 250
    next_turn = [*first.prompt_tokens, *answer, *engine.tokenize("<end_of_turn>\nAnd record 28?")[1:]]
    follow_up, _ = alone(engine, next_turn, params)
    assert engine.copied_tokens(follow_up) == 0
    assert engine.reused_tokens(follow_up) >= len(first.prompt_tokens) + len(answer) - 1


def test_with_reuse_off_every_prompt_is_prefilled_whole(plain: LlamaCppChat, params: SamplingParams) -> None:
    tokens = prompt(plain, "meadow", "Which room?")
    alone(plain, tokens, params)
    again, _ = alone(plain, list(tokens), params)
    assert plain.reused_tokens(again) == plain.copied_tokens(again) == 0
