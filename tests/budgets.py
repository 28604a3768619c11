"""Token budgets for real models that hold whatever words a CPU's kernels pick.

llama.cpp's CPU kernels give different greedy text on different CPUs, so a test never relies on a
model's text fitting a budget. Two ways out:

- `schema_budget`: a JSON schema bounds a constrained reply. The decoder writes one-line JSON with
  fixed separators (chat/structured_output.py), so the longest reply a schema allows is its
  skeleton (every string empty, every other value at its widest) plus its strings at their longest.
  Every token is at least one byte, and a JSON string character at most `MAX_BYTES_PER_CHAR`.
- `no_end_bias`: a `logit_bias` that bans the end-of-generation tokens, so free text always uses up
  its whole budget (finish_reason "length", completion_tokens == max_tokens).
"""

from __future__ import annotations

import json
import logging
from typing import Any

MAX_BYTES_PER_CHAR = 12  # the longest JSON spelling of one character: a "\\uXXXX\\uXXXX" surrogate pair


def compact(value: Any) -> str:
    """JSON as the constrained decoder writes it."""
    return json.dumps(value, separators=(", ", ": "))


def schema_budget(skeleton: Any, string_chars: int) -> int:
    """A max_tokens within which any reply the schema allows ends with finish_reason "stop".

    `skeleton` is the widest reply with every string empty; `string_chars` is the most characters
    all its strings together may hold. One more step is for the end-of-generation token.
    """
    return len(compact(skeleton).encode()) + MAX_BYTES_PER_CHAR * string_chars + 1


def no_end_bias(gguf_path: str) -> dict[str, float]:
    """A `logit_bias` banning every end-of-generation token of a GGUF model (read from its vocabulary)."""
    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # as chat/llama_engine.py: no load chatter
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(gguf_path.encode(), params)
    assert model, f"could not read the vocabulary of {gguf_path}"
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        count = llama_cpp.llama_vocab_n_tokens(vocab)
        ends = [token for token in range(count) if llama_cpp.llama_vocab_is_eog(vocab, token)]
    finally:
        llama_cpp.llama_model_free(model)
    assert ends, "the model has no end-of-generation token"
    return {str(token): -100.0 for token in ends}
