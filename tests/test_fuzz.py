"""Schemathesis over the served OpenAPI schema, against a live server over fake models: no 5xx, ever.

The schema is fetched from the running app (`/openapi.json`) and narrowed (`narrowed`) so generated
requests reach the models instead of stopping at routing or at checks that need no fuzzing: `model`
is a configured name, `max_tokens` small, token ids ones every tokenizer has, arrays short enough that
an example costs milliseconds. Every route is fuzzed, once: a handler mounted under several prefixes
("/v1", "", "/api/v1") only under the first. Valid requests (positive mode) and schema-violating ones
(negative mode) must both answer below 500, every 4xx in the OpenAI error envelope (Ollama's own shape
on its routes), and a stream must never end with a server error event. Each route gets EXAMPLES
examples per mode, derandomized so CI is repeatable; LLMSERVICE_FUZZ_EXAMPLES=200 fuzzes deeper, at random.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

import hypothesis
import pytest
import requests
import schemathesis

from config import load_settings
from core.protocols import EmbeddingResult
from server import create_app
from tests.conftest import LiveServer
from tests.fakes import FakeEmbedder
from tests.test_hardening_input import ENV, Registry

# Examples per operation and mode: CI runs a fixed, repeatable set; a deeper local run is random.
EXAMPLES = int(os.environ.get("LLMSERVICE_FUZZ_EXAMPLES", "6"))
REPEATABLE = "LLMSERVICE_FUZZ_EXAMPLES" not in os.environ
CHAT_MODELS = ["light", "medium", "heavy", "gpt-3.5-turbo", "small"]  # heavy: the announced fallback to medium
TIERS = ["light", "medium", "heavy", "embedding", "reranker"]
# The `model` of each request schema; any other schema with a `model` (newer surfaces) gets every name.
MODELS = {
    "ChatCompletionRequest": CHAT_MODELS,
    "CompletionRequest": CHAT_MODELS,
    "EmbeddingRequest": ["embedding"],
    "TeiEmbedRequest": ["embedding"],
    "RerankRequest": ["reranker"],
}
MAX_TOKENS = {"type": "integer", "minimum": 1, "maximum": 8}
BUDGET_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "num_predict")
# Operations whose valid requests must be answered by a model at least once in positive mode.
REACH_MODELS = [
    "POST /v1/chat/completions",
    "POST /v1/completions",
    "POST /v1/embeddings",
    "POST /v1/rerank",
    "POST /embed",
    "POST /embed_sparse",
]
SHORT_LIST = 4  # items in any generated array: the fakes' cost grows with them, the coverage does not


class TolerantEmbedder(FakeEmbedder):
    """FakeEmbedder keys its sparse vector on a text's first character, so "" breaks the fake itself;
    real embedders take an empty text, and so does the server."""

    def embed(self, texts: Sequence[str], types: Sequence[str], truncate: bool) -> EmbeddingResult:
        return super().embed([text or " " for text in texts], types, truncate)


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for child in node.values():
            yield from _walk(child)
    elif isinstance(node, list):
        for child in node:
            yield from _walk(child)


def _shorten_arrays(node: Any) -> None:
    """Cap maxItems everywhere (MAX_MESSAGES, 65,536 token ids...): hypothesis would otherwise build huge bodies."""
    for schema in _walk(node):
        if schema.get("type") == "array":
            schema["maxItems"] = min(int(schema.get("maxItems", SHORT_LIST)), SHORT_LIST)
            schema["minItems"] = min(int(schema.get("minItems", 0)), SHORT_LIST)


def _cap_integers(node: Any, maximum: int) -> None:
    for schema in _walk(node):
        if schema.get("type") == "integer":
            schema["maximum"] = maximum


def narrowed(openapi: dict[str, Any]) -> dict[str, Any]:
    """The served schema with generation steered to the configured models and to requests they accept
    (which negative mode then mutates): names, small budgets, token ids every tokenizer has, one or more
    documents, text content parts, the fake embedder's 4 dimensions."""
    schema = copy.deepcopy(openapi)
    components = schema["components"]["schemas"]
    for name, component in components.items():
        properties = component.get("properties", {})
        if "model" in properties:
            properties["model"] = {"type": "string", "enum": MODELS.get(name, [*CHAT_MODELS, "embedding", "reranker"])}
        for field in BUDGET_FIELDS:
            if field in properties:
                properties[field] = _nullable(MAX_TOKENS)
        if name in MODELS and "dimensions" in properties:
            properties["dimensions"] = _nullable({"type": "integer", "minimum": 1, "maximum": FakeEmbedder.dimension})
    _cap_integers(components["CompletionRequest"]["properties"]["prompt"], 255)  # ids below 256: bytes in cl100k too
    _cap_integers(components["EmbeddingRequest"]["properties"]["input"], 255)
    rerank = components["RerankRequest"]
    rerank["properties"]["documents"] = {**rerank["properties"]["documents"]["anyOf"][0], "minItems": 1}
    rerank["required"] = [*rerank.get("required", []), "documents"]
    components["ContentPart"]["properties"]["type"] = {"type": "string", "enum": ["text", "input_text"]}
    for operation in (op for path in schema["paths"].values() for op in path.values()):
        for parameter in operation.get("parameters", []):
            if parameter["in"] == "path" and parameter["name"] in ("tier", "model_id"):
                parameter["schema"] = {"type": "string", "enum": TIERS}
    _shorten_arrays(schema)
    return schema


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, schemathesis.BaseSchema]]:
    """A live server over fakes with the disk cache on (so the key digest and disk run too), and its schema."""
    cache_dir = tmp_path_factory.mktemp("fuzz-cache")
    settings = load_settings({**ENV, "CACHE_PERSIST_TO_DISK": "true", "CACHE_DIR": str(cache_dir)})
    registry = Registry()
    registry.embedder = TolerantEmbedder()
    app = create_app(settings, factories=registry.factories())
    with LiveServer(app) as live:
        openapi = requests.get(f"{live.url}/openapi.json", timeout=60).json()
        yield live, schemathesis.openapi.from_dict(narrowed(openapi))


