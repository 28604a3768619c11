"""MLX vision through mlx-vlm: a tiny random LLaVA (tests/model_builders.py) loaded by the real `mlx_vlm.load`
behind a live server. The model is random: the tests check what reached it and the OpenAI shape, not words."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from config import load_settings
from server import create_app
from tests.conftest import LiveServer
from tests.waiting import DEADLINE_S

pytest.importorskip("mlx_vlm")
pytestmark = pytest.mark.real

IMAGE_TOKENS = (32 // 8) ** 2  # the tiny LLaVA's embeddings per image (CLS dropped)


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.model_builders import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def server(llava: Path) -> Iterator[LiveServer]:
    env = {
        "LIGHT_MODEL_PATH": str(llava),
        "LIGHT_BACKEND": "mlx",
        "LIGHT_PARALLEL": "2",
        "EMBEDDING_MODEL_PATH": "",
        "RERANKER_MODEL_PATH": "",
        "SPEECH_MODEL_PATH": "",
        "ENABLE_CACHE": "false",
    }
    with LiveServer(create_app(load_settings(env))) as live:
        yield live


def data_uri(width: int, height: int, colour: tuple[int, int, int]) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def body(*images: str, **extra: Any) -> dict[str, Any]:
    parts = [{"type": "text", "text": "hello world"}, *({"type": "image_url", "image_url": {"url": u}} for u in images)]
    return {"model": "light", "messages": [{"role": "user", "content": parts}], "max_tokens": 5, **extra}


def post(server: LiveServer, payload: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.url + "/v1/chat/completions", json=payload, timeout=DEADLINE_S)


def test_an_image_request_answers_in_openais_shape_with_the_images_tokens(server: LiveServer) -> None:
    text = post(server, body())
    assert text.status_code == 200, text.text
    one = post(server, body(data_uri(40, 30, (250, 0, 0))))
    assert one.status_code == 200, one.text
    two = post(server, body(data_uri(8, 8, (0, 0, 250)), data_uri(64, 20, (0, 250, 0))))
    assert two.status_code == 200, two.text
    for response in (text, one, two):
        data = response.json()
        assert data["object"] == "chat.completion"
        assert isinstance(data["choices"][0]["message"]["content"], str)
        assert data["choices"][0]["finish_reason"] in ("stop", "length")
    prompt = [r.json()["usage"]["prompt_tokens"] for r in (text, one, two)]
    assert prompt == [prompt[0], prompt[0] + IMAGE_TOKENS, prompt[0] + 2 * IMAGE_TOKENS]


def test_an_image_request_streams(server: LiveServer) -> None:
    payload = body(data_uri(20, 20, (9, 9, 9)), stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=payload, timeout=DEADLINE_S) as response:
        assert response.status_code == 200
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[-1]["usage"]["prompt_tokens"] > IMAGE_TOKENS
