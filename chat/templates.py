"""Chat templates: render a conversation into the prompt text a model was trained on.

A GGUF usually carries its Jinja template in `tokenizer.chat_template`; it is rendered in a sandbox
(templates come from model files, which we do not trust to run code). A GGUF without one gets its
architecture's template: llama-cpp-python's silent fallback to a Llama-2 format makes Gemma answer
nothing. `{TIER}_CHAT_FORMAT` names a built-in template; `{TIER}_CHAT_TEMPLATE` is Jinja text or a
path to a file with it.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment

from core.errors import BackendError, InvalidRequest
from core.turns import Message

log = logging.getLogger("llmservice.templates")

GEMMA = """\
{{- bos_token -}}
{%- set ns = namespace(system='') -%}
{%- for message in messages -%}
{%- if message['role'] in ('system', 'developer') -%}
{%- set ns.system = ns.system + message['content'] + '\n\n' -%}
{%- endif -%}
{%- endfor -%}
{%- set ns.first = true -%}
{%- for message in messages if message['role'] not in ('system', 'developer') -%}
{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}
<start_of_turn>{{ role }}
{% if ns.first and role == 'user' %}{{ ns.system }}{% set ns.first = false %}{% endif -%}
{{ message['content'] | trim }}<end_of_turn>
{% endfor -%}
{%- if add_generation_prompt -%}<start_of_turn>model
{% endif -%}
"""

CHATML = """\
{%- for message in messages -%}
<|im_start|>{{ 'system' if message['role'] == 'developer' else message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt -%}<|im_start|>assistant
{% endif -%}
"""

LLAMA3 = """\
{{- bos_token -}}
{%- for message in messages -%}
<|start_header_id|>{{ 'system' if message['role'] == 'developer' else message['role'] }}<|end_header_id|>

{{ message['content'] | trim }}<|eot_id|>
{%- endfor -%}
{%- if add_generation_prompt -%}<|start_header_id|>assistant<|end_header_id|>

{% endif -%}
"""

MISTRAL = """\
{{- bos_token -}}
{%- for message in messages -%}
{%- if message['role'] == 'assistant' -%}{{ message['content'] }}{{ eos_token }}
{%- else -%}[INST] {{ message['content'] }} [/INST]{%- endif -%}
{%- endfor -%}
"""

PHI3 = """\
{%- for message in messages -%}
<|{{ 'system' if message['role'] == 'developer' else message['role'] }}|>
{{ message['content'] }}<|end|>
{% endfor -%}
{%- if add_generation_prompt -%}<|assistant|>
{% endif -%}
"""

# Plain text, for base models used as completers.
RAW = """\
{%- for message in messages -%}{{ message['content'] }}
{% endfor -%}
"""

BUILTIN_TEMPLATES = {"gemma": GEMMA, "chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL, "phi3": PHI3, "raw": RAW}

# general.architecture of a GGUF -> the template its family was trained with.
ARCHITECTURE_TEMPLATES = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3n": "gemma",
    "qwen2": "chatml",
    "qwen3": "chatml",
    "qwen2moe": "chatml",
    "phi3": "phi3",
    "llama": "llama3",
    "mistral": "mistral",
}


def _raise(message: str) -> None:
    raise InvalidRequest(f"The chat template refused the conversation: {message}")


# A template comes from a model file: it must not stall or exhaust the process whatever it does.
MAX_RENDER_CHARS = 4_000_000  # ~1M tokens of prompt: beyond any context
MAX_RENDER_SECONDS = 2.0
MAX_LOOP_ITEMS = 1_000_000  # items of every range() of one rendering together (nested loops multiply)
_budget = threading.local()


class TemplateBomb(BackendError):
    code = "chat_template_limits"


def _spend(items: int = 0) -> None:
    _budget.items += items
    if _budget.items > MAX_LOOP_ITEMS:
        raise TemplateBomb(f"The chat template loops over more than {MAX_LOOP_ITEMS} items")
    if time.monotonic() > _budget.deadline:
        raise TemplateBomb(f"The chat template ran longer than {MAX_RENDER_SECONDS:g} s")


def _bounded_range(*args: int) -> range:
    items = range(*args)
    _spend(len(items))
    return items


def _too_big(value: object) -> bool:
    return isinstance(value, str | list | tuple | bytes) and len(value) > MAX_RENDER_CHARS


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox, plus bounds on time, loop items and the size of anything built."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _spend()
        if operator == "**" and isinstance(right, int) and right > 64:
            raise TemplateBomb("The chat template raises a number to a huge power")
        if operator == "*" and any(isinstance(v, int) and v > MAX_RENDER_CHARS for v in (left, right)):
            raise TemplateBomb("The chat template builds a value over the size limit")
        result = super().call_binop(context, operator, left, right)
        if _too_big(result):
            raise TemplateBomb("The chat template builds a value over the size limit")
        return result

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 - jinja's names
        _spend()
        if any(isinstance(v, int) and v > MAX_RENDER_CHARS for v in (*args, *kwargs.values())):
            raise TemplateBomb("The chat template builds a value over the size limit")
        result = super().call(__context, __obj, *args, **kwargs)
        if _too_big(result):
            raise TemplateBomb("The chat template builds a value over the size limit")
        return result

    def getitem(self, obj: Any, argument: Any) -> Any:
        _spend()
        return super().getitem(obj, argument)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _spend()
        return super().getattr(obj, attribute)


@lru_cache(maxsize=32)
def _compile(source: str) -> Any:
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise
    env.globals["range"] = _bounded_range
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return env.from_string(source)


def select_template(chat_template: str, chat_format: str, gguf_template: str | None, architecture: str) -> str:
    """Pick the template: explicit Jinja > named format > the file's own > the architecture's."""
    if chat_template:
        path = Path(chat_template)
        if "{" not in chat_template and path.is_file():
            return path.read_text(encoding="utf-8")
        return chat_template
    if chat_format:
        if chat_format not in BUILTIN_TEMPLATES:
            raise ValueError(f"unknown chat format {chat_format!r} (choose one of {', '.join(BUILTIN_TEMPLATES)})")
        return BUILTIN_TEMPLATES[chat_format]
    if gguf_template:
        return gguf_template
    return BUILTIN_TEMPLATES[ARCHITECTURE_TEMPLATES.get(architecture, "chatml")]


def render(
    template: str,
    messages: Sequence[dict[str, Any]],
    *,
    bos_token: str,
    eos_token: str,
    add_generation_prompt: bool = True,
) -> str:
    """Render a conversation; template errors become a 400; a template over its limits (time, loop
    items, size) a `TemplateBomb`."""
    import jinja2

    _budget.items, _budget.deadline = 0, time.monotonic() + MAX_RENDER_SECONDS
    variables = {
        "messages": list(messages),
        "bos_token": bos_token,
        "eos_token": eos_token,
        "add_generation_prompt": add_generation_prompt,
    }
    try:
        size, parts = 0, []
        for part in _compile(template).generate(**variables):
            size += len(part)
            if size > MAX_RENDER_CHARS:
                raise TemplateBomb(f"The chat template's output is over {MAX_RENDER_CHARS} characters")
            _spend()
            parts.append(part)
        return "".join(parts)
    except (InvalidRequest, TemplateBomb):
        raise
    except RecursionError:
        raise TemplateBomb("The chat template recurses too deeply") from None
    except jinja2.TemplateError as exc:
        raise InvalidRequest(f"The chat template failed on this conversation: {exc}") from None


# ---------------------------------------------------------------- what is the template's, what is the user's

Segment = tuple[str, bool]  # (text, special): only the template's own text may hold control tokens
_PRIVATE_USE = range(0xE000, 0xF8FF)
_warned: set[str] = set()


def render_segments(template: str, messages: Sequence[Message], *, bos_token: str, eos_token: str) -> list[Segment]:
    """The rendered prompt split into the template's text and the messages' text, so a tokenizer parses
    control tokens (`<start_of_turn>`, `</s>`, ...) only where the template wrote them: a user who
    types them gets plain text, not a forged turn.

    Message contents are wrapped in two private-use characters no content holds, the template is
    rendered, and the result is split on them. It must equal the plain rendering once the markers
    are gone (templates that `trim` content are allowed for); a template that transforms content in
    other ways falls back to the plain rendering, with one warning per template.
    """
    plain = render(template, messages, bos_token=bos_token, eos_token=eos_token)
    texts = [m.get("content") for m in messages]
    if not any(isinstance(t, str) and t for t in texts):
        return [(plain, True)]
    used = set().union(*(t for t in texts if isinstance(t, str)))
    free = (chr(c) for c in _PRIVATE_USE if chr(c) not in used)
    opener, closer = next(free), next(free)
    marked_messages = [
        {**m, "content": f"{opener}{m['content']}{closer}"} if isinstance(m.get("content"), str) and m["content"] else m
        for m in messages
    ]
    marked = render(template, marked_messages, bos_token=bos_token, eos_token=eos_token)  # type: ignore[arg-type]
    segments = _split(marked, opener, closer)
    if segments is not None:
        if "".join(text for text, _ in segments) == plain:
            return [s for s in segments if s[0]]
        trimmed = [(text if special else text.strip(), special) for text, special in segments]
        if "".join(text for text, _ in trimmed) == plain:
            return [s for s in trimmed if s[0]]
    key = template[:200]
    if key not in _warned:
        _warned.add(key)
        log.warning("this chat template transforms message text: control tokens in messages are not neutralised")
    return [(plain, True)]


def _split(marked: str, opener: str, closer: str) -> list[Segment] | None:
    segments: list[Segment] = []
    rest = marked
    while rest:
        start = rest.find(opener)
        if start < 0:
            segments.append((rest, True))
            break
        end = rest.find(closer, start + 1)
        if end < 0 or closer in rest[:start] or opener in rest[start + 1 : end]:
            return None
        segments.append((rest[:start], True))
        segments.append((rest[start + 1 : end], False))
        rest = rest[end + 1 :]
    return None if any(opener in t or closer in t for t, _ in segments) else segments
