"""LlamaCppChat: a GGUF chat model driven through llama.cpp's batch API.

One llama context holds `{TIER}_PARALLEL` sequences (one KV stream each, `N_CTX` tokens per
sequence). Every `step()` builds one batch: the last sampled token of each generating sequence plus
prompt chunks of sequences still prefilling (chunked, so a long prompt never stalls the others), runs
one `llama_decode`, and samples each sequence with its own sampler chain.

Prefix reuse (`{TIER}_PREFIX_REUSE`): a slot keeps its tokens' KV after a request leaves. A new request
takes a free slot next to the busy ones (see `_destination`), preferring one that already starts with
its prompt (a chat's next turn), else the least recently used. When another slot, busy or not, holds a
longer prefix of the prompt (the same system prompt, tools or few-shot examples), that slot's KV is
copied over (`llama_memory_seq_cp`: with one KV stream per sequence llama.cpp copies the whole stream,
N_CTX cells, at the next decode) and only the rest is prefilled. A request whose prefix another
sequence is still prefilling waits for it instead of computing the same tokens again, so concurrent
requests sharing a prompt prefill it once.

Prompt-lookup drafts (`{TIER}_SPECULATIVE=ngram`, chat/ngram_draft.py): a generating sequence's next token
goes into the batch with a guess at the tokens after it, taken from its own history; each position is
sampled with the request's own chain, in order, and the guess is kept up to the first token the model did
not choose, so every emitted token is drawn from exactly the distribution plain decoding draws it from
(greedy output is the same token for token), several per step when the guess is right.

Everything here runs on the model's owner thread (see scheduler.py), except `tokenize`, which only
reads the immutable vocabulary.
"""

from __future__ import annotations

import codecs
import ctypes
import itertools
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from chat import structured_output, templates, vision
from chat.llama_sampling import PrunedSampler, build_sampler, sample
from chat.ngram_draft import NgramDrafter
from config import TierConfig
from core.errors import BackendError, InvalidRequest
from core.protocols import GenerationJob, SamplingParams, StepOutput, check_token_ids
from core.turns import ImageInput, Message

log = logging.getLogger("llmservice.llamacpp")
# A copy moves a whole KV stream (N_CTX cells: 74 MB for Gemma 270M at 4096, ~12 ms here) whatever the
# prefix, so a shorter gain is prefilled instead; and a slot whose content goes on past the prompt's prefix
# by no more than this counts as starting the prompt (what it loses is cheap to recompute).
MIN_COPY_TOKENS = 32
DRAFT_SEQUENCES = 2  # prompt-lookup guesses only while at most this many sequences generate (see _plan)
_backend_lock = threading.Lock()
_backend_ready = False


def _init_backend() -> Any:
    global _backend_ready
    import llama_cpp

    with _backend_lock:
        if not _backend_ready:
            # llama.cpp prints every load detail to stderr unless its logger's level is raised.
            level = logging.DEBUG if log.isEnabledFor(logging.DEBUG) else logging.ERROR
            logging.getLogger("llama-cpp-python").setLevel(level)
            llama_cpp.llama_backend_init()
            _backend_ready = True
    return llama_cpp


@dataclass
class _Slot:
    seq_id: int
    cached: list[int] = field(default_factory=list)  # tokens whose KV this sequence holds
    busy: bool = False
    used_at: int = 0  # when a request last took it: the least recently used free slot is evicted first


@dataclass
class _Sequence:
    job: GenerationJob
    slot: _Slot
    pending: list[int]  # prompt tokens not yet decoded
    sampler: PrunedSampler
    decoder: Any
    matcher: Any = None  # llguidance matcher when the output must follow a JSON schema
    last_token: int | None = None  # sampled, not yet fed to the model
    reused_tokens: int = 0  # prompt tokens not prefilled: kept in its slot or copied from another
    copied_tokens: int = 0  # ... of which copied from another sequence's KV
    waiting: bool = False  # another sequence is prefilling a longer prefix of this prompt: copy it, then go on
    drafter: NgramDrafter | None = None  # prompt-lookup guesses (SPECULATIVE=ngram, free-form output only)
    image_tokens: int = 0  # image embeddings decoded into its KV (chat/vision.py)


