"""The small protocols every backend implements, their value types, and the factory registry.

Nothing here imports an ML library: a factory imports its library when it is called, on the owner
thread of the model it loads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from config import Settings, TierConfig
from core.errors import InvalidRequest, ServiceError
from core.turns import ChatBackend, ImageInput, Message

# ---------------------------------------------------------------- chat


@dataclass(frozen=True)
class SamplingParams:
    temperature: float
    top_p: float
    top_k: int
    max_tokens: int
    stop: tuple[str, ...] = ()
    seed: int | None = None
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    json_schema: str | None = None  # canonical JSON schema the output must follow (structured_output.py)
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias); -100 bans a token, +100 forces it


class MediaPrompt(Protocol):
    """A prompt holding images, prepared by the model that runs it (chat/vision.py for llama.cpp)."""

    tokens: list[int]  # what the job's prompt_tokens hold: text tokens, one placeholder per image embedding
    images: int

    def close(self) -> None:
        """Free its native memory (the images' preprocessed pixels)."""
        ...


@dataclass
class GenerationJob:
    """One sequence to generate. The owner thread reads it; `cancelled` may be set from any thread."""

    prompt_tokens: list[int]
    params: SamplingParams
    cancelled: threading.Event = field(default_factory=threading.Event)
    media: MediaPrompt | None = None  # a prompt with images: the model prefills it (and frees it on remove)
    # Filled by the scheduler:
    completion_tokens: int = 0
    state: Any = None  # the backend's per-sequence state (slot, sampler, detokenizer)


@dataclass(frozen=True)
class StepOutput:
    """What one decode step produced for one sequence."""

    job: GenerationJob
    text: str  # complete UTF-8 text for the token (may be "" while a multi-byte char is pending)
    token: int
    end_of_generation: bool  # the model emitted an end-of-generation token (not part of the text)
    error: ServiceError | None = None  # this sequence failed (the others of the step go on)


class ChatModel(Protocol):
    """A loaded chat/completions model, used only from its owner thread.

    The scheduler drives it like mlx-lm's BatchGenerator: insert sequences, step them all one token,
    remove finished ones. A backend without batching reports `max_parallel == 1`.
    """

    context_length: int
    max_parallel: int
    vocab_size: int  # token ids are 0 .. vocab_size - 1

    def tokenize(self, text: str) -> list[int]:
        """Tokens of a prompt, with the BOS token the model expects and special tokens parsed."""
        ...

    def render_chat(self, messages: Sequence[Message]) -> str:
        """The prompt text for a conversation, ending with the assistant's generation prompt."""
        ...

    def chat_tokens(self, messages: Sequence[Message]) -> list[int]:
        """The conversation's prompt tokens: control tokens only where the template put them, the
        messages' text tokenized as text (chat/templates.py `render_segments`)."""
        ...

    def insert(self, job: GenerationJob) -> None:
        """Start a sequence (prefill may happen here or in the next steps)."""
        ...

    def step(self) -> list[StepOutput]:
        """Advance every active sequence by one token."""
        ...

    def remove(self, job: GenerationJob) -> None:
        """Drop a sequence and free its memory."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class VisionChatModel(ChatModel, Protocol):
    """A chat model that may read images; `accepts_images` says whether this one does (a projector is loaded)."""

    accepts_images: bool

    def media_prompt(self, messages: Sequence[Message], images: Sequence[ImageInput], marker: str) -> MediaPrompt:
        """The conversation's prompt with each `marker` in the messages' text replaced by that image."""
        ...


def check_token_ids(tokens: Sequence[int], n_vocab: int) -> None:
    """A 400 naming the first id outside the vocabulary (ids beyond 32 bits included)."""
    bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
    if bad is not None:
        raise InvalidRequest(f"Token id {bad} is outside this model's vocabulary (0..{n_vocab - 1})", param="prompt")


# ---------------------------------------------------------------- embeddings and rerank


@dataclass
class EmbeddingResult:
    dense: list[list[float]] | None = None
    sparse: list[dict[int, float]] | None = None  # token id -> weight
    colbert: list[list[list[float]]] | None = None
    token_counts: list[int] = field(default_factory=list)


class Embedder(Protocol):
    """A loaded embedding model, used only from its owner thread."""

    dimension: int
    max_input_tokens: int
    supported_types: tuple[str, ...]  # subset of ("dense", "sparse", "colbert")

    def embed(self, texts: Sequence[str], types: Sequence[str], truncate: bool) -> EmbeddingResult: ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...

    def close(self) -> None: ...


class Reranker(Protocol):
    """A loaded reranker, used only from its owner thread. Scores are raw logits or similarities.

    `score` takes (query, document) pairs rather than one query and its documents, so concurrent
    requests with different queries can be micro-batched into one forward pass.
    """

    scores_are_logits: bool  # True: sigmoid maps to [0, 1]; False: cosine similarities in [-1, 1]
    max_input_tokens: int

    def score(self, pairs: Sequence[tuple[str, str]]) -> list[float]: ...

    def count_tokens(self, texts: Sequence[str]) -> list[int]: ...

    def close(self) -> None: ...


# ---------------------------------------------------------------- speech


@dataclass(frozen=True)
class AudioFile:
    """An uploaded audio file as sent: local backends decode it (speech.decode_audio), a remote one forwards it."""

    data: bytes
    filename: str = "audio"
    content_type: str = "application/octet-stream"


@dataclass(frozen=True)
class TranscribeOptions:
    task: str = "transcribe"  # or "translate" (into English)
    language: str | None = None  # ISO-639-1 code; None = detect
    prompt: str | None = None  # earlier text or spellings to follow
    temperature: float = 0.0  # 0: whisper's fallback schedule (0.0, 0.2, ... 1.0) when decoding fails
    word_timestamps: bool = False


@dataclass(frozen=True)
class TranscriptWord:
    word: str
    start: float
    end: float
    probability: float = 0.0


@dataclass(frozen=True)
class TranscriptSegment:
    id: int
    start: float  # seconds from the start of the audio
    end: float
    text: str
    seek: int = 0
    tokens: tuple[int, ...] = ()
    temperature: float = 0.0
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0
    no_speech_prob: float = 0.0


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str  # ISO-639-1 code, detected or as asked
    duration: float  # seconds of audio
    segments: tuple[TranscriptSegment, ...] = ()
    words: tuple[TranscriptWord, ...] = ()  # only when word timestamps were asked for


# Called on the owner thread with each segment as soon as it is decoded (streaming); it may raise to stop.
SegmentSink = Callable[[TranscriptSegment], None]


class Transcriber(Protocol):
    """A loaded speech-to-text model, used only from its owner thread."""

    def transcribe(self, audio: AudioFile, options: TranscribeOptions, on_segment: SegmentSink | None) -> Transcript:
        """The transcript of `audio`; a file that is not audio, or too long, is an `InvalidRequest`."""
        ...

    def close(self) -> None: ...


def _never() -> bool:
    return False


@dataclass(frozen=True)
class SpeechJob:
    """One request's transcription, as the owner thread gets it (possibly with others to batch)."""

    audio: AudioFile
    options: TranscribeOptions
    on_segment: SegmentSink | None = None
    cancelled: Callable[[], bool] = _never  # the client left: stop at the next window
    # Called once with the outcome as soon as this job ends, before the rest of its batch does.
    on_done: Callable[[JobOutcome], None] | None = None


# A transcript, or the error of that request alone (a bad file fails only its own request in a batch).
JobOutcome = Transcript | Exception


@runtime_checkable
class BatchTranscriber(Transcriber, Protocol):
    """A Transcriber that can decode several requests together (speech_batch.py for faster-whisper)."""

    def transcribe_batch(self, jobs: Sequence[SpeechJob]) -> list[JobOutcome]:
        """One outcome per job, in order; never raises for one job's fault."""
        ...


# ---------------------------------------------------------------- registry

# A factory loads the model of a tier; it is called on the model's owner thread and returns a
# ChatModel, Embedder, Reranker or Transcriber. Keys are "kind:backend", e.g. "chat:llamacpp". The settings let a
# tier read another tier's config (the similarity reranker loads the embedding tier's model).
# A key "turns:backend" names instead a chat backend that serves whole turns itself (an upstream
# server): it is called on the event loop, returns a `ChatBackend` at once and needs no owner thread.
LoadedModel = ChatModel | Embedder | Reranker | Transcriber
Factory = Callable[[TierConfig, Settings], LoadedModel] | Callable[[TierConfig, Settings], ChatBackend]
