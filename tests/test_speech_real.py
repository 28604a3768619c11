"""The packaged Whisper base (faster-whisper) behind a live server, loaded once per session, on speech
spoken by espeak-ng at test time. The model's exact words are never asserted: a word error rate with
a generous bound, and a few distinctive words, case-insensitively."""

from __future__ import annotations

import concurrent.futures
import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from config import load_settings
from core.errors import InvalidRequest
from core.model_paths import assemble_whisper, whisper_parts
from core.protocols import AudioFile, SpeechJob, TranscribeOptions, Transcript
from server import create_app
from speech import SAMPLE_RATE, FasterWhisperTranscriber, decode_audio, load_faster_whisper
from tests.audio_fixtures import reencode, speak, word_error_rate, words
from tests.conftest import LiveServer
from tests.waiting import wait_for

pytestmark = pytest.mark.real

SENTENCE = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."
ENV = {
    "LIGHT_MODEL_PATH": "",
    "EMBEDDING_MODEL_PATH": "",
    "RERANKER_MODEL_PATH": "",
    "SPEECH_N_THREADS": "2",
    "SPEECH_PRELOAD": "true",
    "ENABLE_CACHE": "false",
}
CUE = re.compile(r"^(\d\d:\d\d:\d\d)[,.](\d\d\d) --> (\d\d:\d\d:\d\d)[,.](\d\d\d)$", re.MULTILINE)