@dataclass
class _Entry:
    """One sequence's part of a decode step."""

    key: int  # id(job)
    state: _Sequence
    tokens: list[int]
    base: int  # the position of the first token
    sample: bool  # logits wanted for the last token (a generated token, or the end of the prompt)
    prefill: bool  # the tokens come from the prompt (else the last sampled token)
    draft: list[int] = field(default_factory=list)  # guessed tokens after the last sampled one, to verify
    index: int = -1  # the batch index of the last token, set by _decode


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    start = 0
    while start < n:  # slices compare in C: a 4k-token match costs microseconds, not a Python loop
        end = min(n, start + 256)
        if a[start:end] != b[start:end]:
            return next(i for i in range(start, end) if a[i] != b[i])
        start = end
    return n


class LlamaCppChat:
    """A ChatModel over llama.cpp with continuous batching and shared-prefix KV reuse."""

    def __init__(self, tier: TierConfig, path: str) -> None:
        lib = _init_backend()
        from llama_cpp import _internals

        self._lib = lib
        if not os.path.isfile(path):
            raise FileNotFoundError(path)
        model_params = lib.llama_model_default_params()
        model_params.n_gpu_layers = tier.n_gpu_layers if tier.n_gpu_layers >= 0 else 999
        model_params.use_mmap = tier.use_mmap
        model_params.use_mlock = tier.use_mlock
        self._model = _internals.LlamaModel(path_model=path, params=model_params, verbose=False)
        self.max_parallel = tier.parallel
        threads = tier.n_threads or max(1, os.cpu_count() or 1)
        self._n_batch = max(tier.n_batch, tier.parallel)
        ctx_params = lib.llama_context_default_params()
        ctx_params.n_ctx = tier.n_ctx * tier.parallel
        ctx_params.n_batch = self._n_batch
        ctx_params.n_ubatch = min(self._n_batch, 512)
        ctx_params.n_seq_max = tier.parallel
        ctx_params.n_threads = threads
        ctx_params.n_threads_batch = threads
        ctx_params.kv_unified = False  # one KV stream per sequence: compact attention, a fixed budget each
        ctx_params.swa_full = True  # sliding-window models keep full KV so a prefix can be reused
        ctx_params.no_perf = True
        self._ctx = _internals.LlamaContext(model=self._model, params=ctx_params, verbose=False)
        self._memory = lib.llama_get_memory(self._ctx.ctx)
        self.context_length = int(lib.llama_n_ctx_seq(self._ctx.ctx))
        self._vocab = self._model.vocab
        self._n_vocab = int(lib.llama_vocab_n_tokens(self._vocab))
        self.vocab_size = self._n_vocab
        self._batch = lib.llama_batch_init(self._n_batch, 0, 1)
        self._slots = [_Slot(seq_id=i) for i in range(tier.parallel)]
        self._sequences: dict[int, _Sequence] = {}  # id(job) -> state, in insertion order
        self._prefix_reuse = tier.prefix_reuse
        self._draft_max = tier.draft_max if tier.speculative == "ngram" else 0
        self._drafted = [0, 0]  # guessed tokens verified and kept, over the model's life
        self._clock = itertools.count(1)
        self._piece = ctypes.create_string_buffer(256)
        self._candidates = _internals.LlamaTokenDataArray(n_vocab=self._n_vocab)  # for constrained sampling
        self._lltokenizer: Any = None
        metadata = self._model.metadata()
        self.architecture = metadata.get("general.architecture", "")
        self._template = templates.select_template(
            tier.chat_template, tier.chat_format, metadata.get("tokenizer.chat_template"), self.architecture
        )
        self._bos_text = self._token_text(self._model.token_bos()) if self._model.add_bos_token() else ""
        self._eos_text = self._token_text(self._model.token_eos())
        self._vision = (
            vision.Projector(tier.name, tier.mmproj, self._model.model, threads, tier.n_gpu_layers != 0)
            if tier.mmproj
            else None
        )
        self.accepts_images = self._vision is not None
        log.info(
            "llama.cpp model %s: arch=%s ctx/seq=%d parallel=%d threads=%d",
            os.path.basename(path),
            self.architecture,
            self.context_length,
            self.max_parallel,
            threads,
        )

    # ------------------------------------------------------------ text

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._model.token_get_text(token)

    def tokenize(self, text: str) -> list[int]:
        # A rendered template may already start with BOS; never add a second one.
        add_bos = self._model.add_bos_token() and not (self._bos_text and text.startswith(self._bos_text))
        return self._model.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def render_chat(self, messages: Sequence[Message]) -> str:
        return templates.render(self._template, messages, bos_token=self._bos_text, eos_token=self._eos_text)

    def chat_tokens(self, messages: Sequence[Message]) -> list[int]:
        segments = templates.render_segments(
            self._template, messages, bos_token=self._bos_text, eos_token=self._eos_text
        )
        first = segments[0][0] if segments else ""
        add_bos = self._model.add_bos_token() and not (self._bos_text and first.startswith(self._bos_text))
        tokens: list[int] = []
        for i, (text, special) in enumerate(segments):
            tokens += self._model.tokenize(text.encode("utf-8"), add_bos=add_bos and i == 0, special=special)
        return tokens

    def media_prompt(self, messages: Sequence[Message], images: Sequence[ImageInput], marker: str) -> vision.MtmdPrompt:
        if self._vision is None:
            raise InvalidRequest("This model reads no images (its tier has no MMPROJ)", param="messages")
        segments = templates.render_segments(
            self._template, messages, bos_token=self._bos_text, eos_token=self._eos_text
        )
        first = segments[0][0] if segments else ""
        add_bos = self._model.add_bos_token() and not (self._bos_text and first.startswith(self._bos_text))
        return self._vision.prompt(segments, images, marker, add_bos)

    def _piece_bytes(self, token: int) -> bytes:
        n = self._lib.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        if n < 0:
            self._piece = ctypes.create_string_buffer(-n + 16)
            n = self._lib.llama_token_to_piece(self._vocab, token, self._piece, len(self._piece), 0, False)
        return self._piece.raw[:n]

    # ------------------------------------------------------------ sampling

    def _make_matcher(self, params: SamplingParams) -> Any:
        """An llguidance matcher for the job's JSON schema (None when the output is free)."""
        if not params.json_schema:
            return None
        if self._lltokenizer is None:  # built once per model, on first use (~1 s for a 262k vocabulary)
            from llguidance.llamacpp import lltokenizer_from_vocab

            eog = [t for t in (self._model.token_eos(), self._model.token_eot()) if t >= 0]
            self._lltokenizer = lltokenizer_from_vocab(self._vocab, eos_token=eog or None)
        return structured_output.new_matcher(self._lltokenizer, params.json_schema)

    def _sample_constrained(self, state: _Sequence, index: int) -> int:
        """Mask the tokens the schema forbids, then sample with the request's own chain."""
        import numpy as np

        lib = self._lib
        logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(self._ctx.ctx, index), shape=(self._n_vocab,))
        allowed = structured_output.allowed_tokens(state.matcher, self._n_vocab)
        candidates = self._candidates
        candidates.copy_logits(np.where(allowed, logits, -np.inf).astype(np.float32))
        lib.llama_sampler_apply(state.sampler.chain, ctypes.byref(candidates.candidates))
        token = int(candidates.candidates_data.id[candidates.candidates.selected])
        state.matcher.consume_token(token)
        lib.llama_sampler_accept(state.sampler.chain, token)
        return token

    # ------------------------------------------------------------ sequences

    def insert(self, job: GenerationJob) -> None:
        free = [slot for slot in self._slots if not slot.busy]
        if not free:
            raise BackendError("no free sequence slot")
        prompt = job.prompt_tokens
        media = job.media if isinstance(job.media, vision.MtmdPrompt) else None
        if media is None:
            check_token_ids(prompt, self._n_vocab)  # an unknown id would fail the whole batch's decode
        matcher = self._make_matcher(job.params)  # both may refuse the request: before any KV change
        sampler = build_sampler(self._lib, self._n_vocab, job.params)
        slot = self._destination(free, prompt)
        # The last prompt token is always decoded: its logits give the first sampled token.
        reuse = self._prefix_reuse and media is None  # a KV prefix never stands for an image
        keep = min(common_prefix(slot.cached, prompt), len(prompt) - 1) if reuse else 0
        keep = self._trim(slot, keep)
        slot.busy = True
        slot.used_at = next(self._clock)
        state = _Sequence(
            job=job,
            slot=slot,
            pending=list(prompt[keep:]),
            sampler=sampler,
            decoder=codecs.getincrementaldecoder("utf-8")("replace"),
            matcher=matcher,
            reused_tokens=keep,
        )
        if self._draft_max and matcher is None:  # a schema-bound sequence samples through its matcher: no guesses
            state.drafter = NgramDrafter(prompt, self._draft_max)
        job.state = state
        self._sequences[id(job)] = state
        if media is not None:
            self._prefill_media(state, media)
        elif self._prefix_reuse:
            self._borrow(state)

    def _prefill_media(self, state: _Sequence, media: vision.MtmdPrompt) -> None:
        """A prompt with images goes in up to its last text now, between two batches: mtmd's helper decodes
        each text chunk and each image's embeddings into the sequence. The last text is prefilled in the
        shared batches like any prompt's, and its logits give the first token."""
        assert self._vision is not None
        try:
            for piece in media.pieces[:-1]:
                self._vision.eval_piece(self._ctx.ctx, piece, len(state.slot.cached), state.slot.seq_id, self._n_batch)
                state.slot.cached.extend(piece.tokens)
                state.image_tokens += len(piece.tokens) if piece.image else 0
        except BaseException:
            self.remove(state.job)
            self._trim(state.slot, 0)
            raise
        state.pending = list(media.pieces[-1].tokens)

    def _destination(self, free: list[_Slot], prompt: Sequence[int]) -> _Slot:
        """First the free slot that keeps the busy ones consecutive: with one KV stream per sequence llama.cpp
        splits a batch at every gap in the sequence ids, and each piece reads all the weights again (one token
        each for sequences 0, 2, 4, 6 took 2.5x as long as for 0-3 here); a prefix held elsewhere is copied in
        by `_borrow` for less than one step of a gap costs. Then the one whose content starts the prompt but
        for a short tail (a chat's previous turn); then the least recently used: its content is evicted."""
        busy = {slot.seq_id for slot in self._slots if slot.busy}

        def rank(slot: _Slot) -> tuple[int, int, int, int]:
            neighbours = (slot.seq_id - 1 in busy) + (slot.seq_id + 1 in busy)
            keep = common_prefix(slot.cached, prompt) if self._prefix_reuse else 0
            if len(slot.cached) - keep > MIN_COPY_TOKENS:
                keep = 0
            return neighbours, keep, -slot.used_at, -slot.seq_id

        return max(free, key=rank)

    def _trim(self, slot: _Slot, keep: int) -> int:
        """Drop the slot's KV from position `keep` on; the number of tokens kept (0 if it could not trim)."""
        if keep <= 0 or not self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1):
            self._lib.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            keep = 0
        del slot.cached[keep:]
        return keep

    def _borrow(self, state: _Sequence) -> None:
        """Copy the longest prefix of the prompt that another slot holds, when it beats the slot's own by
        MIN_COPY_TOKENS; when a prefilling sequence will hold a longer one, wait for it (`state.waiting`)."""
        prompt = state.job.prompt_tokens
        limit = len(prompt) - 1
        own = len(state.slot.cached)
        source, held = state.slot, own
        promised = own
        for slot in self._slots:
            if slot is state.slot:
                continue
            n = min(common_prefix(slot.cached, prompt), limit)
            if n > held:
                source, held = slot, n
        for other in self._sequences.values():
            if other is not state and other.pending and not other.waiting:
                promised = max(promised, min(common_prefix(other.job.prompt_tokens, prompt), limit))
        state.waiting = promised - max(held, own) >= MIN_COPY_TOKENS
        if state.waiting or held - own < MIN_COPY_TOKENS:
            return
        lib = self._lib
        # With one KV stream per sequence llama.cpp copies only whole streams (positions -1, -1).
        lib.llama_memory_seq_cp(self._memory, source.seq_id, state.slot.seq_id, -1, -1)
        state.slot.cached = list(source.cached)
        kept = self._trim(state.slot, held)
        state.pending = list(prompt[kept:])
        state.reused_tokens = kept
        state.copied_tokens = kept

    def remove(self, job: GenerationJob) -> None:
        state = self._sequences.pop(id(job), None)
        if state is None:
            return
        state.slot.busy = False  # its KV stays for prefix reuse; the next insert trims it
        self._lib.llama_sampler_free(state.sampler.chain)
        if job.media is not None:
            job.media.close()

    def _add(self, index: int, token: int, pos: int, seq_id: int, logits: bool) -> None:
        batch = self._batch
        batch.token[index] = token
        batch.pos[index] = pos
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = seq_id
        batch.logits[index] = logits

    def step(self) -> list[StepOutput]:
        for state in [s for s in self._sequences.values() if s.waiting]:
            self._borrow(state)  # its prefix is ready now, its source gone, or it waits on
        entries = self._plan()
        if not entries:
            return []
        if self._decode(entries):
            return self._sample(entries)
        if len(entries) == 1:
            return [self._failed(entries[0])]
        # A failed batch must cost only the sequence that caused it: undo it, then decode each alone.
        for entry in reversed(entries):
            self._undo(entry)
        outputs: list[StepOutput] = []
        for entry in entries:
            outputs.extend(self._sample([entry]) if self._decode([entry]) else [self._failed(entry)])
        return outputs

    def _plan(self) -> list[_Entry]:
        """This step's tokens per sequence, in sequence-id order: with one KV stream per sequence,
        llama.cpp splits a batch whose sequences are out of order into more micro-batches (measured ~17%
        slower once prefix reuse had reassigned slots). Generating sequences always get their token;
        prefill chunks share the rest of the batch, so a long prompt never stalls the others."""
        ordered = sorted(self._sequences.items(), key=lambda item: item[1].slot.seq_id)
        generating = sum(1 for _, s in ordered if not s.pending and s.last_token is not None)
        budget = self._n_batch - generating
        # Guesses get half of what is left while a prompt is being prefilled, all of it otherwise, and nothing
        # once more than DRAFT_SEQUENCES sequences generate: a batch already shares the weights' reads, so a
        # guessed token costs nearly what a generated one does (measured: 4 mixed streams 0.73x with guesses).
        prefilling = any(s.pending and not s.waiting for _, s in ordered)
        draft_budget = 0 if generating > DRAFT_SEQUENCES else budget // 2 if prefilling else budget
        entries: list[_Entry] = []
        for key, state in ordered:
            if state.waiting:
                continue
            if not state.pending:
                if state.last_token is not None:
                    draft = self._guess(state, min(draft_budget, budget)) if state.drafter else []
                    draft_budget -= len(draft)
                    budget -= len(draft)
                    tokens = [state.last_token, *draft]
                    entries.append(_Entry(key, state, tokens, len(state.slot.cached), True, False, draft))
                continue
            if budget <= 0:
                continue
            chunk = state.pending[:budget]
            budget -= len(chunk)
            entries.append(_Entry(key, state, chunk, len(state.slot.cached), len(chunk) == len(state.pending), True))
        return entries

    def _guess(self, state: _Sequence, budget: int) -> list[int]:
        """A prompt-lookup guess that fits the batch, the sequence's context and its token budget."""
        job = state.job
        room = min(
            budget,
            self.context_length - len(state.slot.cached) - 2,
            job.params.max_tokens - job.completion_tokens - 1,  # tokens past the budget would be thrown away
        )
        assert state.drafter is not None
        return state.drafter.propose(room)

    def _decode(self, entries: list[_Entry]) -> bool:
        """Fill the batch with the entries' tokens and decode it; the sequences' state moves on."""
        n = 0
        for entry in entries:
            state = entry.state
            for k, token in enumerate(entry.tokens):
                logits = entry.sample and (k == len(entry.tokens) - 1 or bool(entry.draft))
                self._add(n, token, entry.base + k, state.slot.seq_id, logits)
                n += 1
            entry.index = n - 1
            state.slot.cached.extend(entry.tokens)
            if entry.prefill:
                state.pending = state.pending[len(entry.tokens) :]
            else:
                state.last_token = None
        self._batch.n_tokens = n
        rc = self._lib.llama_decode(self._ctx.ctx, self._batch)
        if rc != 0:
            log.warning("llama_decode failed with status %d (%d sequences in the batch)", rc, len(entries))
        return rc == 0

    def _undo(self, entry: _Entry) -> None:
        """Put a sequence back as it was before `_decode`, its KV cells for the batch dropped."""
        state = entry.state
        del state.slot.cached[entry.base :]
        if entry.prefill:
            state.pending = entry.tokens + state.pending
        else:
            state.last_token = entry.tokens[0]
        self._lib.llama_memory_seq_rm(self._memory, state.slot.seq_id, entry.base, -1)

    def _failed(self, entry: _Entry) -> StepOutput:
        self._undo(entry)
        error = BackendError("The model failed to decode this request's tokens")
        return StepOutput(entry.state.job, "", -1, True, error=error)

    def _sample(self, entries: list[_Entry]) -> list[StepOutput]:
        outputs: list[StepOutput] = []
        for entry in entries:
            if not entry.sample:
                continue
            if entry.draft:
                self._verify(entry, outputs)
            else:
                self._emit(entry.state, self._sample_at(entry.state, entry.index), outputs)
        return outputs

    def _sample_at(self, state: _Sequence, index: int) -> int:
        if state.matcher is None:
            return sample(self._lib, self._ctx.ctx, index, state.sampler, self._n_vocab)
        return self._sample_constrained(state, index)

    def _emit(self, state: _Sequence, token: int, outputs: list[StepOutput]) -> bool:
        """Pass on a sampled token; False when it ends the generation."""
        job = state.job
        if self._lib.llama_vocab_is_eog(self._vocab, token):
            outputs.append(StepOutput(job, "", token, True))
            return False
        state.last_token = token
        if state.drafter is not None:
            state.drafter.append(token)
        text = state.decoder.decode(self._piece_bytes(token))
        outputs.append(StepOutput(job, text, token, False))
        return True

    def _verify(self, entry: _Entry, outputs: list[StepOutput]) -> None:
        """Sample each position of a guessed continuation in order, as plain decoding would, and stop at the
        first sampled token that differs from the guess: it is emitted (drawn from the model's own
        distribution), the guessed tokens after it are dropped. All guessed right: one more token for free."""
        state, draft = entry.state, entry.draft
        first = entry.index - len(draft)
        accepted = 0
        for i in range(len(draft) + 1):
            token = self._sample_at(state, first + i)
            if not self._emit(state, token, outputs) or i == len(draft) or token != draft[i]:
                break
            accepted += 1
        assert state.drafter is not None
        state.drafter.verified(len(draft), accepted)
        self._drafted[0] += len(draft)
        self._drafted[1] += accepted
        keep = entry.base + 1 + accepted  # the fed token and the guessed tokens the model agreed with
        if keep < len(state.slot.cached):
            self._lib.llama_memory_seq_rm(self._memory, state.slot.seq_id, keep, -1)
            del state.slot.cached[keep:]

    def draft_totals(self) -> tuple[int, int]:
        """Guessed tokens verified and kept since the model loaded."""
        return self._drafted[0], self._drafted[1]

    def draft_stats(self, job: GenerationJob) -> tuple[int, int]:
        """Guessed tokens proposed for the job and how many of them the model kept."""
        state = job.state
        drafter = state.drafter if isinstance(state, _Sequence) else None
        return (drafter.proposed, drafter.accepted) if drafter else (0, 0)

    def reused_tokens(self, job: GenerationJob) -> int:
        """Prompt tokens of the job that were not prefilled (kept in its slot or copied from another)."""
        state = job.state
        return state.reused_tokens if isinstance(state, _Sequence) else 0

    def copied_tokens(self, job: GenerationJob) -> int:
        """Prompt tokens of the job whose KV was copied from another sequence."""
        state = job.state
        return state.copied_tokens if isinstance(state, _Sequence) else 0

    def image_tokens(self, job: GenerationJob) -> int:
        """Image embeddings decoded into the job's sequence."""
        state = job.state
        return state.image_tokens if isinstance(state, _Sequence) else 0

    def kv_positions(self, job: GenerationJob) -> int:
        """Positions the job's sequence holds in the KV cache (its n_past)."""
        state = job.state
        if not isinstance(state, _Sequence):
            return 0
        return int(self._lib.llama_memory_seq_pos_max(self._memory, state.slot.seq_id)) + 1

    def close(self) -> None:
        for state in list(self._sequences.values()):
            self.remove(state.job)
        if self._vision is not None:
            self._vision.close()
        if self._batch is not None:
            self._lib.llama_batch_free(self._batch)
            self._batch = None
        self._ctx.close()
        self._model.close()
