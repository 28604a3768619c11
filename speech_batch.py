"""Whisper over several requests at once (faster-whisper's model, CTranslate2): one `generate` call per
step for the current 30 s window of every request in the batch (and one encoder call, except on a CPU).

faster-whisper's own `BatchedInferencePipeline` batches the windows of *one* file, after a VAD split, and
drops what its sequential `transcribe` does (the temperature fallback, conditioning on earlier text, the
no-speech check), so a request would answer differently alone and in company. Here each request keeps
`WhisperModel.generate_segments`'s algorithm window by window (the same defaults as
`WhisperModel.transcribe`), in lockstep with the others: its window's features are stacked with theirs
for the encoder; the prompts (each request's own language, task and earlier text) go to one `generate`;
the windows whose text looks degenerate are decoded again, a little hotter, together; each result is
split back into that request's segments and words, which reach its sink as they are decoded.

Two limits of CTranslate2 shape the grouping: `generate` takes one temperature for the batch (so the
route batches only requests with the same temperature, and a mixed batch is stepped one temperature at a
time), and wants `<|startoftranscript|>` at the same position in every prompt (so prompts are grouped by
the length of their earlier-text part).

On a CPU the encoder is compute-bound: a batch of rows costs at least the sum of its rows, so there each
window is encoded alone and only the decoder runs batched (BENCHMARKS.md, "Speech"). Elsewhere (CUDA)
the encoder runs batched too, which is where GPUs gain (not measured here).

The language of a request that names none is detected on its first window's encoder output, not on a
second encoding of it as `WhisperModel.transcribe` does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from core.errors import ClientGone
from core.protocols import (
    BatchTranscriber,
    JobOutcome,
    SpeechJob,
    Transcriber,
    Transcript,
    TranscriptSegment,
    TranscriptWord,
)

if TYPE_CHECKING:
    import ctranslate2
    import numpy as np
    import numpy.typing as npt
    from faster_whisper import WhisperModel
    from faster_whisper.tokenizer import Tokenizer

    Samples = npt.NDArray[np.float32]
    StorageView = ctranslate2.StorageView

log = logging.getLogger("llmservice.speech")

# WhisperModel.transcribe's defaults, which the in-process figures in BENCHMARKS.md use too.
BEST_OF = 5
COMPRESSION_RATIO_THRESHOLD = 2.4
LOG_PROB_THRESHOLD = -1.0
NO_SPEECH_THRESHOLD = 0.6
PROMPT_RESET_ON_TEMPERATURE = 0.5
MAX_INITIAL_TIMESTAMP = 1.0
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"


@dataclass
class _Request:
    """One request's place in its audio and what it has decoded so far."""

    job: SpeechJob
    features: np.ndarray  # (n_mels, frames) over the whole file
    duration: float
    tokenizer: Tokenizer | None = None  # made once the language is known
    seek: int = 0  # the next window's first frame
    all_tokens: list[int] = field(default_factory=list)
    prompt_reset_since: int = 0
    last_speech: float = 0.0
    segments: list[TranscriptSegment] = field(default_factory=list)
    words: list[TranscriptWord] = field(default_factory=list)
    error: Exception | None = None

    @property
    def content_frames(self) -> int:
        return int(self.features.shape[-1]) - 1

    @property
    def finished(self) -> bool:
        return self.error is not None or self.seek >= self.content_frames


@dataclass
class _Window:
    request: _Request
    features: np.ndarray  # (n_mels, 3000): padded or trimmed
    size: int  # frames of real audio in it
    prompt: list[int] = field(default_factory=list)
    decoded: tuple[ctranslate2.models.WhisperGenerationResult, float, float, float] | None = None
    tried: list[tuple[ctranslate2.models.WhisperGenerationResult, float, float, float]] = field(default_factory=list)


