"""Images for llama.cpp chat models: a multimodal projector (`{TIER}_MMPROJ`) through llama.cpp's mtmd.

`Projector.prompt` turns a rendered conversation plus its images into an `MtmdPrompt`: mtmd splits it into
text chunks (tokenized as the template's segments say: control tokens only where the template wrote them)
and image chunks (the image resized and normalised for the vision tower). The engine prefills a prompt's
text chunks in its shared batches and evaluates each image chunk with `eval_image` on its owner thread
between two batches (mtmd's helper encodes the image and decodes its embeddings into the sequence's KV).

In the prompt's token list an image stands as one placeholder per embedding, a negative id: positions and
counts (context check, usage) come out right, and no text prompt ever shares a prefix across an image, since
no text token is negative. `tokenize` reads only the projector's settings and the vocabulary, so it runs off
the owner thread, like `LlamaCppChat.tokenize`.
"""

from __future__ import annotations

import ctypes
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from chat.templates import Segment
from core.errors import BackendError, InvalidRequest, ModelUnavailable
from core.turns import ImageInput

log = logging.getLogger("llmservice.vision")
IMAGE_PLACEHOLDER = -1  # the prompt's token for each image embedding (never a vocabulary id)
_TEXT_CHUNK = 0  # MTMD_INPUT_CHUNK_TYPE_TEXT


@dataclass
class Piece:
    """A run of the prompt, one mtmd chunk: text tokens, or an image's placeholders."""

    tokens: list[int]
    chunk: Any  # mtmd_input_chunk_p, owned by the prompt's chunk list
    image: bool


@dataclass
class MtmdPrompt:
    """A prompt with images: its pieces in order, their tokens flattened, and mtmd's chunks (native memory,
    freed by `close`, or when the prompt is collected if it never ran)."""

    pieces: list[Piece]
    tokens: list[int]
    images: int
    _free: Any = field(default=None, repr=False)

    @property
    def image_tokens(self) -> int:
        return sum(len(p.tokens) for p in self.pieces if p.image)

    def close(self) -> None:
        if self._free is not None:
            self._free()


