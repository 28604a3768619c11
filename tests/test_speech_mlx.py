"""The mlx_whisper backend on a tiny random Whisper built here (mlx runs on Linux CPUs with mlx[cpu]):
the real loading, decoding and transcript shaping run; a random model's words mean nothing, so only
the shape of the answer is checked."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from config import load_settings
from server import create_app
from tests.audio_fixtures import build_tiny_mlx_whisper, tone_wav

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("mlx_whisper", reason="mlx-whisper is not installed")
    return build_tiny_mlx_whisper(tmp_path_factory.mktemp("tiny-mlx-whisper"))


@pytest.fixture(scope="module")
def client(tiny_whisper: Path) -> Iterator[TestClient]:
    env = {
        "LIGHT_MODEL_PATH": "",
        "EMBEDDING_MODEL_PATH": "",
        "RERANKER_MODEL_PATH": "",
        "SPEECH_MODEL_PATH": str(tiny_whisper),
        "ENABLE_CACHE": "false",
    }
    settings = load_settings(env)
    assert settings.tiers["speech"].backend == "mlx_whisper"  # inferred from weights.safetensors
    with TestClient(create_app(settings), base_url="http://localhost", raise_server_exceptions=False) as http:
        yield http


def transcribe(client: TestClient, **form: str) -> dict[str, object]:
    # One temperature: a random model would otherwise run whisper's whole fallback schedule.
    fields = {"model": "whisper-1", "temperature": "0.5", **form}
    response = client.post("/v1/audio/transcriptions", data=fields, files={"file": ("t.wav", tone_wav(2.0))})
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


def test_a_tiny_mlx_whisper_answers_in_the_openai_shape(client: TestClient) -> None:
    body = transcribe(client, response_format="verbose_json", language="en")
    assert body["language"] == "en" and body["duration"] == 2.0 and isinstance(body["text"], str)
    segments = body["segments"]
    assert isinstance(segments, list)
    assert [s["id"] for s in segments] == list(range(len(segments)))
    # A random model's timestamps are random: only their types are its business here.
    assert all(isinstance(s["start"], float) and isinstance(s["text"], str) for s in segments)
    assert client.get("/health").json()["tiers"]["speech"]["backend"] == "mlx_whisper"


def test_words_and_languages_on_mlx(client: TestClient) -> None:
    body = transcribe(client, response_format="verbose_json", language="en", **{"timestamp_granularities[]": "word"})
    assert isinstance(body["words"], list) and "segments" not in body
    bad = client.post(
        "/v1/audio/transcriptions",
        data={"model": "whisper-1", "language": "xx"},
        files={"file": ("t.wav", tone_wav(0.5))},
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "language"
