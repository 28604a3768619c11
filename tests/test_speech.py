"""The speech tier over a fake Whisper (tests/audio_fixtures.py): the audio routes' formats, options,
errors, streaming, cache and routing, the OpenAI SDK against a live server, and a remote speech tier.

The fake decodes every upload with the server's real decoder, so what is not audio fails as it would
in production; tests/test_speech_real.py runs the packaged Whisper itself."""

from __future__ import annotations

import concurrent.futures
import json
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import openai
import pytest
from fastapi.testclient import TestClient

from config import PACKAGED_WHISPER, ConfigError, load_settings
from core import routing
from core.errors import ModelNotFound
from server import create_app
from tests.audio_fixtures import FakeBatchTranscriber, FakeTranscriber, tone_wav
from tests.conftest import FAKE_ENV, LiveServer
from tests.fakes import FakeRegistry
from tests.waiting import wait_for

SPEECH_ENV = {**FAKE_ENV, "SPEECH_MODEL_PATH": "/models/fake-whisper", "SPEECH_BACKEND": "faster_whisper"}
TONE = tone_wav(2.0)


class SpeechRegistry(FakeRegistry):
    def __init__(self, kind: type[FakeTranscriber] = FakeTranscriber) -> None:
        super().__init__()
        self.kind = kind
        self.transcriber: FakeTranscriber | None = None
        self.loads = 0

    def _load_speech(self, tier: Any, settings: Any) -> FakeTranscriber:
        self.loads += 1
        self.transcriber = self.kind(tier)
        return self.transcriber

    def factories(self) -> dict[str, Any]:
        return {**super().factories(), "speech:faster_whisper": self._load_speech}


@pytest.fixture
def registry() -> SpeechRegistry:
    return SpeechRegistry()


@pytest.fixture
def speech(make_client: Any, registry: SpeechRegistry) -> Any:
    def build(extra: Mapping[str, str] | None = None) -> TestClient:
        return make_client({**SPEECH_ENV, **(extra or {})}, registry)

    return build


def post(client: TestClient, data: bytes = TONE, path: str = "/v1/audio/transcriptions", **form: Any) -> Any:
    fields = {"model": "whisper-1", **form}
    return client.post(path, data=fields, files={"file": ("clip.wav", data, "audio/wav")})


