"""OpenAI's audio endpoints: `/v1/audio/transcriptions` and `/v1/audio/translations` (into English).

Each handler: parse the multipart form -> resolve the speech tier (a `whisper-1` name routes there) ->
the cache (temperature 0: keyed by the file's SHA-256 and the options) -> lease the tier -> run the
transcription on its owner thread -> shape the format asked for (api/audio_formats.py). With
`stream=true` the segments go out as OpenAI's `transcript.text.delta` events as they are decoded, then
one `transcript.text.done`. The upload is bounded by MAX_AUDIO_BYTES (the body-limit middleware), the
audio by SPEECH_MAX_AUDIO_SECONDS; what does not decode as audio is a 400 naming the file. Concurrent
requests at one temperature are decoded together on the owner thread (speech_batch.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Hashable, Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Annotated, Literal, Protocol

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from api import audio_formats as formats
from api import cache_lookup
from api.sse import SSE_HEADERS, disconnected, sse
from api.state import app_state
from config import TierConfig
from core import routing
from core.errors import BackendError, ClientGone, InvalidRequest, ServiceError
from core.protocols import (
    AudioFile,
    JobOutcome,
    SpeechJob,
    TranscribeOptions,
    Transcriber,
    Transcript,
    TranscriptSegment,
)
from middleware import request_context
from speech_batch import transcribe_jobs

router = APIRouter()  # mounted under "/v1", "" and "/api/v1"
log = logging.getLogger("llmservice.audio")

Format = Literal["json", "text", "srt", "verbose_json", "vtt"]
Granularity = Literal["word", "segment"]


@dataclass(frozen=True)
class SpeechRequest:
    """One parsed audio request: the file, the options for the model, how to answer."""

    model: str
    audio: AudioFile
    options: TranscribeOptions
    response_format: str
    granularities: tuple[str, ...]
    stream: bool


class CacheKey(BaseModel):
    """What a cached transcript depends on besides the tier (the format is applied after the cache)."""

    audio_sha256: str
    task: str
    language: str | None
    prompt: str | None
    temperature: float
    word_timestamps: bool


async def _read(
    file: UploadFile,
    model: str,
    response_format: str,
    stream: bool,
    options: TranscribeOptions,
    granularities: tuple[str, ...],
) -> SpeechRequest:
    if stream and response_format not in ("json", "text"):
        raise InvalidRequest("stream=true sends text events: use response_format json or text", param="stream")
    if "word" in granularities and response_format != "verbose_json":
        raise InvalidRequest("Word timestamps need response_format verbose_json", param="timestamp_granularities[]")
    data = await file.read()
    audio = AudioFile(data, file.filename or "audio", file.content_type or "application/octet-stream")
    return SpeechRequest(model, audio, options, response_format, granularities, stream)


def _resolve(request: Request, model: str) -> TierConfig:
    settings = app_state(request).settings
    tier = routing.resolve(model, "speech", settings).tier
    request_context.note_tier(tier)  # metrics and the access log are per tier; a restricted key gets 403
    return settings.tiers[tier]


# ---------------------------------------------------------------- routes


@router.post("/audio/transcriptions", response_model=None)
async def transcriptions(
    request: Request,
    file: Annotated[UploadFile, File(description="The audio: wav, mp3, flac, ogg, webm, m4a, ...")],
    model: Annotated[str, Form(min_length=1, max_length=256)],
    language: Annotated[str | None, Form(max_length=16, pattern=r"^[A-Za-z-]*$")] = None,
    prompt: Annotated[str | None, Form(max_length=8192)] = None,
    response_format: Annotated[Format, Form()] = "json",
    temperature: Annotated[float | None, Form(ge=0.0, le=1.0)] = None,
    timestamp_granularities: Annotated[list[Granularity] | None, Form(alias="timestamp_granularities[]")] = None,
    stream: Annotated[bool, Form()] = False,
) -> Response:
    tier = _resolve(request, model)
    options = TranscribeOptions(
        task="transcribe",
        language=(language or "").strip().lower() or None,
        prompt=prompt or None,
        temperature=tier.temperature if temperature is None else temperature,
        word_timestamps="word" in (timestamp_granularities or ()),
    )
    granularities = tuple(timestamp_granularities or ())
    body = await _read(file, model, response_format, stream, options, granularities)
    return await _answer(request, tier, body)


@router.post("/audio/translations", response_model=None)
async def translations(
    request: Request,
    file: Annotated[UploadFile, File(description="The audio, in any language Whisper knows")],
    model: Annotated[str, Form(min_length=1, max_length=256)],
    prompt: Annotated[str | None, Form(max_length=8192)] = None,
    response_format: Annotated[Format, Form()] = "json",
    temperature: Annotated[float | None, Form(ge=0.0, le=1.0)] = None,
) -> Response:
    tier = _resolve(request, model)
    options = TranscribeOptions(
        task="translate", prompt=prompt or None, temperature=tier.temperature if temperature is None else temperature
    )
    body = await _read(file, model, response_format, False, options, ())
    return await _answer(request, tier, body)


async def _answer(request: Request, tier: TierConfig, body: SpeechRequest) -> Response:
    if body.stream:
        return await _stream_response(request, tier, body)
    transcript, headers = await _transcript(request, tier, body)
    fmt = body.response_format
    if fmt == "json":
        return JSONResponse(formats.as_json(transcript), headers=headers)
    if fmt == "verbose_json":
        return JSONResponse(formats.as_verbose_json(transcript, body.options.task, body.granularities), headers=headers)
    shape = {"text": formats.as_text, "srt": formats.as_srt, "vtt": formats.as_vtt}[fmt]
    return Response(shape(transcript), media_type=formats.MEDIA_TYPES[fmt], headers=headers)


# ---------------------------------------------------------------- running it


class SpeechWorker(Protocol):
    """What a speech tier runs on: the micro-batching owner thread, or a remote tier's RemoteWorker."""

    def submit_batch(
        self,
        key: Hashable,
        items: Sequence[SpeechJob],
        run: Callable[[Transcriber, Sequence[SpeechJob]], list[JobOutcome]],
    ) -> Future[list[JobOutcome]]: ...


