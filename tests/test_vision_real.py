"""Images through llama.cpp's mtmd on the packaged Gemma 3 270M with a tiny random projector (tests/gguf_mmproj.py).

The projector is random, so no test knows what the model says about an image: they check that the image
reached the model (the embeddings the projector yields were decoded into the sequence, its positions moved on
by as many), and that the answer keeps OpenAI's shape, streamed or not, next to a text request.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from chat.llama_engine import LlamaCppChat
from chat.vision import IMAGE_PLACEHOLDER
from core.errors import ModelUnavailable
from core.protocols import GenerationJob, SamplingParams
from core.turns import ImageInput
from server import create_app
from tests.conftest import LiveServer, real_settings
from tests.gguf_mmproj import IMAGE_TOKENS, write_mmproj
from tests.waiting import DEADLINE_S

pytestmark = pytest.mark.real

GEMMA_EMBD = 640  # the packaged Gemma 3 270M's embedding width: the projector's output must match it
MARKER = "<image-test>"
GREEDY = SamplingParams(temperature=0.0, top_p=1.0, top_k=0, max_tokens=4)


def png(width: int, height: int, colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "PNG")
    return buffer.getvalue()


def image_input(data: bytes) -> ImageInput:
    from api.images import check_image

    return check_image(data, "test", 10**8)


def data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def mmproj(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mmproj(tmp_path_factory.mktemp("mmproj") / "mmproj-tiny.gguf", GEMMA_EMBD)


def vision_env(mmproj: Path) -> dict[str, str]:
    return {"LIGHT_MMPROJ": str(mmproj), "LIGHT_N_CTX": "512", "LIGHT_PARALLEL": "2", "ENABLE_CACHE": "false"}


@pytest.fixture(scope="module")
def engine(gemma_path: str, mmproj: Path) -> Iterator[LlamaCppChat]:
    model = LlamaCppChat(real_settings(vision_env(mmproj)).tiers["light"], gemma_path)
    yield model
    model.close()


def run(engine: LlamaCppChat, job: GenerationJob) -> list[str]:
    """Step `job` to its end (alone in the engine); the texts it produced."""
    texts: list[str] = []
    while len(texts) < job.params.max_tokens:
        (output,) = [o for o in engine.step() if o.job is job]
        assert output.error is None
        if output.end_of_generation:
            break
        texts.append(output.text)
    return texts


def test_the_projectors_embeddings_reach_the_sequence(engine: LlamaCppChat) -> None:
    assert engine.accepts_images
    red, blue = image_input(png(40, 30, (255, 0, 0))), image_input(png(64, 64, (0, 0, 255)))
    messages = [{"role": "user", "content": f"Compare {MARKER} with {MARKER} please."}]
    prompt = engine.media_prompt(messages, [red, blue], MARKER)
    assert prompt.images == 2 and prompt.image_tokens == 2 * IMAGE_TOKENS  # 16 embeddings per image, any size
    assert prompt.tokens.count(IMAGE_PLACEHOLDER) == 2 * IMAGE_TOKENS
    text_only = engine.chat_tokens([{"role": "user", "content": "Compare  with  please."}])
    assert len(prompt.tokens) - 2 * IMAGE_TOKENS == len(text_only)  # the text tokenized as without images
    job = GenerationJob(prompt_tokens=prompt.tokens, params=GREEDY, media=prompt)
    engine.insert(job)
    last_text = len(prompt.pieces[-1].tokens)
    assert engine.image_tokens(job) == 2 * IMAGE_TOKENS
    assert engine.kv_positions(job) == len(prompt.tokens) - last_text  # up to the last text, images included
    texts = run(engine, job)
    # The last text was prefilled in the shared batch, then each sampled token but the last was fed back.
    assert engine.kv_positions(job) == len(prompt.tokens) + max(0, len(texts) - 1)
    assert engine.reused_tokens(job) == 0
    engine.remove(job)


def test_a_prompt_with_an_image_never_reuses_a_prefix_across_it(engine: LlamaCppChat) -> None:
    messages = [{"role": "user", "content": f"{'Long shared text. ' * 20}{MARKER} describe"}]
    for colour in ((10, 200, 10), (200, 10, 200)):  # the same text around two different images
        prompt = engine.media_prompt(messages, [image_input(png(8, 8, colour))], MARKER)
        job = GenerationJob(prompt_tokens=prompt.tokens, params=GREEDY, media=prompt)
        engine.insert(job)
        assert engine.reused_tokens(job) == 0 and engine.image_tokens(job) == IMAGE_TOKENS
        run(engine, job)
        engine.remove(job)
    # A text prompt that shares only the text before the image reuses no image position.
    text = engine.chat_tokens([{"role": "user", "content": f"{'Long shared text. ' * 20}and no image"}])
    job = GenerationJob(prompt_tokens=text, params=GREEDY)
    engine.insert(job)
    assert engine.reused_tokens(job) < prompt.tokens.index(IMAGE_PLACEHOLDER)
    run(engine, job)
    engine.remove(job)


# ---------------------------------------------------------------- behind a live server


@pytest.fixture(scope="module")
def server(mmproj: Path) -> Iterator[LiveServer]:
    with LiveServer(create_app(real_settings(vision_env(mmproj)))) as live:
        yield live


def image_chat(image: bytes, **extra: Any) -> dict[str, Any]:
    content = [
        {"type": "text", "text": "What is in this picture?"},
        {"type": "image_url", "image_url": {"url": data_uri(image)}},
    ]
    return {"model": "light", "messages": [{"role": "user", "content": content}], "max_tokens": 6, **extra}


def test_an_image_request_answers_in_openais_shape(server: LiveServer) -> None:
    response = httpx.post(
        server.url + "/v1/chat/completions", json=image_chat(png(20, 20, (1, 2, 3))), timeout=DEADLINE_S
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    model = server.app.state.llm.manager.tiers["light"].worker.scheduler.model
    text = model.chat_tokens([{"role": "user", "content": "What is in this picture?"}])
    assert body["usage"]["prompt_tokens"] == len(text) + IMAGE_TOKENS
    assert 1 <= body["usage"]["completion_tokens"] <= 6


def test_an_image_request_streams(server: LiveServer) -> None:
    body = image_chat(png(9, 17, (90, 90, 0)), stream=True, stream_options={"include_usage": True})
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=DEADLINE_S) as response:
        assert response.status_code == 200
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[-1]["usage"]["prompt_tokens"] > IMAGE_TOKENS
    assert any(chunk["choices"] and chunk["choices"][0]["finish_reason"] for chunk in chunks)


def test_a_text_request_and_an_image_request_complete_together(server: LiveServer) -> None:
    text = {"model": "light", "messages": [{"role": "user", "content": "Count to five."}], "max_tokens": 8}
    bodies = [text, image_chat(png(30, 30, (0, 128, 255)), max_tokens=8), text]
    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(
            pool.map(lambda b: httpx.post(server.url + "/v1/chat/completions", json=b, timeout=DEADLINE_S), bodies)
        )
    assert [r.status_code for r in responses] == [200, 200, 200], [r.text for r in responses]
    usage = [r.json()["usage"]["prompt_tokens"] for r in responses]
    assert usage[1] > usage[0] + IMAGE_TOKENS - 1 and usage[0] == usage[2]


def test_an_undecodable_image_is_a_400_and_the_tier_keeps_serving(server: LiveServer) -> None:
    bad = image_chat(b"GIF89a but not really")
    response = httpx.post(server.url + "/v1/chat/completions", json=bad, timeout=DEADLINE_S)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages.0.content"
    good = httpx.post(server.url + "/v1/chat/completions", json=image_chat(png(4, 4, (5, 5, 5))), timeout=DEADLINE_S)
    assert good.status_code == 200


def test_a_projector_made_for_another_model_is_refused_at_load(gemma_path: str, tmp_path: Path) -> None:
    wrong = write_mmproj(tmp_path / "mmproj-320.gguf", 320)  # its embeddings would not fit Gemma's 640
    with pytest.raises(ModelUnavailable, match="MMPROJ"):
        LlamaCppChat(real_settings(vision_env(wrong)).tiers["light"], gemma_path)
