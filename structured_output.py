"""Structured output: a JSON schema the decoder is forced to follow.

`response_format` (json_object / json_schema) and forced tool calls both end up as one JSON schema in
`SamplingParams.json_schema`. Each backend enforces it while sampling: llama.cpp through a GBNF
grammar made from the schema, MLX through an llguidance matcher used as a logits processor. The
output therefore always parses; it is cut short only when `max_tokens` runs out (finish_reason
"length").
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from errors import InvalidRequest

JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}

# llama-cpp-python's converter lets raw control characters into strings; JSON forbids them.
_LOOSE_CHAR = 'char ::= [^"\\\\] |'
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def canonical(schema: dict[str, Any]) -> str:
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


def check_schema(schema: Any, param: str) -> dict[str, Any]:
    """A valid JSON schema object, or a 400 naming the parameter."""
    if not isinstance(schema, dict):
        raise InvalidRequest("The JSON schema must be an object", param=param)
    from jsonschema import SchemaError, validators

    try:
        validators.validator_for(schema).check_schema(schema)
    except SchemaError as exc:
        raise InvalidRequest(f"Invalid JSON schema: {exc.message}", param=param) from None
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


@lru_cache(maxsize=128)
def gbnf_for(schema_json: str) -> str:
    """A llama.cpp GBNF grammar for a (canonical JSON) schema."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        grammar = json_schema_to_gbnf(schema_json)
    except Exception as exc:  # noqa: BLE001 - the converter raises plain exceptions for unsupported features
        raise InvalidRequest(f"This JSON schema cannot be enforced: {exc}", param="response_format") from None
    return grammar.replace(_LOOSE_CHAR, _STRICT_CHAR)


class MlxSchemaProcessor:
    """An mlx-lm logits processor that masks every token the schema does not allow next.

    mlx-lm calls it once per step with the sequence's tokens so far (prompt included) and the logits;
    tokens generated since the last call are fed to the matcher first.
    """

    def __init__(self, tokenizer: Any, schema_json: str, eos_token_ids: set[int]) -> None:
        import llguidance
        import numpy as np
        from llguidance.numpy import allocate_token_bitmask

        self._np = np
        self._matcher = llguidance.LLMatcher(tokenizer, llguidance.LLMatcher.grammar_from_json_schema(schema_json))
        self._bitmask = allocate_token_bitmask(1, tokenizer.vocab_size)
        self._eos = eos_token_ids
        self._prompt_length: int | None = None
        self._consumed = 0

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx
        from llguidance.numpy import fill_next_token_bitmask

        history = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
        if self._prompt_length is None:
            self._prompt_length = len(history)
        for token in history[self._prompt_length + self._consumed :]:
            self._matcher.consume_token(int(token))
            self._consumed += 1
        fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        bits = self._np.unpackbits(self._bitmask.view(self._np.uint8), bitorder="little")[: logits.shape[-1]]
        if self._matcher.is_accepting():
            for eos in self._eos:
                if eos < bits.size:
                    bits[eos] = 1
        allowed = mx.array(bits.astype(bool)).reshape((1, -1)) if logits.ndim == 2 else mx.array(bits.astype(bool))
        return mx.where(allowed, logits, mx.array(-float("inf"), dtype=logits.dtype))


@lru_cache(maxsize=8)
def llguidance_tokenizer(hf_tokenizer: Any) -> Any:
    """llguidance's view of a Hugging Face fast tokenizer (building it takes ~1 s, so it is cached)."""
    import llguidance.hf

    return llguidance.hf.from_tokenizer(hf_tokenizer)