def batch_key(options: TranscribeOptions) -> Hashable:
    """Requests batch together when this matches: CTranslate2 decodes a batch at one temperature (the
    language, task, prompt and word timestamps are each request's own)."""
    return ("speech", options.temperature)


class _Run:
    """One transcription on the tier's owner thread, possibly batched with others; its segments reach the
    event loop as they are decoded, and `cancel` stops it at the next segment or window (the client left)."""

    def __init__(self, worker: SpeechWorker, body: SpeechRequest) -> None:
        self.loop = asyncio.get_running_loop()
        self.segments: asyncio.Queue[TranscriptSegment | None] = asyncio.Queue()
        self.stopped = threading.Event()
        self.future: Future[Transcript] = Future()
        job = SpeechJob(body.audio, body.options, self._sink, self.stopped.is_set, self._done)
        self.batch = worker.submit_batch(batch_key(body.options), [job], transcribe_jobs)
        self.batch.add_done_callback(self._settle)

    def _done(self, outcome: JobOutcome) -> None:  # owner thread, as soon as this request ends
        with contextlib.suppress(InvalidStateError):  # settled already (cancelled)
            if isinstance(outcome, Exception):
                self.future.set_exception(outcome)
            else:
                self.future.set_result(outcome)
            self.loop.call_soon_threadsafe(self.segments.put_nowait, None)

    def _settle(self, batch: Future[list[JobOutcome]]) -> None:  # when the whole batch ends (or was cancelled)
        if batch.cancelled():
            with contextlib.suppress(InvalidStateError):
                self.future.cancel()
                self.loop.call_soon_threadsafe(self.segments.put_nowait, None)
        elif (error := batch.exception()) is not None:
            self._done(error if isinstance(error, Exception) else RuntimeError("the transcription stopped"))
        else:
            self._done(batch.result()[0])  # no-op when the job told us already

    def _sink(self, segment: TranscriptSegment) -> None:  # owner thread
        if self.stopped.is_set():
            raise ClientGone("The client disconnected")
        self.loop.call_soon_threadsafe(self.segments.put_nowait, segment)

    def cancel(self) -> None:
        self.stopped.set()
        self.batch.cancel()  # still queued: it never runs

    async def result(self, request: Request) -> Transcript:
        """The transcript, or ClientGone as soon as the client disconnects (the work stops too)."""
        done = asyncio.wrap_future(self.future)
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait({done, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not done.done():
                self.cancel()
                raise ClientGone("The client disconnected before the transcript was ready")
            transcript: Transcript = done.result()
            return transcript
        finally:
            gone.cancel()


async def _transcript(request: Request, tier: TierConfig, body: SpeechRequest) -> tuple[Transcript, dict[str, str]]:
    async def compute() -> formats.JsonObject:
        async with app_state(request).manager.lease(tier.name) as worker:
            return formats.to_cache(await _Run(worker, body).result(request))

    if body.options.temperature != 0:  # sampled: another run may differ, so nothing is cached
        return formats.from_cache(await compute()), {}
    options = body.options
    key = CacheKey(
        audio_sha256=hashlib.sha256(body.audio.data).hexdigest(),
        task=options.task,
        language=options.language,
        prompt=options.prompt,
        temperature=options.temperature,
        word_timestamps=options.word_timestamps,
    )
    value, headers = await cache_lookup.whole_request(request, f"audio/{options.task}", tier, key, compute)
    return formats.from_cache(value), headers


async def _stream_response(request: Request, tier: TierConfig, body: SpeechRequest) -> StreamingResponse:
    """Lease before answering, so a full queue or a model that fails to load is a status, not an event."""
    stack = contextlib.AsyncExitStack()
    try:
        worker = await stack.enter_async_context(app_state(request).manager.lease(tier.name))
        run = _Run(worker, body)
    except BaseException:
        await stack.aclose()
        raise
    return StreamingResponse(_events(run, stack), media_type="text/event-stream", headers=SSE_HEADERS)


async def _events(run: _Run, stack: contextlib.AsyncExitStack) -> AsyncIterator[bytes]:
    pieces: list[str] = []
    try:
        while (segment := await run.segments.get()) is not None:
            text = segment.text if pieces else segment.text.lstrip()
            pieces.append(text)
            request_context.mark_first_token()
            yield sse({"type": "transcript.text.delta", "delta": text})
        try:
            transcript = await asyncio.wrap_future(run.future)
        except Exception as exc:  # noqa: BLE001 - the stream has started: one error event, no done
            if not isinstance(exc, ServiceError):
                log.error("transcription failed mid-stream: %s", type(exc).__name__)
                exc = BackendError("The transcription failed")
            yield sse(exc.body())
            return
        yield sse({"type": "transcript.text.done", "text": transcript.text})
    finally:
        run.cancel()
        await stack.aclose()
