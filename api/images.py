"""Images in chat requests: `image_url` content parts turned into checked images for the turn.

A part's URL is a base64 `data:` URI, or an http(s) URL on a host `IMAGE_URL_HOSTS` names: fetching any
URL a client sends would let it make the server probe its own network (SSRF), so every other URL is a
400 naming the setting, and redirects are not followed (one could lead anywhere). Every image is bounded
(`MAX_IMAGES` per request, `MAX_IMAGE_BYTES`, `MAX_IMAGE_PIXELS`) and decoded once here, so an
undecodable image is a 400 before any model loads. Each message's text gets a random marker where an
image goes (`TurnRequest.image_marker`); the backend puts the image's embeddings there.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import io
import secrets
from dataclasses import replace
from urllib.parse import urlsplit

import httpx

from api.schemas import ChatCompletionRequest, ImageUrl
from config import Settings
from core.errors import InvalidRequest
from core.turns import ImageInput, Message, TurnRequest


def has_images(body: ChatCompletionRequest) -> bool:
    return any(message.images() for message in body.messages)


async def attach_images(body: ChatCompletionRequest, turn: TurnRequest, settings: Settings) -> TurnRequest:
    """`turn` (built from `body`) with the body's images decoded and checked, and each message's text
    marking where its images go. A request without images comes back as it was."""
    found = [(i, j, url) for i, message in enumerate(body.messages) for j, url in enumerate(message.images())]
    if not found:
        return turn
    if len(found) > settings.max_images:
        raise InvalidRequest(
            f"The request has {len(found)} images; at most {settings.max_images} are accepted (MAX_IMAGES)",
            param="messages",
        )
    images = await asyncio.gather(*(_load(url, f"messages.{i}.content", settings) for i, _, url in found))
    marker = f"<image-{secrets.token_hex(8)}>"
    messages: list[Message] = []
    for message, wire in zip(turn.messages, body.messages, strict=True):
        messages.append({**message, "content": wire.text_with_images(marker)} if wire.images() else message)
    return replace(turn, messages=tuple(messages), images=tuple(images), image_marker=marker)


async def _load(url: ImageUrl, param: str, settings: Settings) -> ImageInput:
    if url.url.startswith("data:"):
        data = _decode_data_uri(url.url, param, settings.max_image_bytes)
    else:
        data = await _fetch(url.url, param, settings)
    return await asyncio.to_thread(check_image, data, param, settings.max_image_pixels)


def _decode_data_uri(uri: str, param: str, max_bytes: int) -> bytes:
    header, comma, payload = uri.partition(",")
    if not comma or not header.endswith(";base64"):
        raise InvalidRequest("An image data URI must be base64: data:image/<type>;base64,<data>", param=param)
    if len(payload) * 3 // 4 > max_bytes + 3:
        raise InvalidRequest(f"An image is larger than {max_bytes} bytes (MAX_IMAGE_BYTES)", param=param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("An image data URI holds invalid base64", param=param) from None
    if len(data) > max_bytes:
        raise InvalidRequest(f"An image is larger than {max_bytes} bytes (MAX_IMAGE_BYTES)", param=param)
    return data


def allowed_host(url: str, hosts: tuple[str, ...]) -> bool:
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    return parts.scheme in ("http", "https") and bool(host) and host in {h.lower() for h in hosts}


async def _fetch(url: str, param: str, settings: Settings) -> bytes:
    if not url.startswith(("http://", "https://")):
        raise InvalidRequest("An image URL must be a base64 data: URI or an http(s) URL", param=param)
    if not allowed_host(url, settings.image_url_hosts):
        raise InvalidRequest(
            f"Image URLs from host {urlsplit(url).hostname!r} are not fetched: send the image as a base64 data: URI, "
            "or add the host to IMAGE_URL_HOSTS",
            param=param,
        )
    limit = settings.max_image_bytes
    try:
        async with httpx.AsyncClient(timeout=settings.image_fetch_timeout, follow_redirects=False) as client:
            async with client.stream("GET", url) as response:
                if response.status_code != 200:
                    raise InvalidRequest(f"Fetching the image URL answered HTTP {response.status_code}", param=param)
                data = bytearray()
                async for block in response.aiter_bytes():
                    data += block
                    if len(data) > limit:
                        raise InvalidRequest(f"An image is larger than {limit} bytes (MAX_IMAGE_BYTES)", param=param)
                return bytes(data)
    except httpx.HTTPError as exc:
        raise InvalidRequest(f"The image URL could not be fetched ({type(exc).__name__})", param=param) from None


def check_image(data: bytes, param: str, max_pixels: int) -> ImageInput:
    """Decode `data` once (a truncated or foreign file is a 400) and check its size against MAX_IMAGE_PIXELS."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:  # reads the header only: the size is known before decoding
            width, height = image.size
            if width * height > max_pixels:
                raise InvalidRequest(
                    f"An image is {width}x{height} pixels; at most {max_pixels} are accepted (MAX_IMAGE_PIXELS)",
                    param=param,
                )
            image.load()
    except InvalidRequest:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        raise InvalidRequest("An image could not be decoded (send PNG, JPEG, WebP or GIF)", param=param) from None
    if width < 1 or height < 1:
        raise InvalidRequest("An image has no pixels", param=param)
    return ImageInput(data=data, digest=hashlib.sha256(data).hexdigest(), width=width, height=height)