class WindowBatcher:
    """Runs `generate_segments`'s loop for many requests together on one WhisperModel (owner thread only)."""

    def __init__(self, model: WhisperModel, beam_size: int, decode: Callable[[SpeechJob], Samples]) -> None:
        self.model = model
        self.beam_size = beam_size
        self.decode = decode  # the upload to 16 kHz samples, or an InvalidRequest for that request alone
        self.windows_run = 0  # encoder rows so far (tests and status)
        self.largest_batch = 0

    def run(self, jobs: Sequence[SpeechJob]) -> list[JobOutcome]:
        """One outcome per job: its transcript, or the error of that job alone."""
        requests = [self._start(job) for job in jobs]
        for request in requests:
            if request.finished:  # not audio: its client hears at once
                _tell(request.job, self._outcome(request))
        while active := [r for r in requests if not r.finished]:
            for request in active:
                if request.job.cancelled():
                    request.error = ClientGone("The client disconnected")
            active = [r for r in active if r.error is None]
            if not active:
                break
            for group in _by_temperature(active):
                try:
                    self._step(group)
                except Exception as exc:  # noqa: BLE001 - a model fault fails this step's requests, not the thread
                    log.error("a batched speech step of %d requests failed: %s", len(group), type(exc).__name__)
                    for request in group:
                        request.error = request.error or exc
            for request in active:
                if request.finished:
                    _tell(request.job, self._outcome(request))
        return [self._outcome(request) for request in requests]

    # ------------------------------------------------------------ per request

    def _start(self, job: SpeechJob) -> _Request:
        import numpy as np

        try:
            samples = self.decode(job)
        except Exception as exc:  # noqa: BLE001 - a bad file fails its own request only
            return _Request(job, np.zeros((1, 1), dtype=np.float32), 0.0, error=exc)
        features = self.model.feature_extractor(samples)
        return _Request(job, features, samples.shape[0] / self.model.feature_extractor.sampling_rate)

    def _outcome(self, request: _Request) -> JobOutcome:
        if request.error is not None:
            return request.error
        text = "".join(s.text for s in request.segments).strip()
        language = request.tokenizer.language_code if request.tokenizer is not None else request.job.options.language
        duration = round(request.duration, 3)
        return Transcript(text, language or "", duration, tuple(request.segments), tuple(request.words))

    # ------------------------------------------------------------ one step: a window of each request

    def _step(self, active: list[_Request]) -> None:
        from faster_whisper.audio import pad_or_trim

        nb_max = self.model.feature_extractor.nb_max_frames
        windows = []
        for request in active:
            size = min(nb_max, request.content_frames - request.seek)
            piece = request.features[:, request.seek : request.seek + size]
            windows.append(_Window(request, pad_or_trim(piece), size))
        encoded = self._encode([w.features for w in windows])
        self.windows_run += len(windows)
        self.largest_batch = max(self.largest_batch, len(windows))
        self._ensure_tokenizers(windows, encoded)
        for window in windows:
            request = window.request
            assert request.tokenizer is not None
            window.prompt = self.model.get_prompt(
                request.tokenizer, request.all_tokens[request.prompt_reset_since :], without_timestamps=False
            )
        self._generate_with_fallback(windows, encoded)
        for index, window in enumerate(windows):
            try:
                self._advance(window, lambda i=index: self._rows(encoded, windows, [i]))
            except Exception as exc:  # noqa: BLE001 - its sink raised (the client left), or its words failed
                window.request.error = exc

    def _encode(self, windows: list[np.ndarray]) -> StorageView:
        """The windows' encoder output, as one batch. On a CPU the encoder is compute-bound and a batch of
        rows ran no faster than the rows one by one (slower on a busy machine: BENCHMARKS.md, "Speech"),
        so there the rows are encoded one by one and stacked for the decoder, whose steps do gain."""
        import ctranslate2
        import numpy as np

        if len(windows) == 1 or self.model.model.device != "cpu":
            return self.model.encode(np.stack(windows))
        rows = [np.asarray(self.model.encode(window[np.newaxis])) for window in windows]
        return ctranslate2.StorageView.from_array(np.concatenate(rows))

    def _ensure_tokenizers(self, windows: list[_Window], encoded: ctranslate2.StorageView) -> None:
        """Each request's tokenizer, once its language is known: named, or detected on this first window."""
        from faster_whisper.tokenizer import Tokenizer

        model = self.model
        unknown = [i for i, w in enumerate(windows) if w.request.tokenizer is None]
        if not unknown:
            return
        detect = [i for i in unknown if windows[i].request.job.options.language is None and model.model.is_multilingual]
        detected: dict[int, str] = {}
        if detect:
            rows = self._rows(encoded, windows, detect)
            for i, ranked in zip(detect, model.model.detect_language(rows), strict=True):
                detected[i] = ranked[0][0][2:-2]  # "<|en|>" -> "en"
        for i in unknown:
            request = windows[i].request
            options = request.job.options
            language = detected.get(i) or (options.language if model.model.is_multilingual else "en") or "en"
            request.tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, options.task, language)
            if options.prompt:
                request.all_tokens.extend(request.tokenizer.encode(" " + options.prompt.strip()))

    def _rows(
        self, encoded: ctranslate2.StorageView, windows: list[_Window], rows: list[int]
    ) -> ctranslate2.StorageView:
        """The encoder output of some windows: sliced on the CPU, encoded again elsewhere (rare: a fallback)."""
        import ctranslate2
        import numpy as np

        if len(rows) == len(windows):
            return encoded
        if encoded.device == "cpu":
            return ctranslate2.StorageView.from_array(np.ascontiguousarray(np.asarray(encoded)[rows]))
        return self.model.encode(np.stack([windows[i].features for i in rows]))

    def _generate_with_fallback(self, windows: list[_Window], encoded: ctranslate2.StorageView) -> None:
        """`WhisperModel.generate_with_fallback` for every window at once: the windows whose text looks
        degenerate are decoded again, together, at the next temperature of the schedule."""
        from faster_whisper.transcribe import get_compression_ratio, get_suppressed_tokens

        temperatures = _schedule(windows[0].request.job.options.temperature)  # one per step (_by_temperature)
        pending = list(range(len(windows)))
        temperature = temperatures[0]
        for temperature in temperatures:
            if not pending:
                break
            retry: list[int] = []
            for group in _same_sot_position(windows, pending):
                tokenizer = windows[group[0]].request.tokenizer
                assert tokenizer is not None
                results = self.model.model.generate(
                    self._rows(encoded, windows, group),
                    [windows[i].prompt for i in group],
                    max_length=self.model.max_length,
                    return_scores=True,
                    return_no_speech_prob=True,
                    suppress_blank=True,
                    suppress_tokens=get_suppressed_tokens(tokenizer, [-1]),
                    max_initial_timestamp_index=int(round(MAX_INITIAL_TIMESTAMP / self.model.time_precision)),
                    **self._sampling(temperature),
                )
                for i, result in zip(group, results, strict=True):
                    window = windows[i]
                    tokens = result.sequences_ids[0]
                    avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)  # length_penalty 1
                    text = window.request.tokenizer.decode(tokens).strip() if window.request.tokenizer else ""
                    ratio = get_compression_ratio(text)
                    window.decoded = (result, avg_logprob, temperature, ratio)
                    window.tried.append(window.decoded)
                    if _needs_fallback(result.no_speech_prob, avg_logprob, ratio):
                        retry.append(i)
            pending = retry
        for i in pending:  # every temperature failed: the best try, reported at the last temperature
            window = windows[i]
            usable = [t for t in window.tried if t[3] <= COMPRESSION_RATIO_THRESHOLD] or window.tried
            best = max(usable, key=lambda t: t[1])
            window.decoded = (best[0], best[1], temperature, best[3])

    def _sampling(self, temperature: float) -> dict[str, float | int]:
        if temperature > 0:
            return {"beam_size": 1, "num_hypotheses": BEST_OF, "sampling_topk": 0, "sampling_temperature": temperature}
        return {"beam_size": self.beam_size, "patience": 1}

    def _advance(self, window: _Window, rows: Callable[[], ctranslate2.StorageView]) -> None:
        """This window's segments (and words) to its request; its seek moves to where the text stopped."""
        from faster_whisper.utils import get_end

        request, model = window.request, self.model
        tokenizer = request.tokenizer
        assert window.decoded is not None and tokenizer is not None
        result, avg_logprob, temperature, ratio = window.decoded
        if result.no_speech_prob > NO_SPEECH_THRESHOLD and not avg_logprob > LOG_PROB_THRESHOLD:
            request.seek += window.size  # silence: on to the next window
            return
        time_offset = request.seek * model.feature_extractor.time_per_frame
        previous_seek = request.seek
        pieces, request.seek, single_ending = model._split_segments_by_timestamps(
            tokenizer=tokenizer,
            tokens=result.sequences_ids[0],
            time_offset=time_offset,
            segment_size=window.size,
            segment_duration=window.size * model.feature_extractor.time_per_frame,
            seek=request.seek,
        )
        if request.job.options.word_timestamps:
            model.add_word_timestamps(
                [pieces], tokenizer, rows(), window.size, PREPEND_PUNCTUATIONS, APPEND_PUNCTUATIONS, request.last_speech
            )
            last_word_end = get_end(pieces)
            if not single_ending and last_word_end is not None and last_word_end > time_offset:
                request.seek = round(last_word_end * model.frames_per_second)
            if last_word_end is not None:
                request.last_speech = last_word_end
        for piece in pieces:
            self._emit(request, piece, previous_seek, temperature, avg_logprob, ratio, result.no_speech_prob)
        if temperature > PROMPT_RESET_ON_TEMPERATURE:
            request.prompt_reset_since = len(request.all_tokens)

    def _emit(
        self,
        request: _Request,
        piece: dict[str, object],
        seek: int,
        temperature: float,
        avg_logprob: float,
        ratio: float,
        no_speech_prob: float,
    ) -> None:
        from speech import finite

        assert request.tokenizer is not None
        tokens: list[int] = list(piece["tokens"])  # type: ignore[call-overload]
        text = request.tokenizer.decode(tokens)
        start, end = float(piece["start"]), float(piece["end"])  # type: ignore[arg-type]
        if start == end or not text.strip():
            return
        request.all_tokens.extend(tokens)
        segment = TranscriptSegment(
            id=len(request.segments),
            start=finite(start, 3),
            end=finite(end, 3),
            text=text,
            seek=seek,
            tokens=tuple(int(t) for t in tokens),
            temperature=finite(temperature),
            avg_logprob=finite(avg_logprob),
            compression_ratio=finite(ratio),
            no_speech_prob=finite(no_speech_prob),
        )
        request.segments.append(segment)
        request.words += [
            TranscriptWord(str(w["word"]), finite(w["start"], 3), finite(w["end"], 3), finite(w["probability"]))
            for w in piece.get("words") or ()  # type: ignore[attr-defined]
        ]
        if request.job.on_segment is not None:
            request.job.on_segment(segment)


