"""Speech-to-text backends: Whisper through faster-whisper (CTranslate2) and mlx-whisper (Apple Silicon).

Each loader runs on the tier's owner thread and imports its library there. Both decode the upload with
`decode_audio` (PyAV, FFmpeg's decoders: wav, mp3, flac, ogg, webm, m4a, ...) into 16 kHz mono
samples, refusing what is not audio, or is longer than `SPEECH_MAX_AUDIO_SECONDS`, with a 400 naming it.
A remote speech tier (remote/speech.py) forwards the file as it came.
"""

from __future__ import annotations

import gc
import io
import logging
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from config import Settings, TierConfig
from core.errors import InvalidRequest, ModelUnavailable
from core.model_paths import resolve_model_path
from core.protocols import (
    AudioFile,
    JobOutcome,
    SegmentSink,
    SpeechJob,
    TranscribeOptions,
    Transcript,
    TranscriptSegment,
    TranscriptWord,
)
from speech_batch import WindowBatcher

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    Samples = npt.NDArray[np.float32]

log = logging.getLogger("llmservice.speech")

SAMPLE_RATE = 16000  # what Whisper listens at
# Whisper's own schedule: a window whose text looks degenerate is decoded again, a little hotter.
FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


def finite(value: float, digits: int | None = None) -> float:
    """A number JSON can carry: a degenerate window's -inf log probability (or NaN) becomes 0."""
    number = float(value)
    if not math.isfinite(number):
        return 0.0
    return round(number, digits) if digits is not None else number


def temperatures(options: TranscribeOptions) -> tuple[float, ...]:
    """Temperature 0 (OpenAI's default) means whisper's fallback schedule; any other is used alone."""
    return FALLBACK_TEMPERATURES if options.temperature == 0 else (options.temperature,)


# ---------------------------------------------------------------- decoding


