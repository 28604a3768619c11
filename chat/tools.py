"""Tool calling for any chat model: describe the tools in the prompt, force or parse the call.

The model is told to answer `{"tool_calls": [{"name": ..., "arguments": {...}}]}` when it calls a
function. With `tool_choice` "required" or a named function the output is forced into that shape by
the structured-output schema (see structured_output.py), so even a small model calls correctly; with
"auto" the output is parsed, and plain text stays plain text. `<tool_call>{...}</tool_call>` blocks
(Hermes/Qwen style) are understood too.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from chat.structured_output import check_schema
from core.errors import InvalidRequest
from core.events import DoneEvent, Event, TextEvent, ToolCallEvent
from core.turns import JsonObject, Message, ToolPlan

MAX_PARALLEL_CALLS = 8
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def plan_tools(
    functions: Sequence[JsonObject] | None, tool_choice: str | JsonObject | None, parallel_tool_calls: bool | None
) -> ToolPlan | None:
    """What the request asks of tools (`functions`: the OpenAI "function" objects offered); None when
    tools play no part (absent, or tool_choice "none")."""
    if not functions or tool_choice == "none":
        if isinstance(tool_choice, dict) and not functions:
            raise InvalidRequest("tool_choice names a function but no tools were given", param="tool_choice")
        return None
    for function in functions:
        check_schema(function.get("parameters", {"type": "object"}), f"tools.{function['name']}.parameters")
    parallel = parallel_tool_calls is not False
    if tool_choice in (None, "auto"):
        return ToolPlan(tuple(functions), forced=False, parallel=parallel)
    if tool_choice == "required":
        return ToolPlan(tuple(functions), forced=True, parallel=parallel)
    if isinstance(tool_choice, dict):
        chosen_function = tool_choice.get("function")
        name = chosen_function.get("name") if isinstance(chosen_function, dict) else None
        if not isinstance(name, str):
            raise InvalidRequest(
                'tool_choice must name a function: {"type": "function", "function": {"name": "..."}}',
                param="tool_choice.function",
            )
        chosen = [f for f in functions if f["name"] == name]
        if not chosen:
            raise InvalidRequest(f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        return ToolPlan(tuple(chosen), forced=True, parallel=False)
    raise InvalidRequest("tool_choice must be 'none', 'auto', 'required' or a named function", param="tool_choice")


def call_schema(plan: ToolPlan) -> dict[str, Any]:
    """The JSON schema of a forced answer: one call (or several when parallel calls are allowed)."""
    variants = [
        {
            "type": "object",
            "properties": {"name": {"const": tool["name"]}, "arguments": tool.get("parameters") or {"type": "object"}},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in plan.tools
    ]
    item = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return {
        "type": "object",
        "properties": {
            "tool_calls": {
                "type": "array",
                "items": item,
                "minItems": 1,
                "maxItems": MAX_PARALLEL_CALLS if plan.parallel else 1,
            }
        },
        "required": ["tool_calls"],
        "additionalProperties": False,
    }


def instructions(plan: ToolPlan) -> str:
    listing = json.dumps([{k: v for k, v in t.items() if k != "strict"} for t in plan.tools], ensure_ascii=False)
    rule = "You must call one of them." if plan.forced else "Call one only when it helps; otherwise answer normally."
    return (
        f"You can call these functions: {listing}\n{rule} To call, reply with only this JSON: "
        '{"tool_calls": [{"name": "<function name>", "arguments": {<arguments>}}]}'
    )


def prepare_messages(messages: Sequence[Message], plan: ToolPlan | None) -> list[Message]:
    """Add the tool instructions to the system prompt; show earlier calls in the same JSON form."""
    out: list[Message] = []
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            calls = [_earlier_call(call) for call in message["tool_calls"]]
            message = {**message, "content": json.dumps({"tool_calls": calls}, ensure_ascii=False)}
        out.append(message)
    if plan is None:
        return out
    text = instructions(plan)
    if out and out[0]["role"] in ("system", "developer"):
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{text}"}
    else:
        out.insert(0, {"role": "system", "content": text})
    return out


def _earlier_call(call: JsonObject) -> JsonObject:
    function = call.get("function")
    function = function if isinstance(function, dict) else {}
    arguments = function.get("arguments")
    return {
        "name": function.get("name"),
        "arguments": _loads(arguments if isinstance(arguments, str) and arguments else "{}"),
    }


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _as_call(obj: Any, names: set[str]) -> dict[str, Any] | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    arguments = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(arguments, str):
        arguments = _loads(arguments)
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": obj["name"], "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


def parse_tool_calls(text: str, plan: ToolPlan) -> list[dict[str, Any]] | None:
    """OpenAI tool_calls found in the model's text, or None when it answered in plain text."""
    stripped = text.strip()
    candidates: list[Any] = []
    tagged = _TAGGED.findall(stripped)
    if tagged:
        candidates = [_loads(block) for block in tagged]
    else:
        parsed = _loads(stripped)
        if isinstance(parsed, dict) and isinstance(parsed.get("tool_calls"), list):
            candidates = parsed["tool_calls"]
        elif isinstance(parsed, dict):
            candidates = [parsed]
    calls = [call for call in (_as_call(c, plan.names) for c in candidates) if call is not None]
    return calls or None


def may_be_call(prefix: str) -> bool | None:
    """While streaming: True/False once the start of the text shows whether it is a call, else None."""
    stripped = prefix.lstrip()
    if not stripped:
        return None
    if stripped[0] == "{":
        return True
    if "<tool_call>".startswith(stripped[:11]):
        return True if len(stripped) >= 11 else None
    return False


async def shape_calls(events: AsyncIterator[Event], plan: ToolPlan, hold_all: bool) -> AsyncIterator[Event]:
    """A choice's events with its tool call, if any, turned into `ToolCallEvent`s.

    Plain answers pass as they come, but text that may be a call is held back until the end. A whole
    (non-streamed) turn holds everything (`hold_all`), so a call anywhere in the text is found.
    """
    held = ""
    is_call: bool | None = True if plan.forced or hold_all else None
    async for event in events:
        if not isinstance(event, TextEvent) or is_call is False:
            if isinstance(event, DoneEvent):
                async for shaped in _end(held, event, plan):
                    yield shaped
                return
            yield event
            continue
        held += event.text
        if is_call is None:
            is_call = may_be_call(held)
            if is_call is False:
                text, held = held, ""
                yield TextEvent(text)


async def _end(held: str, done: DoneEvent, plan: ToolPlan) -> AsyncIterator[Event]:
    calls = parse_tool_calls(held, plan) if held else None
    if not calls:
        if held:
            yield TextEvent(held)
        yield done
        return
    for index, call in enumerate(calls):
        function = call["function"]
        yield ToolCallEvent(index, call["id"], function["name"], function["arguments"])
    yield replace(done, finish_reason="tool_calls")