def assert_error(response: Any, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    if param is not None:
        assert error["param"] == param
    return error


# ---------------------------------------------------------------- configuration and routing


def test_the_packaged_whisper_is_the_default_speech_tier() -> None:
    speech = load_settings({}).tiers["speech"]
    assert (speech.model_path, speech.backend, speech.kind) == (PACKAGED_WHISPER, "faster_whisper", "speech")
    assert speech.model_id == "speech/whisper-base" and speech.temperature == 0.0
    assert "speech" not in load_settings({"SPEECH_MODEL_PATH": ""}).tiers


def test_speech_backends_are_inferred_and_checked(tmp_path: Any) -> None:
    mlx = tmp_path / "whisper-mlx"
    mlx.mkdir()
    (mlx / "weights.npz").write_bytes(b"")
    assert load_settings({"SPEECH_MODEL_PATH": str(mlx)}).tiers["speech"].backend == "mlx_whisper"
    assert load_settings({"SPEECH_UPSTREAMS": "http://gpu:8000/v1"}).tiers["speech"].backend == "remote"
    with pytest.raises(ConfigError, match="SPEECH_BACKEND has value 'mlx': not a speech backend"):
        load_settings({"SPEECH_BACKEND": "mlx"})
    with pytest.raises(ConfigError, match="SPEECH_COMPUTE_TYPE has value 'int3'"):
        load_settings({"SPEECH_COMPUTE_TYPE": "int3"})


@pytest.mark.parametrize("name", ["whisper-1", "Systran/faster-whisper-base", "gpt-4o-transcribe", "speech"])
def test_whisper_names_route_to_the_speech_tier(name: str) -> None:
    assert routing.resolve(name, "speech", load_settings({})).tier == "speech"


def test_an_unconfigured_speech_tier_is_a_404_listing_the_valid_names(speech: Any) -> None:
    with pytest.raises(ModelNotFound, match="Valid names"):
        routing.resolve("whisper-1", "speech", load_settings(FAKE_ENV))
    error = assert_error(post(speech({"SPEECH_MODEL_PATH": "", "SPEECH_BACKEND": ""})), 404, "model_not_found", "model")
    assert "light" in error["message"]


def test_the_models_list_names_the_speech_tier(speech: Any) -> None:
    client = speech()
    ids = [card["id"] for card in client.get("/v1/models").json()["data"]]
    assert "speech/fake-whisper" in ids
    assert client.get("/v1/models/whisper-1").json()["id"] == "speech/fake-whisper"
    assert "speech:latest" not in [m["name"] for m in client.get("/api/tags").json()["models"]]


# ---------------------------------------------------------------- formats


def test_json_is_the_text_and_the_seconds_used(speech: Any, registry: SpeechRegistry) -> None:
    response = post(speech())
    assert response.status_code == 200, response.text
    assert response.json() == {"text": "Hello there. General Kenobi.", "usage": {"type": "duration", "seconds": 2}}
    assert registry.transcriber is not None
    assert registry.transcriber.calls[0].task == "transcribe"


def test_text_srt_and_vtt(speech: Any) -> None:
    client = speech()
    text = post(client, response_format="text")
    assert text.headers["content-type"].startswith("text/plain")
    assert text.text == "Hello there. General Kenobi.\n"
    srt = post(client, response_format="srt").text
    assert (
        srt == "1\n00:00:00,000 --> 00:00:01,000\nHello there.\n\n2\n00:00:01,000 --> 00:00:02,000\nGeneral Kenobi.\n\n"
    )
    vtt = post(client, response_format="vtt").text
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:01.000\nHello there.\n")


def test_verbose_json_has_ordered_segments_and_words_when_asked(speech: Any) -> None:
    client = speech()
    body = post(client, response_format="verbose_json").json()
    assert (body["task"], body["language"], body["duration"]) == ("transcribe", "en", 2.0)
    assert [s["id"] for s in body["segments"]] == [0, 1] and "words" not in body
    assert all(s["start"] <= s["end"] for s in body["segments"])
    assert body["segments"][0]["end"] <= body["segments"][1]["start"]
    worded = client.post(
        "/v1/audio/transcriptions",
        data={"model": "whisper-1", "response_format": "verbose_json", "timestamp_granularities[]": ["word"]},
        files={"file": ("clip.wav", TONE, "audio/wav")},
    ).json()
    assert [w["word"] for w in worded["words"]] == ["Hello", "there.", "General", "Kenobi."]
    assert "segments" not in worded  # only the granularity asked for


def test_options_reach_the_model(speech: Any, registry: SpeechRegistry) -> None:
    client = speech()
    post(client, language="FR", prompt="Kenobi", temperature="0.4")
    options = registry.transcriber.calls[-1] if registry.transcriber else None
    assert options is not None
    assert (options.language, options.prompt, options.temperature) == ("fr", "Kenobi", 0.4)
    translated = post(client, path="/v1/audio/translations", response_format="verbose_json").json()
    assert translated["task"] == "translate" and registry.transcriber is not None
    assert registry.transcriber.calls[-1].task == "translate"


def test_every_common_prefix_serves_the_audio_routes(speech: Any) -> None:
    client = speech()
    for path in ("/audio/transcriptions", "/api/v1/audio/transcriptions", "/v1/audio/translations"):
        assert post(client, path=path).status_code == 200, path


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        (b"", "empty"),
        (b"this is a text file, not audio at all\n" * 20, "could not be decoded as audio"),
        (b"\x89PNG\r\n\x1a\n" + bytes(200), "no audio"),
        (TONE[:44], "no audio samples"),  # a WAV header and nothing after it
    ],
)
def test_what_is_not_audio_is_a_400_naming_the_file(speech: Any, data: bytes, fragment: str) -> None:
    error = assert_error(post(speech(), data), 400, "invalid_request", "file")
    assert fragment in error["message"]


def test_requests_the_routes_refuse(speech: Any) -> None:
    client = speech({"SPEECH_MAX_AUDIO_SECONDS": "1"})
    too_long = assert_error(post(client), 400, "invalid_request", "file")["message"]
    assert "longer than the limit of 1 seconds (SPEECH_MAX_AUDIO_SECONDS)" in too_long
    assert_error(post(client, model="light"), 400, "model_not_supported", "model")
    assert_error(post(client, model="nope"), 404, "model_not_found", "model")
    assert_error(post(client, response_format="xml"), 400, "invalid_request", "response_format")
    assert_error(post(client, temperature="3"), 400, "invalid_request", "temperature")
    words_as_json = client.post(
        "/v1/audio/transcriptions",
        data={"model": "whisper-1", "timestamp_granularities[]": "word"},
        files={"file": ("clip.wav", tone_wav(0.5), "audio/wav")},
    )
    assert_error(words_as_json, 400, "invalid_request", "timestamp_granularities[]")
    assert_error(post(client, response_format="srt", stream="true"), 400, "invalid_request", "stream")
    missing = client.post("/v1/audio/transcriptions", data={"model": "whisper-1"})
    assert_error(missing, 400, "invalid_request", "file")
    not_a_form = client.post("/v1/audio/transcriptions", json={"model": "whisper-1", "file": "x"})
    assert not_a_form.status_code == 400


