"""Images in chat over fakes: the wire (image_url parts), validation and limits, routing to tiers that read
images, URL fetching only from IMAGE_URL_HOSTS, and the response cache keyed by the images' bytes.

The fake vision model writes each image into its prompt as "[img:<digest prefix> <width>x<height>]", so its
echoed reply shows which image reached the model, where, and decoded to what size.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from PIL import Image

from config import Settings, TierConfig
from core.turns import ImageInput, Message
from tests.conftest import FAKE_ENV
from tests.fakes import FakeChat, FakeRegistry, FakeUpstream

VISION_ENV = {**FAKE_ENV, "LIGHT_MMPROJ": "/models/fake-mmproj.gguf", "MAX_IMAGES": "3"}


def png(width: int = 8, height: int = 6, colour: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, "PNG")
    return buffer.getvalue()


def data_uri(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def image_part(url: str, **extra: Any) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url, **extra}}


def user(*parts: dict[str, Any] | str) -> dict[str, Any]:
    content = [{"type": "text", "text": p} if isinstance(p, str) else p for p in parts]
    return {"role": "user", "content": content}


def tag(data: bytes, width: int = 8, height: int = 6) -> str:
    return f"[img:{hashlib.sha256(data).hexdigest()[:8]} {width}x{height}]"


@dataclass
class FakeMedia:
    tokens: list[int]
    images: int
    closed: bool = False

    def close(self) -> None:
        self.closed = True


class FakeVisionChat(FakeChat):
    """A FakeChat that reads images when its tier has a projector (MMPROJ), as LlamaCppChat does."""

    def __init__(self, tier: TierConfig) -> None:
        super().__init__(tier)
        self.accepts_images = bool(tier.mmproj)
        self.media: list[FakeMedia] = []

    def media_prompt(self, messages: Sequence[Message], images: Sequence[ImageInput], marker: str) -> FakeMedia:
        text = self.render_chat(messages)
        pieces = text.split(marker)
        assert len(pieces) == len(images) + 1, "one marker per image"
        out = pieces[0]
        for image, piece in zip(images, pieces[1:], strict=True):
            out += f"[img:{image.digest[:8]} {image.width}x{image.height}]" + piece
        media = FakeMedia(self.tokenize(out), len(images))
        self.media.append(media)
        return media


class VisionRegistry(FakeRegistry):
    def _load_chat(self, tier: TierConfig, settings: Settings) -> FakeChat:
        self.loads[tier.name] = self.loads.get(tier.name, 0) + 1
        model = FakeVisionChat(tier)
        self.models[tier.name] = model
        return model


@pytest.fixture
def registry() -> VisionRegistry:
    return VisionRegistry()


@pytest.fixture
def client(make_client: Any, registry: VisionRegistry) -> Any:
    return make_client(VISION_ENV, registry)


def chat(client: Any, *messages: dict[str, Any], model: str = "light", **extra: Any) -> Any:
    return client.post("/v1/chat/completions", json={"model": model, "messages": list(messages), **extra})


def error_of(response: Any, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# ---------------------------------------------------------------- the image reaches the model


def test_a_data_uri_image_reaches_the_model_where_the_message_put_it(client: Any, registry: VisionRegistry) -> None:
    red, blue = png(colour=(255, 0, 0)), png(12, 4, colour=(0, 0, 255))
    response = chat(client, user("first ", image_part(data_uri(red)), " then ", image_part(data_uri(blue)), " ok?"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    reply = body["choices"][0]["message"]["content"]
    assert reply == f"echo: first {tag(red)} then {tag(blue, 12, 4)} ok?"
    (media,) = registry.models["light"].media
    assert media.images == 2 and media.closed is False  # the fake engine does not free; LlamaCppChat.remove does
    assert body["usage"]["prompt_tokens"] == len(media.tokens)


def test_a_streamed_image_request_answers_in_chunks(client: Any) -> None:
    image = png()
    body = {"model": "light", "messages": [user(image_part(data_uri(image)), "hi")], "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        lines = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks)
    assert text == f"echo: {tag(image)}hi"


def test_a_plain_string_image_url_is_accepted_as_some_clients_send_it(client: Any) -> None:
    image = png()
    response = chat(client, user({"type": "image_url", "image_url": data_uri(image)}, "what?"))
    assert response.status_code == 200, response.text
    assert tag(image) in response.json()["choices"][0]["message"]["content"]


def test_text_only_requests_are_unchanged(client: Any, registry: VisionRegistry) -> None:
    response = chat(client, user("just ", "text"))
    assert response.json()["choices"][0]["message"]["content"] == "echo: just text"
    assert registry.models["light"].media == []


def test_ollama_images_reach_the_model_through_chat_and_generate(client: Any) -> None:
    image = png(5, 7)
    encoded = base64.b64encode(image).decode()
    message = {"role": "user", "content": "what is this?", "images": [encoded]}
    chat = client.post("/api/chat", json={"model": "light", "messages": [message], "stream": False})
    assert chat.status_code == 200, chat.text
    assert chat.json()["message"]["content"] == f"echo: what is this?{tag(image, 5, 7)}"
    body = {"model": "light", "prompt": "and this?", "images": [encoded], "stream": False}
    generate = client.post("/api/generate", json=body)
    assert generate.status_code == 200, generate.text
    assert tag(image, 5, 7) in generate.json()["response"]
    raw = client.post("/api/generate", json={**body, "raw": True})
    assert raw.status_code == 400 and "without raw" in raw.json()["error"]
    bad = client.post("/api/chat", json={"model": "light", "messages": [{**message, "images": ["bm90IGFuIGltYWdl"]}]})
    assert bad.status_code == 400
    assert "vision" in client.post("/api/show", json={"model": "light"}).json()["capabilities"]
    assert "vision" not in client.post("/api/show", json={"model": "medium"}).json()["capabilities"]


# ---------------------------------------------------------------- tiers that read no images


def test_an_image_for_a_text_only_tier_is_a_400_naming_the_tier(client: Any, registry: VisionRegistry) -> None:
    error = error_of(chat(client, user(image_part(data_uri(png())), "hi"), model="medium"))
    assert "medium" in error["message"] and "MEDIUM_MMPROJ" in error["message"]
    assert error["param"] == "messages"
    assert "medium" not in registry.loads  # refused from the configuration: nothing loaded


def test_a_remote_tier_takes_images_and_its_upstream_gets_them(make_client: Any) -> None:
    upstream = FakeUpstream()

    class Registry(VisionRegistry):
        def factories(self) -> dict[str, Any]:
            return {**super().factories(), "turns:remote": lambda tier, settings: upstream}

    env = {**VISION_ENV, "MEDIUM_MODEL_PATH": "http://127.0.0.1:9/v1", "MEDIUM_BACKEND": "remote"}
    client = make_client(env, Registry())
    image = png()
    response = chat(client, user(image_part(data_uri(image)), "hi"), model="medium")
    assert response.status_code == 200, response.text
    (request,) = upstream.requests
    assert [i.digest for i in request.images] == [hashlib.sha256(image).hexdigest()]
    assert request.wire["messages"][0]["content"][0]["image_url"]["url"] == data_uri(image)  # sent on as it came


def test_images_on_a_session_are_refused(client: Any) -> None:
    response = chat(client, user(image_part(data_uri(png())), "hi"), session_id="s1")
    assert "session" in error_of(response)["message"]


# ---------------------------------------------------------------- bad images and limits


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("data:image/png;base64,!!!not base64!!!", "invalid base64"),
        ("data:image/png," + "x" * 10, "must be base64"),
        (data_uri(b"this is not an image"), "could not be decoded"),
        (data_uri(png()[:40]), "could not be decoded"),  # a truncated PNG
        ("file:///etc/passwd", "data: URI or an http(s) URL"),
        ("ftp://example.com/a.png", "data: URI or an http(s) URL"),
    ],
)
def test_an_undecodable_or_unsupported_image_is_a_400(client: Any, url: str, words: str) -> None:
    error = error_of(chat(client, user("see", image_part(url))))
    assert words in error["message"]
    assert error["param"] == "messages.0.content"


def test_a_content_part_of_an_unknown_type_is_a_400(client: Any) -> None:
    error = error_of(chat(client, {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}))
    assert "input_audio" in error["message"]


def test_image_count_pixel_and_byte_limits_are_400s_naming_the_setting(make_client: Any) -> None:
    env = {**VISION_ENV, "MAX_IMAGES": "2", "MAX_IMAGE_PIXELS": "100", "MAX_IMAGE_BYTES": "2000"}
    client = make_client(env, VisionRegistry())
    small = data_uri(png(4, 4))
    assert "MAX_IMAGES" in error_of(chat(client, user(*(image_part(small) for _ in range(3)))))["message"]
    assert "MAX_IMAGE_PIXELS" in error_of(chat(client, user(image_part(data_uri(png(20, 20))))))["message"]
    noisy = Image.frombytes("RGB", (9, 9), bytes(range(243)))  # 81 pixels, but a large file once padded
    buffer = io.BytesIO()
    noisy.save(buffer, "PNG", pnginfo=None)
    big = buffer.getvalue() + b"\0" * 3000
    assert "MAX_IMAGE_BYTES" in error_of(chat(client, user(image_part(data_uri(big)))))["message"]
    assert chat(client, user(image_part(small), image_part(small))).status_code == 200


# ---------------------------------------------------------------- URLs: only from IMAGE_URL_HOSTS


class _ImageServer(http.server.BaseHTTPRequestHandler):
    images: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/latest/meta-data")
            self.end_headers()
            return
        data = self.images.get(self.path)
        self.send_response(200 if data is not None else 404)
        self.send_header("Content-Length", str(len(data or b"")))
        self.end_headers()
        self.wfile.write(data or b"")

    def log_message(self, *args: object) -> None:
        """Quiet."""


@pytest.fixture
def image_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ImageServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_an_image_url_is_fetched_only_from_an_allowed_host(make_client: Any, image_server: str) -> None:
    image = png(5, 5)
    _ImageServer.images = {"/cat.png": image, "/big.png": png(5, 5) + b"\0" * 5000}
    closed = make_client(VISION_ENV, VisionRegistry())
    error = error_of(chat(closed, user(image_part(f"{image_server}/cat.png"))))
    assert "IMAGE_URL_HOSTS" in error["message"] and "127.0.0.1" in error["message"]

    client = make_client({**VISION_ENV, "IMAGE_URL_HOSTS": "127.0.0.1", "MAX_IMAGE_BYTES": "4096"}, VisionRegistry())
    response = chat(client, user(image_part(f"{image_server}/cat.png"), "?"))
    assert response.status_code == 200, response.text
    assert tag(image, 5, 5) in response.json()["choices"][0]["message"]["content"]
    assert "HTTP 404" in error_of(chat(client, user(image_part(f"{image_server}/nope.png"))))["message"]
    assert "MAX_IMAGE_BYTES" in error_of(chat(client, user(image_part(f"{image_server}/big.png"))))["message"]
    # A redirect is not followed: it could lead anywhere, the allowlist notwithstanding.
    assert "HTTP 302" in error_of(chat(client, user(image_part(f"{image_server}/moved"))))["message"]
    other = f"http://localhost:{image_server.rsplit(':', 1)[1]}/cat.png"  # the same server under another name
    assert "IMAGE_URL_HOSTS" in error_of(chat(client, user(image_part(other))))["message"]


# ---------------------------------------------------------------- the cache


def test_the_cache_keys_images_by_their_bytes(make_client: Any, image_server: str) -> None:
    client = make_client({**VISION_ENV, "IMAGE_URL_HOSTS": "127.0.0.1"}, VisionRegistry())
    red, blue = png(colour=(255, 0, 0)), png(colour=(0, 0, 255))
    _ImageServer.images = {"/red.png": red}

    def ask(url: str) -> Any:
        return chat(client, user("what colour?", image_part(url)), temperature=0)

    first, second = ask(data_uri(red)), ask(data_uri(blue))
    assert first.headers["x-cache"] == second.headers["x-cache"] == "MISS"  # same text, different images
    assert first.json()["choices"][0]["message"]["content"] != second.json()["choices"][0]["message"]["content"]
    again = ask(data_uri(red))
    assert again.headers["x-cache"] == "HIT"
    assert again.json()["choices"][0]["message"] == first.json()["choices"][0]["message"]
    fetched = ask(f"{image_server}/red.png")  # the same bytes from a URL: the same question
    assert fetched.headers["x-cache"] == "HIT"
