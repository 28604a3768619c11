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
from dataclasses import dataclass
from typing import Any

from chat.structured_output import check_schema
from core.errors import InvalidRequest

MAX_PARALLEL_CALLS = 8
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


@dataclass(frozen=True)
class ToolPlan:
    tools: tuple[dict[str, Any], ...]  # the OpenAI "function" objects offered
    forced: bool  # "required" or a named function: the output must be a call
    parallel: bool

    @property
    def names(self) -> set[str]:
        return {tool["name"] for tool in self.tools}


def plan_tools(tools: list[Any] | None, tool_choice: Any, parallel_tool_calls: bool | None) -> ToolPlan | None:
    """What the request asks of tools; None when tools play no part (absent, or tool_choice "none")."""
    if not tools or tool_choice == "none":
        if isinstance(tool_choice, dict) and not tools:
            raise InvalidRequest("tool_choice names a function but no tools were given", param="tool_choice")
        return None
    functions = [tool.function.model_dump(exclude_none=True) for tool in tools]
    for function in functions:
        check_schema(function.get("parameters", {"type": "object"}), f"tools.{function['name']}.parameters")
    parallel = parallel_tool_calls is not False
    if tool_choice in (None, "auto"):
        return ToolPlan(tuple(functions), forced=False, parallel=parallel)
    if tool_choice == "required":
        return ToolPlan(tuple(functions), forced=True, parallel=parallel)
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
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


def prepare_messages(messages: list[dict[str, Any]], plan: ToolPlan | None) -> list[dict[str, Any]]:
    """Add the tool instructions to the system prompt; show earlier calls in the same JSON form."""
    out: list[dict[str, Any]] = []
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            calls = [
                {"name": c["function"]["name"], "arguments": _loads(c["function"].get("arguments") or "{}")}
                for c in message["tool_calls"]
            ]
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


class ToolStreamShaper:
    """Streams plain answers as they come, but holds back text that may be a tool call until the end.

    A call is sent as OpenAI's tool-call deltas: the first carries `index`, `id`, `type` and the
    function name, the next the arguments.
    """

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.held = ""
        self.is_call: bool | None = True if plan.forced else None

    def feed(self, piece: str) -> list[dict[str, Any]]:
        if self.is_call is False:
            return [{"text": piece}]
        self.held += piece
        if self.is_call is None:
            self.is_call = may_be_call(self.held)
            if self.is_call is False:
                text, self.held = self.held, ""
                return [{"text": text}]
        return []

    def end(self, done: Any) -> tuple[list[dict[str, Any]], str]:
        reason = "length" if done.finish_reason == "length" else "stop"
        if not self.held:
            return [], reason
        calls = parse_tool_calls(self.held, self.plan)
        if not calls:
            return [{"text": self.held}], reason
        deltas: list[dict[str, Any]] = []
        for index, call in enumerate(calls):
            function = call["function"]
            head = {
                "index": index,
                "id": call["id"],
                "type": "function",
                "function": {"name": function["name"], "arguments": ""},
            }
            deltas.append({"delta": {"tool_calls": [head]}})
            deltas.append(
                {"delta": {"tool_calls": [{"index": index, "function": {"arguments": function["arguments"]}}]}}
            )
        return deltas, "tool_calls"
