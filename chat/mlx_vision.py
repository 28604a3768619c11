"""MLX vision models through mlx-vlm: a model folder whose config has a vision tower.

mlx-vlm's models are not mlx-lm's, so mlx-lm's `BatchGenerator` cannot drive them: `MlxVisionChat` runs each
sequence, with images or not, as its own mlx-vlm `generate_step` generator on the owner thread, one token per
step for every active sequence (sequences interleave; they do not share a batch). Prompts are built here, as
for the other engines: the template's segments tokenized with control tokens only where the template wrote
them, each image marker replaced by the model's image token repeated once per embedding, and the pixels
prepared by the folder's image processor. LLaVA-style processors (a `patch_size`, one embedding per patch)
are supported; mlx-vlm is imported only when such a tier loads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chat import templates
from chat.mlx_engine import mlx_sampler
from config import TierConfig
from core.errors import InvalidRequest, ModelUnavailable
from core.protocols import GenerationJob, StepOutput, check_token_ids
from core.turns import ImageInput, Message


def is_vision_folder(path: str) -> bool:
    """A model folder whose config has a vision tower (what mlx-vlm loads), read without loading anything."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("vision_config"), dict)


@dataclass
class MlxMediaPrompt:
    """A prompt with images for an mlx-vlm model: its tokens (image tokens included) and the images' pixels."""

    tokens: list[int]
    images: int
    pixel_values: Any  # numpy array (images, channels, height, width)

    def close(self) -> None:
        """Nothing native to free: the pixels are a numpy array."""


@dataclass
class _Running:
    job: GenerationJob
    steps: Iterator[tuple[Any, Any]]
    generated: list[int] = field(default_factory=list)
    sent: str = ""  # the text already handed out


class MlxVisionChat:
    """A ChatModel (and VisionChatModel) over an mlx-vlm model; see the module's docstring."""

    accepts_images = True

    def __init__(self, tier: TierConfig, path: str) -> None:
        import mlx.core as mx
        from mlx_vlm import load

        self._mx = mx
        self._model, self._processor = load(path)
        self._tokenizer = self._processor.tokenizer
        self._patch = getattr(self._processor, "patch_size", None)
        if not isinstance(self._patch, int):
            raise ModelUnavailable(
                f"The {tier.name} tier's MLX vision model has a processor without a patch size: only LLaVA-style "
                "vision models are supported on MLX yet"
            )
        config = self._model.config
        self._image_token = int(config.image_token_index)
        self.max_parallel = tier.parallel
        trained = getattr(config.text_config, "max_position_embeddings", 0) or tier.n_ctx
        self.context_length = min(tier.n_ctx, int(trained))
        self.vocab_size = int(getattr(config.text_config, "vocab_size", 0) or len(self._tokenizer))
        eos = config.eos_token_id if config.eos_token_id is not None else self._tokenizer.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos])
        self._template = templates.select_template(
            tier.chat_template, tier.chat_format, getattr(self._tokenizer, "chat_template", None), "llama"
        )
        self._bos_text = self._tokenizer.bos_token or ""
        self._eos_text = self._tokenizer.eos_token or ""
        self._prefill_step = max(32, tier.n_batch)
        self._running: dict[int, _Running] = {}

    # ------------------------------------------------------------ text

    def tokenize(self, text: str) -> list[int]:
        add_special = not (self._bos_text and text.startswith(self._bos_text))
        return list(self._tokenizer.encode(text, add_special_tokens=add_special))

    def render_chat(self, messages: Sequence[Message]) -> str:
        return templates.render(self._template, messages, bos_token=self._bos_text, eos_token=self._eos_text)

    def chat_tokens(self, messages: Sequence[Message]) -> list[int]:
        return self._segment_tokens(self._segments(messages), "", 0)[0]

    def _segments(self, messages: Sequence[Message]) -> list[templates.Segment]:
        return templates.render_segments(self._template, messages, bos_token=self._bos_text, eos_token=self._eos_text)

    def _segment_tokens(self, segments: list[templates.Segment], marker: str, per_image: int) -> tuple[list[int], int]:
        first = segments[0][0] if segments else ""
        tokens: list[int] = []
        images = 0
        for i, (text, special) in enumerate(segments):
            add_special = i == 0 and not (self._bos_text and first.startswith(self._bos_text))
            pieces = text.split(marker) if marker else [text]
            for k, piece in enumerate(pieces):
                if k:
                    tokens += [self._image_token] * per_image
                    images += 1
                if piece:
                    # split_special_tokens: a control token's text in a message is encoded as plain text
                    tokens += self._tokenizer.encode(
                        piece, add_special_tokens=add_special and not tokens, split_special_tokens=not special
                    )
        return tokens, images

    # ------------------------------------------------------------ images (any thread)

    def media_prompt(self, messages: Sequence[Message], images: Sequence[ImageInput], marker: str) -> MlxMediaPrompt:
        import io

        from PIL import Image

        pictures = []
        for image in images:
            with Image.open(io.BytesIO(image.data)) as opened:
                pictures.append(opened.convert("RGB"))
        # The image processor alone: mlx-vlm's LLaVA processor passes text options to it, which transformers 5 refuses.
        pixel_values = self._processor.image_processor(pictures, return_tensors="np")["pixel_values"]
        height, width = pixel_values.shape[-2:]
        per_image = (height // self._patch) * (width // self._patch) + self._processor.num_additional_image_tokens
        if self._processor.vision_feature_select_strategy == "default":
            per_image -= 1  # the CLS embedding is dropped
        tokens, seen = self._segment_tokens(self._segments(messages), marker, per_image)
        if seen != len(images):
            raise InvalidRequest("The chat template left out or repeated a message that holds an image")
        return MlxMediaPrompt(tokens, len(images), pixel_values)

    # ------------------------------------------------------------ sequences (owner thread)

    def insert(self, job: GenerationJob) -> None:
        from mlx_vlm.generate.ar import generate_step

        media = job.media if isinstance(job.media, MlxMediaPrompt) else None
        if media is None:
            check_token_ids(job.prompt_tokens, self.vocab_size)
        sampler, processors = mlx_sampler(self._tokenizer, job.params)
        mx = self._mx
        pixels = mx.array(media.pixel_values) if media is not None else None
        steps = generate_step(
            mx.array([job.prompt_tokens]),
            self._model,
            pixels,
            None,
            max_tokens=job.params.max_tokens + 1,  # the scheduler ends the sequence, not the generator
            sampler=sampler,
            logits_processors=processors,
            prefill_step_size=self._prefill_step,
            seed=job.params.seed,
        )
        job.state = id(job)
        self._running[id(job)] = _Running(job, iter(steps))

    def step(self) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        for running in list(self._running.values()):
            token = int(next(running.steps)[0])
            if token in self._eos:
                outputs.append(StepOutput(running.job, "", token, True))
                continue
            running.generated.append(token)
            text = self._tokenizer.decode(running.generated)
            if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
                outputs.append(StepOutput(running.job, "", token, False))
                continue
            outputs.append(StepOutput(running.job, text[len(running.sent) :], token, False))
            running.sent = text
        return outputs

    def remove(self, job: GenerationJob) -> None:
        running = self._running.pop(id(job), None)
        if running is not None and job.media is not None:
            job.media.close()

    def close(self) -> None:
        self._running.clear()