def _schedule(temperature: float) -> tuple[float, ...]:
    from speech import FALLBACK_TEMPERATURES

    return FALLBACK_TEMPERATURES if temperature == 0 else (temperature,)


def _by_temperature(requests: list[_Request]) -> list[list[_Request]]:
    """CTranslate2 samples a whole batch at one temperature: one step per temperature asked for."""
    groups: dict[float, list[_Request]] = {}
    for request in requests:
        groups.setdefault(request.job.options.temperature, []).append(request)
    return list(groups.values())


def _needs_fallback(no_speech_prob: float, avg_logprob: float, ratio: float) -> bool:
    """Whisper's test of a degenerate window: too repetitive or too improbable, unless it is silence."""
    if no_speech_prob > NO_SPEECH_THRESHOLD and avg_logprob < LOG_PROB_THRESHOLD:
        return False
    return ratio > COMPRESSION_RATIO_THRESHOLD or avg_logprob < LOG_PROB_THRESHOLD


def _same_sot_position(windows: list[_Window], rows: list[int]) -> list[list[int]]:
    """`rows` grouped so that <|startoftranscript|> sits at one position in each group's prompts."""
    groups: dict[int, list[int]] = {}
    for i in rows:
        tokenizer = windows[i].request.tokenizer
        assert tokenizer is not None
        groups.setdefault(windows[i].prompt.index(tokenizer.sot), []).append(i)
    return list(groups.values())


def transcribe_jobs(model: Transcriber, jobs: Sequence[SpeechJob]) -> list[JobOutcome]:
    """The batch runner of a speech tier's owner thread: the model's batched decoder when it has one,
    else the jobs one by one (mlx-whisper, a remote upstream, the tests' fakes)."""
    if isinstance(model, BatchTranscriber):
        return model.transcribe_batch(jobs)
    outcomes: list[JobOutcome] = []
    for job in jobs:
        try:
            outcomes.append(model.transcribe(job.audio, job.options, job.on_segment))
        except Exception as exc:  # noqa: BLE001 - its own request's error
            outcomes.append(exc)
        _tell(job, outcomes[-1])
    return outcomes


def _tell(job: SpeechJob, outcome: JobOutcome) -> None:
    if job.on_done is not None:
        job.on_done(outcome)