def _header(response: schemathesis.Response, name: str) -> str:
    values = {key.lower(): value for key, value in response.headers.items()}.get(name, [""])
    return values[0] if isinstance(values, list) else str(values)


def route_key(method: str, path: str) -> tuple[str, str]:
    """The same handler is mounted under several prefixes (server.py): one key for all of them."""
    for prefix, replacement in {"/api/v1/": "/", "/v1/": "/", "/api/admin/": "/admin/"}.items():
        if path.startswith(prefix):
            return method.upper(), replacement + path[len(prefix) :]
    return method.upper(), path


def speaks_ollama(path: str) -> bool:
    """Ollama's API owns "/api" except the replaced servers' "/api/v1" and "/api/admin" (server.py)."""
    return path.startswith("/api/") and not path.startswith(("/api/v1/", "/api/admin/"))


def problem_with(response: schemathesis.Response, path: str) -> str | None:
    """Why a response breaks the contract, or None: no 5xx; a 4xx carries the OpenAI error envelope
    (or, on Ollama's routes, Ollama's `{"error": "<message>"}`, which its clients expect)."""
    status = response.status_code
    text = response.content.decode("utf-8", "replace")
    if status >= 500:
        return f"status {status}: {text[:300]}"
    if status >= 400:
        try:
            error = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            return f"status {status} without the error envelope: {text[:300]}"
        if speaks_ollama(path) and isinstance(error, str) and error:
            return None
        if not (isinstance(error, dict) and isinstance(error.get("message"), str) and error["message"]):
            return f"status {status}: the envelope has no message: {text[:300]}"
        if not (isinstance(error.get("type"), str) and isinstance(error.get("code"), str) and "param" in error):
            return f"status {status}: the envelope lacks type, code or param: {text[:300]}"
        return None
    if _header(response, "content-type").startswith("text/event-stream"):
        for line in text.splitlines():
            if line.startswith("data: {") and '"error"' in line:
                event = json.loads(line.removeprefix("data: "))
                if isinstance(event.get("error"), dict) and event["error"].get("type") == "server_error":
                    return f"a stream ended with a server error: {line[:300]}"
    return None


def fuzz_operation(
    live: LiveServer,
    operation: schemathesis.APIOperation,
    mode: schemathesis.GenerationMode,
    session: requests.Session,
    statuses: list[int],
) -> None:
    """EXAMPLES generated requests to one operation; fails (after shrinking) on the first broken answer."""

    @hypothesis.settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=REPEATABLE,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
        phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate, hypothesis.Phase.shrink],
    )
    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=live.url, session=session, timeout=60)
        statuses.append(response.status_code)
        problem = problem_with(response, operation.path)
        assert problem is None, f"{problem}\nreproduce: {case.as_curl_command()}"

    run()


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_no_generated_request_gets_a_5xx_and_every_4xx_is_the_envelope(
    served: tuple[LiveServer, schemathesis.BaseSchema], mode: str
) -> None:
    live, schema = served
    generation_mode = schemathesis.GenerationMode(mode)
    failures: dict[str, str] = {}
    statuses: dict[str, list[int]] = {}
    seen: set[tuple[str, str]] = set()
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            if route_key(operation.method, operation.path) in seen:
                continue  # fuzzed under its first prefix ("/v1" comes first): the handler is the same
            seen.add(route_key(operation.method, operation.path))
            try:
                fuzz_operation(live, operation, generation_mode, session, statuses.setdefault(operation.label, []))
            except hypothesis.errors.Unsatisfiable:
                assert mode == "negative"  # nothing here can be made invalid: no body, any string is a valid id
            except AssertionError as exc:
                failures[operation.label] = str(exc)
    assert not failures, "\n\n".join(f"{label}: {why}" for label, why in failures.items())
    if mode == "positive":  # the narrowing works: requests reach the models
        for label in REACH_MODELS:
            assert any(200 <= code < 300 for code in statuses[label]), (label, statuses[label])
