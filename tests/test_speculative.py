"""Prompt-lookup drafts (`{TIER}_SPECULATIVE=ngram`): the guesser alone, then the engine on the packaged Gemma.

The engine's outputs are compared with plain decoding of the same prompt, each sequence decoded alone.
llama.cpp's logits depend slightly on how a sequence's tokens were batched (the same position computed in a
batch of one or of several tokens differs in the last digits), so greedy runs may part where the model's top
two tokens are all but tied; the comparison accepts a difference only there, and checks that it is so.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from chat.llama_engine import LlamaCppChat
from chat.ngram_draft import NgramDrafter
from config import ConfigError, load_settings
from core.protocols import GenerationJob, SamplingParams
from tests.budgets import no_end_bias
from tests.conftest import real_settings
from tests.waiting import DEADLINE_S, wait_for

PASSAGE = (
    "The lighthouse keeper rose before dawn every morning to trim the wick, polish the great lens and record "
    "the weather in a leather-bound log. Ships passing the northern cape relied on its beam to avoid the reef "
    "that had claimed more than forty vessels in the previous century. "
) * 2
EXTRACTIVE = f"Passage:\n{PASSAGE}\n\nCopy the passage above exactly.\nCopy:\nThe lighthouse keeper rose"
TIE = 1.0  # logits closer than this may swap with the batching (measured shifts here: up to ~0.3)


# ---------------------------------------------------------------- the guesser


def test_the_guess_follows_the_latest_earlier_occurrence_of_the_longest_suffix() -> None:
    drafter = NgramDrafter([1, 2, 3, 9, 9, 5, 2, 3, 7, 8, 4, 2, 3], draft_max=8)
    assert drafter.propose(3) == [7, 8, 4]  # "2 3" last occurred before "7 8 4", not before "9 9"
    drafter.append(7)
    assert drafter.propose(8) == [8, 4, 2, 3, 7]  # "2 3 7" matched: the guess runs to the end of the history


def test_a_longer_suffix_wins_over_a_more_recent_shorter_one() -> None:
    drafter = NgramDrafter([4, 5, 6, 10, 0, 5, 6, 11, 4, 5, 6], draft_max=4)
    assert drafter.propose(2) == [10, 0]  # "4 5 6" (3 tokens) beats "5 6" followed by 11


def test_no_guess_without_a_repeated_ngram_and_none_across_token_boundaries() -> None:
    assert NgramDrafter([1, 2, 3, 4, 5], draft_max=8).propose(8) == []
    # The packed bytes of [1, 2] occur two bytes into the first token: only whole tokens match.
    drafter = NgramDrafter([0x00010005, 0x00020000, 0, 1, 2], draft_max=8)
    assert drafter.propose(8) == []
    assert NgramDrafter([3, 3, 3], draft_max=8).propose(0) == []


def test_image_placeholders_are_never_guessed() -> None:
    assert NgramDrafter([5, 6, 8, -1, -1, 9, 5, 6], draft_max=8).propose(8) == [8]
    assert NgramDrafter([5, 6, -1, -1, 9, 5, 6], draft_max=8).propose(8) == []


def test_a_rejected_guess_pauses_guessing_and_longer_each_time() -> None:
    drafter = NgramDrafter([1, 2, 3, 1, 2, 3, 1, 2], draft_max=8)
    assert drafter.propose(8)
    drafter.verified(3, 0)
    assert drafter.cap == 4
    assert drafter.propose(8) == []  # one step without a guess
    assert drafter.propose(8)
    drafter.verified(3, 0)
    assert [drafter.propose(8) for _ in range(2)] == [[], []]  # then two
    assert drafter.propose(8)
    drafter.verified(2, 2)  # all kept: the cap grows back, the pause resets
    assert drafter.cap == 4
    drafter.verified(2, 1)
    assert drafter.cap == 2
    assert (drafter.proposed, drafter.accepted) == (10, 3)


def test_speculative_is_checked() -> None:
    assert load_settings({"LIGHT_SPECULATIVE": "NGRAM"}).tiers["light"].speculative == "ngram"
    with pytest.raises(ConfigError, match="LIGHT_SPECULATIVE has value 'eagle': use off or ngram"):
        load_settings({"LIGHT_SPECULATIVE": "eagle"})


# ---------------------------------------------------------------- the engine, on the packaged Gemma


def engine_with(gemma_path: str, speculative: str) -> LlamaCppChat:
    env = {"LIGHT_PARALLEL": "2", "LIGHT_N_CTX": "1024", "LIGHT_SPECULATIVE": speculative}
    return LlamaCppChat(real_settings(env).tiers["light"], gemma_path)


@pytest.fixture(scope="module")
def drafting(gemma_path: str) -> Iterator[LlamaCppChat]:
    model = engine_with(gemma_path, "ngram")
    yield model
    model.close()


@pytest.fixture(scope="module")
def plain(gemma_path: str) -> Iterator[LlamaCppChat]:
    model = engine_with(gemma_path, "off")
    yield model
    model.close()


def greedy(gemma_path: str, tokens: int) -> SamplingParams:
    bias = tuple((int(token), value) for token, value in no_end_bias(gemma_path).items())
    return SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=tokens, logit_bias=bias)


def generate(model: LlamaCppChat, *jobs: GenerationJob) -> tuple[dict[int, list[int]], int]:
    """Step the jobs as the scheduler does (counting each emitted token, removing a job at its budget) until
    each has max_tokens; the tokens per job and the number of steps. Fails if one step hands a job more tokens
    than its budget has left (a guess must stop there)."""
    for job in jobs:
        model.insert(job)
    tokens: dict[int, list[int]] = {id(job): [] for job in jobs}
    steps = 0

    def advance() -> bool:
        nonlocal steps
        steps += 1
        for output in model.step():
            assert output.error is None and not output.end_of_generation
            job, out = output.job, tokens[id(output.job)]
            assert len(out) < job.params.max_tokens, "a guess ran past the token budget"
            out.append(output.token)
            job.completion_tokens += 1
        for job in jobs:
            if len(tokens[id(job)]) == job.params.max_tokens and job.state in model._sequences.values():
                model.remove(job)
        return all(len(tokens[id(job)]) == job.params.max_tokens for job in jobs)

    wait_for(advance, "the sequences to generate", DEADLINE_S)
    return tokens, steps


def top_two_margin(model: LlamaCppChat, tokens: list[int]) -> float:
    """How far apart plain decoding's two likeliest next tokens are after `tokens` (the engine's internals are
    used directly: only the logits are wanted, not a sampled token)."""
    job = GenerationJob(prompt_tokens=tokens, params=SamplingParams(0.0, 1.0, 0, 1))
    model.insert(job)
    while True:
        entries = model._plan()
        assert model._decode(entries)
        last = [e for e in entries if e.sample]
        if last:
            break
    pointer = model._lib.llama_get_logits_ith(model._ctx.ctx, last[0].index)
    logits = np.ctypeslib.as_array(pointer, shape=(model.vocab_size,))
    first, second = np.sort(logits)[-2:][::-1]
    model.remove(job)
    return float(first - second)


def assert_same_or_tied(plain: LlamaCppChat, prompt: list[int], ours: list[int], reference: list[int]) -> None:
    part = next((i for i, (a, b) in enumerate(zip(ours, reference, strict=True)) if a != b), None)
    if part is not None:
        margin = top_two_margin(plain, prompt + reference[:part])
        assert margin < TIE, f"drafted and plain greedy output part at token {part}; the top two are {margin} apart"


@pytest.mark.real
def test_greedy_drafting_gives_plain_decodings_tokens_in_fewer_steps(
    drafting: LlamaCppChat, plain: LlamaCppChat, gemma_path: str
) -> None:
    prompt = drafting.tokenize(EXTRACTIVE)
    job = GenerationJob(prompt_tokens=prompt, params=greedy(gemma_path, 48))
    ours, steps = generate(drafting, job)
    proposed, accepted = drafting.draft_stats(job)
    reference, plain_steps = generate(plain, GenerationJob(prompt_tokens=list(prompt), params=greedy(gemma_path, 48)))
    assert_same_or_tied(plain, prompt, ours[id(job)], next(iter(reference.values())))
    assert proposed > 0 and accepted > 0  # copying a passage: the guesses come from the prompt
    assert steps < plain_steps  # several tokens in some steps (prefill steps are the same in both)
    assert drafting.draft_totals()[1] >= accepted


@pytest.mark.real
def test_drafting_and_plain_sequences_share_the_batch_and_respect_their_budgets(
    drafting: LlamaCppChat, plain: LlamaCppChat, gemma_path: str
) -> None:
    copying = GenerationJob(prompt_tokens=drafting.tokenize(EXTRACTIVE), params=greedy(gemma_path, 37))
    story = drafting.tokenize("Write a short story about a fox who learns to sail.")
    telling = GenerationJob(prompt_tokens=story, params=greedy(gemma_path, 23))
    outputs, _ = generate(drafting, copying, telling)
    assert len(outputs[id(copying)]) == 37 and len(outputs[id(telling)]) == 23
    assert drafting.draft_stats(copying)[1] > 0
    reference, _ = generate(plain, GenerationJob(prompt_tokens=list(story), params=greedy(gemma_path, 23)))
    # Decoded beside another sequence, the story may part from its plain run only at a near tie.
    assert_same_or_tied(plain, story, outputs[id(telling)], next(iter(reference.values())))


@pytest.mark.real
def test_schema_bound_sequences_are_not_guessed(drafting: LlamaCppChat, gemma_path: str) -> None:
    schema = '{"type": "object", "properties": {"a": {"type": "string", "maxLength": 5}}, "required": ["a"]}'
    params = SamplingParams(0.0, 1.0, 0, 4, json_schema=schema)
    job = GenerationJob(prompt_tokens=drafting.tokenize(EXTRACTIVE), params=params)
    drafting.insert(job)
    assert drafting.draft_stats(job) == (0, 0)
    assert job.state.drafter is None
    drafting.remove(job)