def decode_audio(audio: AudioFile, max_seconds: float, key: str = "SPEECH_MAX_AUDIO_SECONDS") -> Samples:
    """The file's first audio stream as float32 samples at 16 kHz, mono; a 400 naming the problem (or the
    setting `key` that bounds its length) otherwise."""
    import av
    import numpy as np

    if not audio.data:
        raise InvalidRequest("The audio file is empty", param="file")
    limit = int(max_seconds * SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    total = 0
    try:
        with av.open(io.BytesIO(audio.data), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise InvalidRequest(f"The file {audio.filename!r} has no audio stream", param="file")
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            for frame in _frames(container.decode(container.streams.audio[0])):
                frame.pts = None  # the resampler checks timestamps; broken files have gaps
                for out in resampler.resample(frame):
                    chunks.append(out.to_ndarray().reshape(-1))
                    total += chunks[-1].size
                if total > limit:
                    raise InvalidRequest(
                        f"The audio is longer than the limit of {max_seconds:g} seconds ({key})", param="file"
                    )
            chunks += [out.to_ndarray().reshape(-1) for out in resampler.resample(None)]
            del resampler
    except av.error.FFmpegError as exc:
        raise InvalidRequest(
            f"The file {audio.filename!r} could not be decoded as audio ({_reason(exc)})", param="file"
        ) from None
    finally:
        gc.collect()  # PyAV's resampler graphs hold native memory until collected (faster-whisper issue 390)
    samples = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)
    if samples.size == 0:
        raise InvalidRequest(f"The file {audio.filename!r} holds no audio samples", param="file")
    return samples.astype(np.float32) / 32768.0


def _frames(frames: Iterable[object]) -> Iterable[object]:
    """Decoded frames, skipping undecodable packets as FFmpeg's own tools do (a damaged tail keeps its head)."""
    import av

    iterator = iter(frames)
    while True:
        try:
            yield next(iterator)
        except StopIteration:
            return
        except av.error.InvalidDataError:
            continue


def _reason(exc: BaseException) -> str:
    text = str(getattr(exc, "strerror", "") or type(exc).__name__)
    return text[:120]


def check_language(language: str | None, supported: Sequence[str]) -> None:
    if language is not None and language not in supported:
        raise InvalidRequest(
            f"language {language!r} is not one this model knows: use an ISO-639-1 code such as "
            f"{', '.join(supported[:8])}",
            param="language",
        )


# ---------------------------------------------------------------- faster-whisper


class FasterWhisperTranscriber:
    """A CTranslate2 Whisper conversion (the embedded default is the packaged Whisper base)."""

    def __init__(self, tier: TierConfig, path: str) -> None:
        from faster_whisper import WhisperModel

        device = "cuda" if tier.n_gpu_layers != 0 else "cpu"  # any offload asked for: the whole model on the GPU
        self.tier = tier
        self.model = WhisperModel(
            path,
            device=device,
            compute_type=tier.compute_type,
            cpu_threads=tier.n_threads or 0,
            local_files_only=True,
        )
        self.languages = tuple(self.model.supported_languages)
        self.batcher = WindowBatcher(self.model, tier.beam_size, self._decode)

    def transcribe(self, audio: AudioFile, options: TranscribeOptions, on_segment: SegmentSink | None) -> Transcript:
        (outcome,) = self.batcher.run([SpeechJob(audio, options, on_segment)])
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def transcribe_batch(self, jobs: Sequence[SpeechJob]) -> list[JobOutcome]:
        """Several requests decoded together, window by window (speech_batch.py)."""
        return self.batcher.run(jobs)

    def _decode(self, job: SpeechJob) -> Samples:
        check_language(job.options.language, self.languages)
        return decode_audio(job.audio, self.tier.max_audio_seconds)

    def close(self) -> None:
        self.model = None  # type: ignore[assignment]  # CTranslate2 frees the weights with the last reference
        self.batcher = None  # type: ignore[assignment]
        gc.collect()


def load_faster_whisper(tier: TierConfig, settings: Settings) -> FasterWhisperTranscriber:
    path = resolve_model_path(tier.model_path)
    try:
        return FasterWhisperTranscriber(tier, path)
    except (RuntimeError, ValueError, OSError) as exc:
        # CTranslate2 names the missing or corrupt file in its message; the path stays in the log.
        log.error("the %s tier could not load %s: %s", tier.name, path, exc)
        raise ModelUnavailable(f"The {tier.name} tier's Whisper model could not be loaded") from None


# ---------------------------------------------------------------- mlx-whisper


class MlxWhisperTranscriber:
    """An MLX Whisper folder (mlx-community conversions) on Apple Silicon. mlx-whisper decodes the whole
    file before it returns, so a stream gets its segments at the end."""

    def __init__(self, tier: TierConfig, path: str) -> None:
        import mlx.core as mx
        from mlx_whisper.tokenizer import LANGUAGES
        from mlx_whisper.transcribe import ModelHolder

        ModelHolder.get_model(path, mx.float16)  # the model `transcribe` reuses; fails here, not on a request
        self.tier, self.path = tier, path
        self.languages = tuple(LANGUAGES)

    def transcribe(self, audio: AudioFile, options: TranscribeOptions, on_segment: SegmentSink | None) -> Transcript:
        import mlx_whisper

        check_language(options.language, self.languages)
        samples = decode_audio(audio, self.tier.max_audio_seconds)
        result = mlx_whisper.transcribe(
            samples,
            path_or_hf_repo=self.path,
            verbose=None,
            temperature=temperatures(options),
            initial_prompt=options.prompt or None,
            word_timestamps=options.word_timestamps,
            language=options.language,
            task=options.task,
        )
        segments: list[TranscriptSegment] = []
        words: list[TranscriptWord] = []
        for raw in result.get("segments", []):
            segment = TranscriptSegment(
                id=len(segments),
                start=finite(raw["start"], 3),
                end=finite(raw["end"], 3),
                text=str(raw["text"]),
                seek=int(raw.get("seek", 0)),
                tokens=tuple(int(t) for t in raw.get("tokens", ())),
                temperature=finite(raw.get("temperature", 0.0)),
                avg_logprob=finite(raw.get("avg_logprob", 0.0)),
                compression_ratio=finite(raw.get("compression_ratio", 0.0)),
                no_speech_prob=finite(raw.get("no_speech_prob", 0.0)),
            )
            segments.append(segment)
            words += [
                TranscriptWord(str(w["word"]), finite(w["start"]), finite(w["end"]), finite(w.get("probability", 0)))
                for w in raw.get("words", ())
            ]
            if on_segment is not None:
                on_segment(segment)
        duration = round(samples.size / SAMPLE_RATE, 3)
        text = str(result.get("text", "")).strip()
        return Transcript(text, str(result.get("language", "")), duration, tuple(segments), tuple(words))

    def close(self) -> None:
        gc.collect()


def load_mlx_whisper(tier: TierConfig, settings: Settings) -> MlxWhisperTranscriber:
    path = resolve_model_path(tier.model_path)
    try:
        return MlxWhisperTranscriber(tier, path)
    except ImportError:
        raise ModelUnavailable("mlx-whisper is not installed here (pip install mlx-whisper)") from None


FACTORIES = {
    "speech:faster_whisper": load_faster_whisper,
    "speech:mlx_whisper": load_mlx_whisper,
}
