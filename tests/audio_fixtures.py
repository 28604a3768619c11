"""Audio for the speech tests, made at test time: tones (Python's wave), speech (Debian's espeak-ng),
other containers and codecs (PyAV, the decoder the server uses), and a fake Whisper that decodes for
real but hears a fixed text."""

from __future__ import annotations

import dataclasses
import io
import math
import re
import shutil
import struct
import subprocess
import threading
import wave
from collections.abc import Sequence
from pathlib import Path

import pytest

from config import TierConfig
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
from speech import SAMPLE_RATE, decode_audio

ESPEAK_MISSING = "espeak-ng is not installed (apt-get install espeak-ng): no speech to transcribe"


def tone_wav(seconds: float, rate: int = SAMPLE_RATE, hertz: float = 440.0) -> bytes:
    """A sine tone as 16-bit mono WAV."""
    frames = b"".join(
        struct.pack("<h", int(8000 * math.sin(2 * math.pi * hertz * i / rate))) for i in range(int(seconds * rate))
    )
    out = io.BytesIO()
    with wave.open(out, "wb") as handle:
        handle.setnchannels(1)
        handle.setsampwidth(2)
        handle.setframerate(rate)
        handle.writeframes(frames)
    return out.getvalue()


def speak(text: str, folder: Path, name: str = "speech") -> bytes:
    """`text` spoken by espeak-ng as WAV; the test skips (saying why) without espeak-ng."""
    if shutil.which("espeak-ng") is None:
        pytest.skip(ESPEAK_MISSING)
    target = folder / f"{name}.wav"
    subprocess.run(["espeak-ng", "-w", str(target), text], check=True, capture_output=True, timeout=120)
    return target.read_bytes()


def reencode(wav: bytes, container: str, codec: str) -> bytes:
    """The WAV's audio in another container and codec (flac, ogg/vorbis, mp3, webm/opus, ...)."""
    import av

    out = io.BytesIO()
    with av.open(io.BytesIO(wav)) as source, av.open(out, "w", format=container) as target:
        stream = target.add_stream(codec, rate=48000 if codec == "libopus" else source.streams.audio[0].rate)
        resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=stream.rate)
        for frame in source.decode(audio=0):
            frame.pts = None
            for converted in resampler.resample(frame):
                target.mux(stream.encode(converted))
        for converted in resampler.resample(None):
            target.mux(stream.encode(converted))
        target.mux(stream.encode(None))
    return out.getvalue()


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level edit distance over the reference's length, after lowercasing and dropping punctuation."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        previous, row[0] = row[0], i
        for j, h in enumerate(hyp, start=1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (r != h))
    return row[-1] / max(1, len(ref))


def build_tiny_mlx_whisper(folder: Path) -> Path:
    """A random Whisper for mlx-whisper (one layer each side, 64 wide, a 32-token text context so a
    window decodes in moments), saved as an mlx-community folder: config.json + weights.safetensors."""
    import json

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_whisper.whisper import ModelDimensions, Whisper

    dims = {
        "n_mels": 80,
        "n_audio_ctx": 1500,  # fixed by Whisper's 30 s windows
        "n_audio_state": 64,
        "n_audio_head": 2,
        "n_audio_layer": 1,
        "n_vocab": 51865,  # the multilingual tokenizer
        "n_text_ctx": 32,
        "n_text_state": 64,
        "n_text_head": 2,
        "n_text_layer": 1,
    }
    mx.random.seed(0)
    model = Whisper(ModelDimensions(**dims), mx.float16)
    weights = {
        name: value.astype(mx.float16) if mx.issubdtype(value.dtype, mx.floating) else value
        for name, value in tree_flatten(model.parameters())
    }
    folder.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(folder / "weights.safetensors"), weights)
    (folder / "config.json").write_text(json.dumps({**dims, "model_type": "whisper"}))
    return folder


class FakeTranscriber:
    """Decodes the upload with the server's real decoder (so bad files fail as they would), then hears
    `FakeTranscriber.SENTENCES`, one segment per sentence spread over the audio. Records each call's
    options, and counts the calls that ran to the end (a sink that raises stops one). A `gate` holds
    each segment until it is set (cancellation tests)."""

    SENTENCES = (" Hello there.", " General Kenobi.")

    def __init__(self, tier: TierConfig) -> None:
        self.tier = tier
        self.calls: list[TranscribeOptions] = []
        self.gate: threading.Event | None = None
        self.finished = 0
        self.closed = False

    def transcribe(self, audio: AudioFile, options: TranscribeOptions, on_segment: SegmentSink | None) -> Transcript:
        samples = decode_audio(audio, self.tier.max_audio_seconds)
        self.calls.append(options)
        duration = round(samples.size / SAMPLE_RATE, 3)
        step = duration / len(self.SENTENCES)
        segments = []
        for index, sentence in enumerate(self.SENTENCES):
            if self.gate is not None:
                self.gate.wait(120)
            segment = TranscriptSegment(index, round(index * step, 3), round((index + 1) * step, 3), sentence)
            segments.append(segment)
            if on_segment is not None:
                on_segment(segment)
        found = [w for s in segments for w in s.text.split()]
        spoken = tuple(
            TranscriptWord(w, round(i * duration / len(found), 3), round((i + 1) * duration / len(found), 3))
            for i, w in enumerate(found)
        )
        text = "".join(s.text for s in segments).strip()
        self.finished += 1
        return Transcript(
            text, options.language or "en", duration, tuple(segments), spoken if options.word_timestamps else ()
        )

    def close(self) -> None:
        self.closed = True


class FakeBatchTranscriber(FakeTranscriber):
    """A FakeTranscriber that takes batches (the BatchTranscriber protocol), records the options of each
    batch it gets, and hears each file's name, so every request's answer shows whose it is."""

    def __init__(self, tier: TierConfig) -> None:
        super().__init__(tier)
        self.batches: list[list[TranscribeOptions]] = []

    def transcribe_batch(self, jobs: Sequence[SpeechJob]) -> list[JobOutcome]:
        self.batches.append([job.options for job in jobs])
        outcomes: list[JobOutcome] = []
        for job in jobs:
            try:
                heard = self.transcribe(job.audio, job.options, job.on_segment)
                outcomes.append(dataclasses.replace(heard, text=f"{heard.text} ({job.audio.filename})"))
            except Exception as exc:  # noqa: BLE001 - that job's own error, as the real batcher does
                outcomes.append(exc)
        return outcomes