def test_audio_uploads_have_their_own_limit(speech: Any, registry: SpeechRegistry) -> None:
    assert load_settings({}).max_audio_bytes == 25 * 1024 * 1024  # OpenAI's
    client = speech({"MAX_BODY_BYTES": "65536", "MAX_AUDIO_BYTES": "131072"})
    clip = tone_wav(3.0)  # 96 KB: over the general limit, under the audio one
    assert post(client, clip).status_code == 200
    assert post(client, clip, path="/api/v1/audio/translations").status_code == 200
    big_json = client.post("/v1/embeddings", json={"model": "e", "input": "x" * 70000})
    assert "MAX_BODY_BYTES" in assert_error(big_json, 413, "payload_too_large")["message"]  # other routes: unchanged
    assert registry.transcriber is not None
    calls = len(registry.transcriber.calls)
    error = assert_error(post(client, tone_wav(4.5)), 413, "payload_too_large")  # 144 KB, told by Content-Length
    assert "131072 bytes (MAX_AUDIO_BYTES)" in error["message"] and error["type"] == "invalid_request_error"
    assert len(registry.transcriber.calls) == calls  # refused before the model saw it


def test_an_audio_upload_without_a_length_is_refused_as_it_arrives(speech: Any, registry: SpeechRegistry) -> None:
    client = speech({"MAX_AUDIO_BYTES": "65536"})
    form = (
        b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper-1\r\n'
        b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
        + tone_wav(4.0)
        + b"\r\n--b--\r\n"
    )

    def chunks() -> Iterator[bytes]:  # no Content-Length: chunked transfer
        for start in range(0, len(form), 16384):
            yield form[start : start + 16384]

    response = client.post(
        "/v1/audio/transcriptions", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert "MAX_AUDIO_BYTES" in assert_error(response, 413, "payload_too_large")["message"]
    assert registry.loads == 0  # refused before the route ran


# ---------------------------------------------------------------- streaming, cache, concurrency


def test_a_stream_sends_each_segment_then_the_whole_text(speech: Any) -> None:
    with speech().stream(
        "POST", "/v1/audio/transcriptions", data={"model": "whisper-1", "stream": "true"}, files={"file": TONE}
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events] == ["transcript.text.delta", "transcript.text.delta", "transcript.text.done"]
    assert "".join(e["delta"] for e in events[:2]) == events[2]["text"] == "Hello there. General Kenobi."


def test_deterministic_transcripts_are_cached_by_audio_and_options(speech: Any, registry: SpeechRegistry) -> None:
    client = speech({"ENABLE_CACHE": "true"})
    first, again = post(client), post(client, response_format="srt")
    assert (first.headers["x-cache"], again.headers["x-cache"]) == ("MISS", "HIT")
    assert registry.transcriber is not None and len(registry.transcriber.calls) == 1
    assert post(client, language="en").headers["x-cache"] == "MISS"  # other options, another entry
    assert post(client, tone_wav(1.0)).headers["x-cache"] == "MISS"  # other audio
    assert "x-cache" not in post(client, temperature="0.5").headers  # sampled: never cached
    assert len(registry.transcriber.calls) == 4


@pytest.fixture
def live_speech(registry: SpeechRegistry) -> Iterator[LiveServer]:
    app = create_app(load_settings(SPEECH_ENV), factories=registry.factories())
    with LiveServer(app) as live:
        yield live


def test_the_openai_sdk_transcribes_translates_and_streams(live_speech: LiveServer) -> None:
    client = openai.OpenAI(base_url=f"{live_speech.url}/v1", api_key="unused", max_retries=0)
    clip = ("clip.wav", TONE, "audio/wav")
    assert client.audio.transcriptions.create(model="whisper-1", file=clip).text == "Hello there. General Kenobi."
    verbose = client.audio.transcriptions.create(
        model="whisper-1", file=clip, response_format="verbose_json", timestamp_granularities=["word", "segment"]
    )
    assert verbose.duration == 2.0 and len(verbose.segments or []) == 2 and len(verbose.words or []) == 4
    srt = client.audio.transcriptions.create(model="whisper-1", file=clip, response_format="srt")
    assert isinstance(srt, str) and "00:00:01,000 --> 00:00:02,000" in srt
    assert client.audio.translations.create(model="whisper-1", file=clip).text
    events = list(client.audio.transcriptions.create(model="whisper-1", file=clip, stream=True))
    assert [e.type for e in events][-1] == "transcript.text.done"
    with pytest.raises(openai.BadRequestError):
        client.audio.transcriptions.create(model="whisper-1", file=("notes.txt", b"not audio", "text/plain"))


def test_a_client_that_leaves_a_stream_stops_its_transcription(live_speech: LiveServer, registry: Any) -> None:
    with httpx.Client(base_url=live_speech.url, timeout=120) as http:
        assert post(http, tone_wav(0.5)).status_code == 200  # loads the model
        fake = registry.transcriber
        fake.gate = threading.Event()  # the next transcription waits before its first segment
        data = {"model": "whisper-1", "stream": "true"}
        with http.stream("POST", "/v1/audio/transcriptions", data=data, files={"file": TONE}) as response:
            assert response.status_code == 200
            wait_for(lambda: len(fake.calls) == 2, "the transcription starting")
        # The client has gone: its lease ends at once, and its transcription stops at the next segment.
        wait_for(lambda: http.get("/health").json()["tiers"]["speech"]["in_flight"] == 0, "the lease ending")
        fake.gate.set()
        fake.gate = None
        assert post(http).status_code == 200  # runs once the abandoned one has left the owner thread
        assert (len(fake.calls), fake.finished) == (3, 2)


def test_concurrent_requests_at_one_temperature_are_decoded_as_one_batch() -> None:
    """While one transcription holds the owner thread, three more queue: the two at temperature 0 (one of
    them not audio) come back as one batch, the one at 0.5 alone; each answer is its own file's."""
    registry = SpeechRegistry(FakeBatchTranscriber)
    app = create_app(load_settings(SPEECH_ENV), factories=registry.factories())
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=120) as http:
        assert post(http, tone_wav(0.5)).status_code == 200  # loads the model
        fake = registry.transcriber
        assert isinstance(fake, FakeBatchTranscriber)
        fake.gate = threading.Event()
        files = {"first": TONE, "good": TONE, "bad": b"not audio at all" * 8, "warm": TONE}
        temperature = {"first": "0", "good": "0", "bad": "0", "warm": "0.5"}

        def send(name: str) -> httpx.Response:
            form = {"model": "whisper-1", "temperature": temperature[name]}
            return http.post("/v1/audio/transcriptions", data=form, files={"file": (f"{name}.wav", files[name])})

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            first = pool.submit(send, "first")
            wait_for(lambda: len(fake.calls) == 2, "the first transcription holding the owner thread")
            rest = {name: pool.submit(send, name) for name in ("good", "bad", "warm")}
            wait_for(lambda: http.get("/health").json()["tiers"]["speech"]["queued"] == 3, "three requests queued")
            gate, fake.gate = fake.gate, None
            gate.set()
            answers = {"first": first.result(), **{name: future.result() for name, future in rest.items()}}
        health = http.get("/health").json()["tiers"]["speech"]
    for name in ("first", "good", "warm"):
        assert answers[name].status_code == 200 and answers[name].json()["text"].endswith(f"({name}.wav)")
    assert_error(answers["bad"], 400, "invalid_request", "file")  # its batch-mate was not affected
    later = sorted(tuple(o.temperature for o in batch) for batch in fake.batches[2:])
    assert later == [(0.0, 0.0), (0.5,)]
    assert health["largest_batch"] == 2


# ---------------------------------------------------------------- a remote speech tier


def test_a_remote_speech_tier_forwards_the_file_and_passes_errors_through(live_speech: LiveServer) -> None:
    env = {**FAKE_ENV, "SPEECH_UPSTREAMS": f"{live_speech.url}/v1", "SPEECH_RETRIES": "0"}
    app = create_app(load_settings(env), factories=None)
    with TestClient(app, base_url="http://localhost") as front:
        body = post(front, response_format="verbose_json").json()
        assert body["text"] == "Hello there. General Kenobi." and len(body["segments"]) == 2
        assert post(front, path="/v1/audio/translations").json()["text"]
        assert_error(post(front, b"not audio"), 400, "invalid_request", "file")
