"""A transcript in each of OpenAI's response formats (json, text, srt, vtt, verbose_json), and as the
plain JSON the response cache keeps."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from core.protocols import Transcript, TranscriptSegment, TranscriptWord
from core.turns import JsonObject, JsonValue

FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
MEDIA_TYPES = {"text": "text/plain", "srt": "application/x-subrip", "vtt": "text/vtt"}


def usage(transcript: Transcript) -> JsonObject:
    """OpenAI bills Whisper by the second of audio, rounded up."""
    return {"type": "duration", "seconds": math.ceil(transcript.duration)}


def as_json(transcript: Transcript) -> JsonObject:
    return {"text": transcript.text, "usage": usage(transcript)}


def as_verbose_json(transcript: Transcript, task: str, granularities: Sequence[str]) -> JsonObject:
    """OpenAI's verbose_json: segments unless only words were asked for, words when they were."""
    body: JsonObject = {
        "task": task,
        "language": transcript.language,
        "duration": transcript.duration,
        "text": transcript.text,
    }
    if "segment" in granularities or not granularities:
        body["segments"] = [_segment_json(s) for s in transcript.segments]
    if "word" in granularities:
        body["words"] = [{"word": w.word.strip(), "start": w.start, "end": w.end} for w in transcript.words]
    body["usage"] = usage(transcript)
    return body


def _segment_json(segment: TranscriptSegment) -> JsonObject:
    fields = dataclasses.asdict(segment)
    fields["tokens"] = list(segment.tokens)
    return fields


def timestamp(seconds: float, decimal: str) -> str:
    """HH:MM:SS,mmm (SubRip) or HH:MM:SS.mmm (WebVTT)."""
    millis = max(0, round(seconds * 1000))
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    whole, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{whole:02d}{decimal}{millis:03d}"


def as_srt(transcript: Transcript) -> str:
    """Numbered cues, each ended by a blank line."""
    return "".join(
        f"{index}\n{timestamp(s.start, ',')} --> {timestamp(s.end, ',')}\n{s.text.strip()}\n\n"
        for index, s in enumerate(transcript.segments, start=1)
    )


def as_vtt(transcript: Transcript) -> str:
    cues = "".join(
        f"{timestamp(s.start, '.')} --> {timestamp(s.end, '.')}\n{s.text.strip()}\n\n" for s in transcript.segments
    )
    return "WEBVTT\n\n" + cues


def as_text(transcript: Transcript) -> str:
    return transcript.text + "\n"


# ---------------------------------------------------------------- the cache's form


def to_cache(transcript: Transcript) -> JsonObject:
    value: JsonObject = dataclasses.asdict(transcript)
    return value


def from_cache(value: Mapping[str, JsonValue]) -> Transcript:
    segments = value.get("segments") or []
    words = value.get("words") or []
    return Transcript(
        text=str(value["text"]),
        language=str(value["language"]),
        duration=float(value["duration"]),  # type: ignore[arg-type]
        segments=tuple(
            TranscriptSegment(**{**s, "tokens": tuple(s["tokens"])})  # type: ignore[arg-type]
            for s in segments  # type: ignore[union-attr]
        ),
        words=tuple(TranscriptWord(**w) for w in words),  # type: ignore[arg-type, union-attr]
    )