class Projector:
    """The mtmd context of one llama.cpp model. Loaded and used on the model's owner thread (but `prompt`)."""

    def __init__(self, tier: str, path: str, model: Any, threads: int, use_gpu: bool) -> None:
        from llama_cpp import mtmd_cpp
        from llama_cpp._logger import llama_log_callback

        self._mtmd = mtmd_cpp
        # mtmd logs every load and encode detail on its own logger: send it where llama.cpp's goes.
        mtmd_cpp.mtmd_log_set(llama_log_callback, ctypes.c_void_p(0))
        mtmd_cpp.mtmd_helper_log_set(llama_log_callback, ctypes.c_void_p(0))
        params = mtmd_cpp.mtmd_context_params_default()
        params.use_gpu = use_gpu
        params.n_threads = threads
        params.print_timings = False
        params.warmup = False
        self._ctx = mtmd_cpp.mtmd_init_from_file(path.encode(), model, params)
        problem = ""
        if not self._ctx:
            problem = "not a projector llama.cpp loads, or one made for another model"
        elif not mtmd_cpp.mtmd_support_vision(self._ctx):
            problem = "a projector without a vision encoder"
        elif mtmd_cpp.mtmd_decode_use_mrope(self._ctx):
            # M-RoPE models (Qwen2-VL family) place image embeddings on a 2-D grid of positions, which the
            # engine's one-position-per-token batches cannot express yet.
            problem = "a projector with M-RoPE positions (Qwen2-VL family), not supported yet"
        if problem:
            self.close()
            log.error("the %s tier's MMPROJ %s is %s", tier, path, problem)
            raise ModelUnavailable(f"The {tier} tier's multimodal projector (MMPROJ) is {problem}")

    def close(self) -> None:
        if self._ctx:
            self._mtmd.mtmd_free(self._ctx)
            self._ctx = None

    # ------------------------------------------------------------ tokenize (any thread)

    def prompt(
        self, segments: Sequence[Segment], images: Sequence[ImageInput], marker: str, add_bos: bool
    ) -> MtmdPrompt:
        """The rendered prompt's segments with `marker` where each image goes, as mtmd chunks."""
        m = self._mtmd
        keep: list[Any] = []  # ctypes objects the parts point to, alive until mtmd_tokenize returns
        parts: list[Any] = []
        bitmaps: list[Any] = []
        seen = 0
        try:
            for text, special in segments:
                for k, piece in enumerate(text.split(marker)):
                    if k:  # a marker stood here
                        if seen >= len(images):
                            raise InvalidRequest("The chat template repeated an image of the conversation")
                        bitmap = _bitmap(m, images[seen])
                        bitmaps.append(bitmap)
                        part = m.mtmd_input_part()
                        part.bitmap = bitmap
                        parts.append(part)
                        seen += 1
                    if piece:
                        encoded = piece.encode("utf-8")
                        entry = m.mtmd_input_text()
                        entry.text, entry.text_len = encoded, len(encoded)
                        entry.add_special, entry.parse_special = False, special
                        keep += [encoded, entry]
                        part = m.mtmd_input_part()
                        part.text = ctypes.pointer(entry)
                        parts.append(part)
            if seen != len(images):
                raise InvalidRequest("The chat template left out a message that holds an image", param="messages")
            array = (ctypes.POINTER(m.mtmd_input_part) * len(parts))(*(ctypes.pointer(p) for p in parts))
            chunks = m.mtmd_input_chunks_init()
            rc = m.mtmd_tokenize_from_parts(self._ctx, chunks, array, len(parts), add_bos)
            if rc != 0:
                m.mtmd_input_chunks_free(chunks)
                raise InvalidRequest(f"The model's projector could not prepare an image (mtmd status {rc})")
        finally:
            for bitmap in bitmaps:  # the chunks hold their own preprocessed copies
                m.mtmd_bitmap_free(bitmap)
        try:
            return self._pieces(chunks, len(images))
        except BaseException:
            m.mtmd_input_chunks_free(chunks)
            raise

    def _pieces(self, chunks: Any, images: int) -> MtmdPrompt:
        m = self._mtmd
        pieces: list[Piece] = []
        for i in range(m.mtmd_input_chunks_size(chunks)):
            chunk = m.mtmd_input_chunks_get(chunks, i)
            if m.mtmd_input_chunk_get_type(chunk) == _TEXT_CHUNK:
                n = ctypes.c_size_t()
                tokens = m.mtmd_input_chunk_get_tokens_text(chunk, ctypes.byref(n))
                pieces.append(Piece([int(tokens[j]) for j in range(n.value)], chunk, image=False))
            else:
                n_tokens = int(m.mtmd_input_chunk_get_n_tokens(chunk))
                pieces.append(Piece([IMAGE_PLACEHOLDER] * n_tokens, chunk, image=True))
        if not pieces or pieces[-1].image:
            raise InvalidRequest("A prompt must not end with an image (the chat template adds no text after it)")
        prompt = MtmdPrompt(pieces, [t for p in pieces for t in p.tokens], images)
        prompt._free = weakref.finalize(prompt, m.mtmd_input_chunks_free, chunks)
        return prompt

    # ------------------------------------------------------------ evaluate (owner thread)

    def eval_piece(self, lctx: Any, piece: Piece, n_past: int, seq_id: int, n_batch: int) -> None:
        """Decode `piece` into sequence `seq_id` from position `n_past`: its text, or its image encoded by the
        vision tower and projected into the text model's embeddings."""
        import llama_cpp

        # For a text chunk the helper adds to *new_n_past instead of setting it: start it at n_past.
        new_n_past = llama_cpp.llama_pos(n_past)
        rc = self._mtmd.mtmd_helper_eval_chunk_single(
            self._ctx, lctx, piece.chunk, n_past, seq_id, n_batch, False, ctypes.byref(new_n_past)
        )
        if rc != 0:
            raise BackendError(f"The model failed to prefill a prompt with images (mtmd status {rc})")
        if new_n_past.value != n_past + len(piece.tokens):
            placed = new_n_past.value - n_past
            raise BackendError(f"The projector placed {len(piece.tokens)} tokens on {placed} positions")


def _bitmap(m: Any, image: ImageInput) -> Any:
    pixels = image.rgb()
    buffer = (ctypes.c_uint8 * len(pixels)).from_buffer_copy(pixels)
    bitmap = m.mtmd_bitmap_init(image.width, image.height, buffer)
    if not bitmap:
        raise InvalidRequest("An image could not be handed to the model's projector")
    return bitmap
