"""MlxChat: an MLX model driven through mlx-lm's `BatchGenerator` (insert, next, remove).

Created and used on the model's owner thread (chat/scheduler.py); mlx is imported only when an MLX
tier loads.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chat import structured_output, templates
from config import TierConfig
from core.protocols import GenerationJob, SamplingParams, StepOutput, check_token_ids
from core.turns import Message


class MlxChat:
    """A ChatModel over mlx-lm: continuous batching with `BatchGenerator` (insert, next, remove)."""

    def __init__(self, tier: TierConfig, path: str) -> None:
        import mlx.core as mx
        from mlx_lm import load
        from mlx_lm.generate import BatchGenerator

        self._mx = mx
        self._model, self._tokenizer = load(path)
        self.max_parallel = tier.parallel
        config_path = Path(path) / "config.json"
        self.context_length = tier.n_ctx
        if config_path.is_file():
            trained = json.loads(config_path.read_text()).get("max_position_embeddings")
            if isinstance(trained, int) and trained > 0:
                self.context_length = min(tier.n_ctx, trained)
        self._generator = BatchGenerator(
            self._model,
            stop_tokens=None,  # end-of-generation is decided here, so the scheduler sees it
            completion_batch_size=tier.parallel,
            prefill_batch_size=tier.parallel,
            prefill_step_size=max(32, tier.n_batch),
        )
        self._eos = set(self._tokenizer.eos_token_ids)
        hf_tokenizer = getattr(self._tokenizer, "_tokenizer", self._tokenizer)
        self._template = templates.select_template(
            tier.chat_template, tier.chat_format, getattr(hf_tokenizer, "chat_template", None), "llama"
        )
        self._bos_text = hf_tokenizer.bos_token or ""
        self._eos_text = hf_tokenizer.eos_token or ""
        self._hf = hf_tokenizer
        self.vocab_size = int(getattr(getattr(self._model, "args", None), "vocab_size", 0) or len(hf_tokenizer))
        self._jobs: dict[int, tuple[GenerationJob, Any]] = {}  # uid -> (job, detokenizer)

    def tokenize(self, text: str) -> list[int]:
        add_special = not (self._bos_text and text.startswith(self._bos_text))
        return list(self._hf.encode(text, add_special_tokens=add_special))

    def chat_tokens(self, messages: Sequence[Message]) -> list[int]:
        segments = templates.render_segments(
            self._template, messages, bos_token=self._bos_text, eos_token=self._eos_text
        )
        first = segments[0][0] if segments else ""
        tokens: list[int] = []
        for i, (text, special) in enumerate(segments):
            add_special = i == 0 and not (self._bos_text and first.startswith(self._bos_text))
            # split_special_tokens: a control token's text in a message is encoded as plain text
            tokens += self._hf.encode(text, add_special_tokens=add_special, split_special_tokens=not special)
        return tokens

    def render_chat(self, messages: Sequence[Message]) -> str:
        return templates.render(self._template, messages, bos_token=self._bos_text, eos_token=self._eos_text)

    def insert(self, job: GenerationJob) -> None:
        check_token_ids(job.prompt_tokens, self.vocab_size)
        if job.params.seed is not None:
            self._mx.random.seed(job.params.seed & 0xFFFFFFFF)
        sampler, processors = mlx_sampler(self._hf, job.params)
        (uid,) = self._generator.insert(
            [job.prompt_tokens],
            max_tokens=[job.params.max_tokens + 1],  # the scheduler ends the sequence, not the generator
            samplers=[sampler],
            logits_processors=[processors],
        )
        detokenizer = self._tokenizer.detokenizer
        detokenizer.reset()
        job.state = uid
        self._jobs[uid] = (job, detokenizer)

    def step(self) -> list[StepOutput]:
        _, responses = self._generator.next()
        outputs: list[StepOutput] = []
        for response in responses:
            entry = self._jobs.get(response.uid)
            if entry is None:
                continue
            job, detokenizer = entry
            token = int(response.token)
            if token in self._eos:
                outputs.append(StepOutput(job, "", token, True))
                continue
            detokenizer.add_token(token)
            outputs.append(StepOutput(job, detokenizer.last_segment, token, False))
        return outputs

    def remove(self, job: GenerationJob) -> None:
        uid = job.state
        if self._jobs.pop(uid, None) is not None:
            self._generator.remove([uid])

    def close(self) -> None:
        self._generator.close()
        self._jobs.clear()


def mlx_sampler(tokenizer: Any, params: SamplingParams) -> tuple[Any, list[Any]]:
    """mlx-lm's sampler and logits processors for a request (`tokenizer`: the Hugging Face one, for schemas)."""
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    sampler = make_sampler(
        temp=params.temperature,
        top_p=params.top_p if params.top_p < 1.0 else 0.0,
        top_k=params.top_k,
    )
    processors = make_logits_processors(
        logit_bias=dict(params.logit_bias) or None,
        repetition_penalty=params.repeat_penalty if params.repeat_penalty != 1.0 else None,
        presence_penalty=params.presence_penalty or None,
        frequency_penalty=params.frequency_penalty or None,
    )
    if params.json_schema:
        schema_tokenizer = structured_output.llguidance_tokenizer(tokenizer)
        processors = [*processors, structured_output.MlxSchemaProcessor(schema_tokenizer, params.json_schema)]
    return sampler, processors
