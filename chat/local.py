"""The local chat backend: a turn on a token engine driven by its owner thread (chat/scheduler.py).

`LocalChat.start_turn` owns what a local turn needs: tool instructions, template rendering,
tokenization, the context check, sampling parameters (the tier's defaults filled in) and submission
of every choice; stop strings and token budgets are handled by the scheduler.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace

from chat import structured_output, tools
from chat.scheduler import ChatScheduler
from config import TierConfig
from core import priority
from core.errors import ContextLengthExceeded, InvalidRequest, RequestCancelled
from core.events import DoneEvent, EngineEvent, ErrorEvent, Event, TextEvent
from core.protocols import ChatModel, GenerationJob, MediaPrompt, SamplingParams, VisionChatModel, check_token_ids
from core.turns import Choice, Prompt, SamplingRequest, Turn, TurnRequest

STOPPED_BY_SERVER = "The request was stopped by the server (tier unloaded or shutting down)"


class LocalChat:
    """A `ChatBackend` over a token engine driven by its owner thread (chat/scheduler.py)."""

    def __init__(self, scheduler: ChatScheduler, tier: TierConfig) -> None:
        self.scheduler = scheduler
        self.tier = tier
        self.ready = scheduler.ready

    def status(self) -> dict[str, int]:
        return self.scheduler.status()

    def shutdown(self, timeout: float = 10.0) -> None:
        self.scheduler.shutdown(timeout)

    async def start_turn(self, request: TurnRequest) -> Turn:
        if request.wire.get("logprobs"):
            raise InvalidRequest("logprobs are not supported by local tiers", param="logprobs")
        model: ChatModel = self.scheduler.model
        if request.images:
            return await self._start_media_turn(model, request)
        if request.kind == "chat":
            messages = tools.prepare_messages(request.messages, request.tools)
            prompts = [await asyncio.to_thread(model.chat_tokens, messages)]
            counted = len(prompts[0])
        else:
            for prompt in request.prompts:  # ids given by the client: refused before any is queued
                if not isinstance(prompt, str):
                    check_token_ids(prompt, model.vocab_size)
            prompts = await asyncio.to_thread(_tokenize_prompts, model, request.prompts)
            counted = sum(len(p) for p in prompts) * request.n
        room = min(check_context(len(p), model.context_length) for p in prompts)
        params = sampling_params(request.sampling, self.tier, room)
        if request.json_schema is not None:
            params = replace(params, json_schema=structured_output.canonical(request.json_schema))
        choices: list[Choice] = []
        try:  # a request's choices live and die together: one refused cancels those queued before it
            for prompt in prompts:
                for index in range(request.n):
                    choices.append(LocalChoice.submit(self.scheduler, prompt, _seeded(params, index)))
        except BaseException:
            for choice in choices:
                choice.cancel()
            raise
        return Turn(choices, counted)

    async def _start_media_turn(self, model: ChatModel, request: TurnRequest) -> Turn:
        """A chat turn with images: each choice gets its own prompt from the model (its images prepared for its
        projector), carried to the engine by the job. A prompt that never runs is freed when collected."""
        if not (isinstance(model, VisionChatModel) and model.accepts_images):
            raise InvalidRequest(f"The {self.tier.name} tier does not accept images: its model is text only")
        messages = tools.prepare_messages(request.messages, request.tools)
        marker = request.image_marker
        media = [
            await asyncio.to_thread(model.media_prompt, messages, request.images, marker) for _ in range(request.n)
        ]
        room = check_context(len(media[0].tokens), model.context_length)
        params = sampling_params(request.sampling, self.tier, room)
        if request.json_schema is not None:
            params = replace(params, json_schema=structured_output.canonical(request.json_schema))
        choices: list[Choice] = []
        try:
            for index, prompt in enumerate(media):
                choices.append(LocalChoice.submit(self.scheduler, prompt.tokens, _seeded(params, index), prompt))
        except BaseException:
            for choice in choices:
                choice.cancel()
            raise
        return Turn(choices, len(media[0].tokens))


def _tokenize_prompts(model: ChatModel, prompts: Sequence[Prompt]) -> list[list[int]]:
    return [model.tokenize(p) if isinstance(p, str) else list(p) for p in prompts]


class LocalChoice:
    """One submitted sequence plus the asyncio side of its event stream."""

    def __init__(self, job: GenerationJob, queue: asyncio.Queue[EngineEvent], scheduler: ChatScheduler) -> None:
        self.job = job
        self.queue = queue
        self.scheduler = scheduler
        self.ended = False

    @classmethod
    def submit(
        cls, scheduler: ChatScheduler, prompt: list[int], params: SamplingParams, media: MediaPrompt | None = None
    ) -> LocalChoice:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        job = GenerationJob(prompt_tokens=prompt, params=params, media=media)
        scheduler.submit(job, lambda event: loop.call_soon_threadsafe(queue.put_nowait, event), priority.current())
        return cls(job, queue, scheduler)

    def cancel(self) -> None:
        if not self.ended:
            self.job.cancelled.set()
            self.scheduler.wake()

    async def events(self) -> AsyncIterator[Event]:
        while not self.ended:
            event = await self.queue.get()
            if isinstance(event, TextEvent):
                yield event
                continue
            self.ended = True
            if isinstance(event, DoneEvent) and event.finish_reason == "cancelled":
                yield ErrorEvent(
                    RequestCancelled("The request was stopped by the server (tier unloaded or shutting down)")
                )
            else:
                yield event


# ---------------------------------------------------------------- sampling


def sampling_params(request: SamplingRequest, tier: TierConfig, room: int) -> SamplingParams:
    """The request's sampling parameters with the tier's defaults filled in."""
    max_tokens = min(request.max_tokens if request.max_tokens is not None else tier.max_tokens, room)
    return SamplingParams(
        temperature=request.temperature if request.temperature is not None else tier.temperature,
        top_p=request.top_p if request.top_p is not None else tier.top_p,
        top_k=request.top_k if request.top_k is not None else tier.top_k,
        max_tokens=max(1, max_tokens),
        stop=request.stop,
        seed=request.seed,
        repeat_penalty=request.repeat_penalty if request.repeat_penalty is not None else tier.repeat_penalty,
        frequency_penalty=request.frequency_penalty or 0.0,
        presence_penalty=request.presence_penalty or 0.0,
        logit_bias=parse_logit_bias(request.logit_bias),
    )


def parse_logit_bias(raw: Mapping[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} map, biases clamped to [-100, 100] as OpenAI does."""
    if not raw:
        return ()
    try:
        return tuple((int(token), max(-100.0, min(100.0, float(bias)))) for token, bias in raw.items())
    except ValueError:
        raise InvalidRequest("logit_bias keys must be token ids", param="logit_bias") from None


def check_context(prompt_tokens: int, context_length: int) -> int:
    """Room left for the completion; a prompt that fills the context is a 400 naming both counts."""
    if prompt_tokens >= context_length:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context_length} tokens. However, your prompt has "
            f"{prompt_tokens} tokens, which leaves no room for a completion. Shorten the prompt.",
            param="messages",
        )
    return context_length - prompt_tokens


def _seeded(params: SamplingParams, index: int) -> SamplingParams:
    """The i-th of n choices: a different seed each, so choices differ but stay reproducible."""
    if index == 0 or params.seed is None:
        return params
    return replace(params, seed=params.seed + index)
