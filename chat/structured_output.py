"""Structured output: a JSON schema the decoder is forced to follow.

`response_format` (json_object / json_schema) and forced tool calls both end up as one JSON schema in
`SamplingParams.json_schema`. Both backends enforce it with an llguidance matcher: a mask of the
tokens the schema allows next, applied before sampling (llama.cpp: to the sampler's candidates; MLX:
as a logits processor). The output therefore always parses and validates; it is cut short only when
`max_tokens` runs out (finish_reason "length").
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from core.errors import InvalidRequest

JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}
_COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}

# Bounds on one schema from a request, checked before jsonschema walks it (recursively, at ~0.3 ms per
# element). OpenAI allows 10 levels of object nesting.
MAX_SCHEMA_DEPTH = 32  # nested objects and arrays; one property level is two ("properties", then the property)
MAX_SCHEMA_NODES = 5_000  # objects, arrays and scalars; keys not counted


def canonical(schema: dict[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


def _bounds_problem(schema: dict[str, Any]) -> str | None:
    """Why `schema` is too deep or too big to check, or None. Iterative: it must not recurse itself."""
    stack: list[tuple[Any, int]] = [(schema, 1)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_SCHEMA_NODES:
            return f"The JSON schema has more than {MAX_SCHEMA_NODES} elements"
        if isinstance(node, dict | list):
            if depth > MAX_SCHEMA_DEPTH:
                return f"The JSON schema is nested more than {MAX_SCHEMA_DEPTH} levels deep"
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return None


def _jsonschema_problem(schema: dict[str, Any]) -> str | None:
    from jsonschema import SchemaError, validators

    if not isinstance(schema.get("$schema", ""), str):  # validator_for would fail on it with a TypeError
        return "Invalid JSON schema: '$schema' must be a string"
    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        return f"Invalid JSON schema: {exc.message}"
    except RecursionError:  # within the bounds above this should not happen; never a 500 if it does
        return "The JSON schema is nested too deeply to check"
    return None


def check_schema(schema: Any, param: str) -> dict[str, Any]:
    """A valid JSON schema object within MAX_SCHEMA_DEPTH and MAX_SCHEMA_NODES, or a 400 naming the parameter."""
    if not isinstance(schema, dict):
        raise InvalidRequest("The JSON schema must be an object", param=param)
    problem = _bounds_problem(schema)
    if problem is None:
        problem = _jsonschema_problem(schema)
    if problem is not None:
        raise InvalidRequest(problem, param=param)
    return schema


def schema_from_response_format(response_format: Any) -> dict[str, Any] | None:
    """The schema a `response_format` asks for, or None for plain text."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return JSON_OBJECT_SCHEMA
    spec = response_format.json_schema or {}
    if "schema" not in spec:
        raise InvalidRequest("response_format.json_schema needs a 'schema'", param="response_format.json_schema")
    return check_schema(spec["schema"], "response_format.json_schema.schema")


def new_matcher(tokenizer: Any, schema_json: str) -> Any:
    """An llguidance matcher for a schema; a schema it cannot enforce is a 400."""
    import llguidance

    # One-line JSON with fixed separators: free whitespace lets a small model pad forever.
    grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_json, overrides=_COMPACT)
    matcher = llguidance.LLMatcher(tokenizer, grammar)
    if matcher.is_error():
        raise InvalidRequest(f"This JSON schema cannot be enforced: {matcher.get_error()}", param="response_format")
    return matcher


def allowed_tokens(matcher: Any, vocab_size: int) -> Any:
    """A boolean numpy vector: which tokens the schema allows next."""
    import numpy as np
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    bitmask = allocate_token_bitmask(1, vocab_size)
    fill_next_token_bitmask(matcher, bitmask, 0)
    return np.unpackbits(bitmask.view(np.uint8), bitorder="little")[:vocab_size].astype(bool)


class MlxSchemaProcessor:
    """An mlx-lm logits processor that masks every token the schema does not allow next.

    mlx-lm calls it once per step with the sequence's tokens so far (prompt included) and the logits;
    tokens generated since the last call are fed to the matcher first.
    """

    def __init__(self, tokenizer: Any, schema_json: str) -> None:
        self._matcher = new_matcher(tokenizer, schema_json)
        self._prompt_length: int | None = None
        self._consumed = 0

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx

        history = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
        if self._prompt_length is None:
            self._prompt_length = len(history)
        for token in history[self._prompt_length + self._consumed :]:
            self._matcher.consume_token(int(token))
            self._consumed += 1
        allowed = mx.array(allowed_tokens(self._matcher, logits.shape[-1]))
        if logits.ndim == 2:
            allowed = allowed.reshape((1, -1))
        return mx.where(allowed, logits, mx.array(-float("inf"), dtype=logits.dtype))


@lru_cache(maxsize=8)
def llguidance_tokenizer(hf_tokenizer: Any) -> Any:
    """llguidance's view of a Hugging Face fast tokenizer (building it takes ~1 s, so it is cached)."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(hf_tokenizer)