@pytest.fixture(scope="session")
def spoken(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return speak(SENTENCE, tmp_path_factory.mktemp("speech"))


@pytest.fixture(scope="session")
def whisper_server() -> Iterator[LiveServer]:
    """The packaged Whisper, preloaded once for every test here."""
    with LiveServer(create_app(load_settings(ENV))) as live:
        with httpx.Client(base_url=live.url, timeout=60) as http:
            state = wait_for(
                lambda: (s := http.get("/health").json()["tiers"]["speech"]["state"]) in ("ready", "failed") and s,
                "the packaged Whisper loading",
            )
        assert state == "ready"
        yield live


@pytest.fixture
def client(whisper_server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{whisper_server.url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_the_openai_sdk_transcribes_the_spoken_sentence(client: openai.OpenAI, spoken: bytes) -> None:
    result = client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", spoken, "audio/wav"))
    assert word_error_rate(SENTENCE, result.text) <= 0.25, result.text
    assert {"fox", "paris", "france"} <= set(words(result.text)), result.text


def test_verbose_json_has_ordered_segments_and_words(client: openai.OpenAI, spoken: bytes) -> None:
    result = client.audio.transcriptions.create(
        model="whisper-1",
        file=("speech.wav", spoken, "audio/wav"),
        response_format="verbose_json",
        timestamp_granularities=["segment", "word"],
    )
    assert result.language == "en" and 2 < result.duration < 15
    segments, spoken_words = result.segments or [], result.words or []
    assert segments and len(spoken_words) >= 10
    for earlier, later in zip(segments, segments[1:], strict=False):
        assert earlier.end <= later.start + 0.01
    assert all(0 <= s.start <= s.end <= result.duration + 0.5 for s in segments)
    assert all(a.start <= b.start for a, b in zip(spoken_words, spoken_words[1:], strict=False))
    assert "paris" in {w.word.strip(" .,").lower() for w in spoken_words}


@pytest.mark.parametrize("fmt", ["srt", "vtt"])
def test_subtitles_parse(client: openai.OpenAI, spoken: bytes, fmt: str) -> None:
    text = client.audio.transcriptions.create(
        model="whisper-1", file=("s.wav", spoken, "audio/wav"), response_format=fmt
    )
    assert isinstance(text, str)
    assert text.startswith("WEBVTT\n\n") if fmt == "vtt" else text.startswith("1\n")
    cues = CUE.findall(text)
    assert cues and all(start <= end for start, _, end, _ in cues)
    assert "paris" in text.lower()


def test_common_formats_decode_to_the_same_audio(spoken: bytes) -> None:
    reference = decode_audio(AudioFile(spoken, "speech.wav"), 60).size / SAMPLE_RATE
    for container, codec in [("flac", "flac"), ("mp3", "libmp3lame"), ("ogg", "libopus"), ("webm", "libopus")]:
        data = reencode(spoken, container, codec)
        seconds = decode_audio(AudioFile(data, f"speech.{container}"), 60).size / SAMPLE_RATE
        assert abs(seconds - reference) < 0.2, (container, seconds, reference)
    m4a = reencode(spoken, "ipod", "aac")  # AAC's priming samples add a few frames
    assert abs(decode_audio(AudioFile(m4a, "speech.m4a"), 60).size / SAMPLE_RATE - reference) < 0.5


def test_an_mp3_is_transcribed_like_the_wav(client: openai.OpenAI, spoken: bytes) -> None:
    mp3 = reencode(spoken, "mp3", "libmp3lame")
    text = client.audio.transcriptions.create(model="whisper-1", file=("speech.mp3", mp3, "audio/mpeg")).text
    assert word_error_rate(SENTENCE, text) <= 0.25, text


def test_a_stream_sends_text_before_it_ends(whisper_server: LiveServer, spoken: bytes) -> None:
    with httpx.Client(base_url=whisper_server.url, timeout=300) as http:
        data = {"model": "whisper-1", "stream": "true"}
        with http.stream("POST", "/v1/audio/transcriptions", data=data, files={"file": spoken}) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    kinds = [event["type"] for event in events]
    assert kinds[-1] == "transcript.text.done" and kinds.count("transcript.text.delta") >= 1
    assert "".join(e["delta"] for e in events[:-1]) == events[-1]["text"]
    assert "paris" in events[-1]["text"].lower()


def test_translations_answer_in_english(client: openai.OpenAI, spoken: bytes) -> None:
    text = client.audio.translations.create(model="whisper-1", file=("speech.wav", spoken, "audio/wav")).text
    assert {"paris", "france"} <= set(words(text)), text


FOUR = {
    "elephant": "An elephant walked slowly across the river.",
    "guitar": "She played the guitar every evening.",
    "pizza": "We ordered a large pizza for dinner.",
    "london": "The train to London leaves at noon.",
}


@pytest.fixture(scope="module")
def batching_server() -> Iterator[LiveServer]:
    """A server whose speech tier waits (up to a generous deadline) until four requests are there, so
    four concurrent requests are one batch however slowly they arrive."""
    env = {**ENV, "SPEECH_MAX_BATCH": "4", "SPEECH_BATCH_WAIT_MS": "60000"}
    with LiveServer(create_app(load_settings(env))) as live:
        yield live


def test_four_concurrent_requests_are_one_batch_and_each_gets_its_own_text(
    batching_server: LiveServer, tmp_path: Path
) -> None:
    clips = {word: speak(text, tmp_path, word) for word, text in FOUR.items()}
    client = openai.OpenAI(base_url=f"{batching_server.url}/v1", api_key="unused", max_retries=0, timeout=300)

    def transcribe(word: str) -> str:
        return client.audio.transcriptions.create(model="whisper-1", file=(f"{word}.wav", clips[word])).text

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        texts = dict(zip(clips, pool.map(transcribe, clips), strict=True))
    for word, text in texts.items():
        assert word in text.lower() and word_error_rate(FOUR[word], text) <= 0.25, (word, text)
    status = httpx.get(f"{batching_server.url}/health", timeout=60).json()["tiers"]["speech"]
    assert status["largest_batch"] == 4 and status["batches_run"] == 1


@pytest.fixture(scope="module")
def transcriber() -> Iterator[FasterWhisperTranscriber]:
    settings = load_settings(ENV)
    model = load_faster_whisper(settings.tiers["speech"], settings)
    yield model
    model.close()


def test_one_batch_keeps_each_requests_options_and_errors(
    transcriber: FasterWhisperTranscriber, tmp_path: Path
) -> None:
    """A long file (two 30 s windows), a translation, a prompt, word timestamps, a named language and a
    file that is not audio, decoded as one batch: each gets its own answer, as soon as it is ready, and
    only the bad file fails."""
    long_text = " ".join([SENTENCE, *FOUR.values()] * 3)  # about 40 s
    long_clip = speak(long_text, tmp_path, "long")
    streamed: list[str] = []
    ended: list[str] = []
    files = {
        "long": AudioFile(long_clip, "long.wav"),
        "guitar": AudioFile(speak(FOUR["guitar"], tmp_path, "g"), "g.wav"),
        "pizza": AudioFile(speak(FOUR["pizza"], tmp_path, "p"), "p.wav"),
        "bad": AudioFile(b"ID3" + bytes(64), "bad.mp3"),
        "london": AudioFile(speak(FOUR["london"], tmp_path, "l"), "l.wav"),
    }
    options = {
        "long": TranscribeOptions(),
        "guitar": TranscribeOptions(task="translate"),
        "pizza": TranscribeOptions(word_timestamps=True),
        "bad": TranscribeOptions(),
        "london": TranscribeOptions(language="en", prompt="Noon."),
    }
    jobs = [
        SpeechJob(
            files[name],
            options[name],
            (lambda s: streamed.append(s.text)) if name == "long" else None,
            on_done=lambda _, name=name: ended.append(name),
        )
        for name in files
    ]
    long, guitar, pizza, bad, london = transcriber.transcribe_batch(jobs)
    assert isinstance(bad, InvalidRequest) and "could not be decoded as audio" in str(bad)
    assert isinstance(long, Transcript) and long.duration > 30, long
    assert word_error_rate(long_text, long.text) <= 0.25, long.text
    assert "".join(streamed).strip() == long.text  # its segments reached its own sink, in order
    assert all(a.end <= b.start + 0.01 for a, b in zip(long.segments, long.segments[1:], strict=False))
    assert long.segments[-1].end > 30  # the second window's timestamps follow the first's
    for result, text in ((guitar, FOUR["guitar"]), (pizza, FOUR["pizza"]), (london, FOUR["london"])):
        assert isinstance(result, Transcript) and word_error_rate(text, result.text) <= 0.25, result
        assert result.language == "en"
    assert isinstance(pizza, Transcript) and len(pizza.words) >= 5 and not long.words  # only where asked
    assert transcriber.batcher.largest_batch == 4  # the bad file never reached the model
    # Each request is told as soon as it ends: the short ones do not wait for the long file's second window.
    assert ended[0] == "bad" and ended[-1] == "long" and sorted(ended) == sorted(files)


def test_a_corrupt_file_is_a_400(client: openai.OpenAI, spoken: bytes) -> None:
    headless = bytes(64) + spoken[64:]  # the RIFF header wiped: nothing says what the bytes are
    for name, data in (("speech.wav", headless), ("speech.mp3", b"ID3" + bytes(64))):
        with pytest.raises(openai.BadRequestError, match="could not be decoded as audio"):
            client.audio.transcriptions.create(model="whisper-1", file=(name, io.BytesIO(data)))


def test_the_packaged_whisper_is_assembled_once(tmp_path: Path) -> None:
    folder = assemble_whisper(tmp_path)
    model = folder / "model.bin"
    assert model.stat().st_size == sum(part.stat().st_size for part in whisper_parts())
    assert {p.name for p in folder.iterdir()} == {"model.bin", "config.json", "tokenizer.json", "vocabulary.json"}
    stamp = model.stat().st_mtime_ns
    assert assemble_whisper(tmp_path) == folder and model.stat().st_mtime_ns == stamp  # not written again
