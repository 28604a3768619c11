"""A speech tier served by a pool of OpenAI-compatible transcription servers (another llmservice,
LocalAI, speaches, vLLM's Whisper, OpenAI itself).

`RemoteTranscriber` implements the `Transcriber` protocol over HTTP: the file goes upstream as it came,
always asking for `verbose_json` so segments and words come back whatever format our client wants (the
route shapes it). It runs on a `RemoteWorker`, as remote embedding tiers do: several requests in flight
over the pool, failover to another upstream only on faults, an upstream's 4xx passed through.
"""

from __future__ import annotations

from collections.abc import Mapping

from config import Settings, TierConfig
from core.errors import BackendError
from core.protocols import (
    AudioFile,
    SegmentSink,
    TranscribeOptions,
    Transcript,
    TranscriptSegment,
    TranscriptWord,
)
from core.turns import JsonValue
from remote.embeddings import RemoteWorker, Upstreams
from speech import finite

PATHS = {"transcribe": "/audio/transcriptions", "translate": "/audio/translations"}


class RemoteTranscriber:
    def __init__(self, upstreams: Upstreams) -> None:
        self.upstreams = upstreams

    def transcribe(self, audio: AudioFile, options: TranscribeOptions, on_segment: SegmentSink | None) -> Transcript:
        form: dict[str, str | list[str]] = {
            "model": self.upstreams.config.upstream_model or "whisper-1",  # what any Whisper server answers to
            "response_format": "verbose_json",
            "temperature": str(options.temperature),
            "timestamp_granularities[]": ["segment", "word"] if options.word_timestamps else ["segment"],
        }
        if options.prompt:
            form["prompt"] = options.prompt
        if options.language and options.task == "transcribe":
            form["language"] = options.language
        answer = self._post(PATHS[options.task], form, audio)
        transcript = parse_verbose(answer)
        if on_segment is not None:  # the upstream answered all at once
            for segment in transcript.segments:
                on_segment(segment)
        return transcript

    def _post(self, path: str, form: Mapping[str, str | list[str]], audio: AudioFile) -> JsonValue:
        up = self.upstreams
        files = {"file": (audio.filename, audio.data, audio.content_type)}
        return up.send(lambda url: up.client.post(url + path, data=form, files=files, headers=up.headers))

    def close(self) -> None:
        self.upstreams.close()


def _number(value: JsonValue | None) -> float:
    return finite(value) if isinstance(value, int | float) else 0.0  # Python's json reads Infinity


def parse_verbose(answer: JsonValue) -> Transcript:
    """OpenAI's verbose_json transcript; a body without text is the upstream's fault, told as a 500."""
    if not isinstance(answer, dict) or not isinstance(answer.get("text"), str):
        raise BackendError("The upstream's answer is not a transcript")
    raw_segments = answer.get("segments")
    raw_words = answer.get("words")
    segments = [
        TranscriptSegment(
            id=index,
            start=_number(raw.get("start")),
            end=_number(raw.get("end")),
            text=str(raw.get("text", "")),
            seek=int(_number(raw.get("seek"))),
            tokens=tuple(int(t) for t in raw.get("tokens") or () if isinstance(t, int)),  # type: ignore[union-attr]
            temperature=_number(raw.get("temperature")),
            avg_logprob=_number(raw.get("avg_logprob")),
            compression_ratio=_number(raw.get("compression_ratio")),
            no_speech_prob=_number(raw.get("no_speech_prob")),
        )
        for index, raw in enumerate(raw_segments if isinstance(raw_segments, list) else [])
        if isinstance(raw, dict)
    ]
    words = [
        TranscriptWord(str(raw.get("word", "")), _number(raw.get("start")), _number(raw.get("end")))
        for raw in (raw_words if isinstance(raw_words, list) else [])
        if isinstance(raw, dict)
    ]
    language = answer.get("language")
    return Transcript(
        text=str(answer["text"]),
        language=language if isinstance(language, str) else "",
        duration=_number(answer.get("duration")),
        segments=tuple(segments),
        words=tuple(words),
    )


def load_remote_speech_worker(config: TierConfig, settings: Settings) -> RemoteWorker:
    """The "workers:speech:remote" factory: a speech tier over its upstream pool; nothing to load."""
    upstreams = Upstreams(config)
    return RemoteWorker(RemoteTranscriber(upstreams), upstreams)  # type: ignore[arg-type]
