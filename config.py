"""Settings: one pure function turns an environment mapping into frozen dataclasses.

`load_settings(env)` never reads `os.environ` itself; `main()` merges the real environment over `.env`
and passes the result in, so tests build settings from plain dicts. Every key is written once, in
`SERVER_KEYS` or `TIER_KEYS` of core/config_keys.py (name, type, default, bounds, meaning, response-cache
flag); the dataclasses' defaults and `load_settings` both come from there.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.config_keys import (
    BACKEND_ALIASES,
    CHAT_BACKENDS,
    CHAT_TIERS,
    COMPUTE_TYPES,
    EMBEDDING_BACKENDS,
    ISOLATIONS,
    KIND_OF_TIER,
    LB_POLICIES,
    PACKAGED_GEMMA,
    PACKAGED_MINILM,
    PACKAGED_WHISPER,
    RERANKER_BACKENDS,
    SERVER_KEYS,
    SPEECH_BACKENDS,
    TIER_KEYS,
    TIERS,
    Key,
    Kind,
    Value,
)


class ConfigError(ValueError):
    """A bad configuration value; the message names the variable and the value."""


def _tier_default(name: str) -> Any:
    """A chat tier's default from the table, so the dataclass does not write it a second time."""
    return next(key.default for key in TIER_KEYS if key.name == name)


def _server_default(name: str) -> Any:
    return next(key.default for key in SERVER_KEYS if key.name == name)


@dataclass(frozen=True)
class TierConfig:
    name: str
    model_path: str
    backend: str
    n_ctx: int = _tier_default("n_ctx")
    n_batch: int = _tier_default("n_batch")
    n_threads: int | None = _tier_default("n_threads")
    n_gpu_layers: int = _tier_default("n_gpu_layers")
    temperature: float = _tier_default("temperature")
    top_p: float = _tier_default("top_p")
    top_k: int = _tier_default("top_k")
    max_tokens: int = _tier_default("max_tokens")
    repeat_penalty: float = _tier_default("repeat_penalty")
    use_mmap: bool = _tier_default("use_mmap")
    use_mlock: bool = _tier_default("use_mlock")
    embedding_mode: bool = _tier_default("embedding_mode")
    embedding_dimension: int | None = _tier_default("embedding_dimension")
    aliases: tuple[str, ...] = _tier_default("aliases")
    patterns: tuple[str, ...] = _tier_default("patterns")
    ttl: float = _tier_default("ttl")
    parallel: int = _tier_default("parallel")
    prefix_reuse: bool = _tier_default("prefix_reuse")
    speculative: str = _tier_default("speculative")
    draft_max: int = _tier_default("draft_max")
    max_queue: int = _tier_default("max_queue")
    queue_timeout: float = _tier_default("queue_timeout")
    request_timeout: float = _tier_default("request_timeout")
    preload: bool = _tier_default("preload")
    pin: bool = _tier_default("pin")
    priority: int = _tier_default("priority")
    base_url: str = _tier_default("base_url")
    api_key: str = _tier_default("api_key")
    upstreams: tuple[str, ...] = _tier_default("upstreams")
    spillover_upstreams: tuple[str, ...] = _tier_default("spillover_upstreams")
    spillover_after_ms: float = _tier_default("spillover_after_ms")
    upstream_model: str = _tier_default("upstream_model")
    upstream_api: str = _tier_default("upstream_api")
    lb_policy: str = _tier_default("lb_policy")
    retries: int = _tier_default("retries")
    first_byte_timeout: float = _tier_default("first_byte_timeout")
    stream_idle_timeout: float = _tier_default("stream_idle_timeout")
    breaker_failures: int = _tier_default("breaker_failures")
    breaker_cooldown: float = _tier_default("breaker_cooldown")
    upstream_max_in_flight: int = _tier_default("upstream_max_in_flight")
    upstream_health_interval: float = _tier_default("upstream_health_interval")
    upstream_health_path: str = _tier_default("upstream_health_path")
    chat_format: str = _tier_default("chat_format")
    chat_template: str = _tier_default("chat_template")
    mmproj: str = _tier_default("mmproj")
    max_documents: int = _tier_default("max_documents")
    batch_wait_ms: float = _tier_default("batch_wait_ms")
    max_batch: int = _tier_default("max_batch")
    isolation: str = _tier_default("isolation")
    beam_size: int = _tier_default("beam_size")
    compute_type: str = _tier_default("compute_type")
    max_audio_seconds: float = _tier_default("max_audio_seconds")

    @property
    def kind(self) -> str:
        """'chat', 'embedding', 'rerank' or 'speech': what the tier serves."""
        return "chat" if self.name in CHAT_TIERS else KIND_OF_TIER[self.name]

    @property
    def model_name(self) -> str:
        """Short display name of the model, used in `tier/name` ids."""
        if self.model_path == PACKAGED_GEMMA:
            return "gemma-3-270m-q4_k_m"
        if self.model_path == PACKAGED_MINILM:
            return "all-MiniLM-L6-v2"
        if self.model_path == PACKAGED_WHISPER:
            return "whisper-base"
        if self.backend == "similarity" and not self.model_path:
            return "similarity"
        if self.backend == "remote":  # the URL's last segment ("v1") names nothing
            return self.upstream_model or "remote"
        name = Path(self.model_path.rstrip("/")).name
        return name.removesuffix(".gguf") or self.name

    @property
    def model_id(self) -> str:
        return f"{self.name}/{self.model_name}"

    @property
    def upstream_urls(self) -> tuple[str, ...]:
        """A remote tier's pool: `upstreams`, then `base_url`, then an http(s) `model_path`, each once."""
        urls = (*self.upstreams, self.base_url, self.model_path)
        return tuple(dict.fromkeys(u.rstrip("/") for u in urls if u.startswith(("http://", "https://"))))


@dataclass(frozen=True)
class Settings:
    tiers: Mapping[str, TierConfig] = field(default_factory=dict)
    host: str = _server_default("host")
    port: int = _server_default("port")
    log_level: str = _server_default("log_level")
    shutdown_timeout: float = _server_default("shutdown_timeout")
    drain_timeout: float = _server_default("drain_timeout")
    enable_cache: bool = _server_default("enable_cache")
    cache_max_size: int = _server_default("cache_max_size")
    cache_ttl_seconds: float = _server_default("cache_ttl_seconds")
    cache_persist_to_disk: bool = _server_default("cache_persist_to_disk")
    cache_dir: str = _server_default("cache_dir")
    api_keys: tuple[str, ...] = _server_default("api_keys")
    api_keys_file: str = _server_default("api_keys_file")
    ssl_certfile: str = _server_default("ssl_certfile")
    ssl_keyfile: str = _server_default("ssl_keyfile")
    cors_origins: tuple[str, ...] = _server_default("cors_origins")
    allowed_hosts: tuple[str, ...] = _server_default("allowed_hosts")
    max_memory_gb: float = _server_default("max_memory_gb")
    max_loaded_chat_tiers: int = _server_default("max_loaded_chat_tiers")
    warm_imports: bool = _server_default("warm_imports")
    quick_start_embeddings: bool = _server_default("quick_start_embeddings")
    models_dir: str = _server_default("models_dir")
    persist_tier_changes: bool = _server_default("persist_tier_changes")
    hf_endpoint: str = _server_default("hf_endpoint")
    hf_token: str = _server_default("hf_token")
    strict_tiers: bool = _server_default("strict_tiers")
    port_file: str = _server_default("port_file")
    max_body_bytes: int = _server_default("max_body_bytes")
    max_audio_bytes: int = _server_default("max_audio_bytes")
    image_url_hosts: tuple[str, ...] = _server_default("image_url_hosts")
    max_images: int = _server_default("max_images")
    max_image_bytes: int = _server_default("max_image_bytes")
    max_image_pixels: int = _server_default("max_image_pixels")
    image_fetch_timeout: float = _server_default("image_fetch_timeout")
    header_timeout: float = _server_default("header_timeout")
    sessions_ttl_seconds: float = _server_default("sessions_ttl_seconds")
    sessions_max: int = _server_default("sessions_max")
    sessions_max_messages: int = _server_default("sessions_max_messages")
    sessions_max_bytes: int = _server_default("sessions_max_bytes")
    sessions_purge_seconds: float = _server_default("sessions_purge_seconds")
    sessions_turn_wait_seconds: float = _server_default("sessions_turn_wait_seconds")
    cache_redis_url: str = _server_default("cache_redis_url")
    rate_limit_redis_url: str = _server_default("rate_limit_redis_url")
    sessions_redis_url: str = _server_default("sessions_redis_url")
    redis_prefix: str = _server_default("redis_prefix")
    redis_timeout_ms: float = _server_default("redis_timeout_ms")
    redis_cooldown_seconds: float = _server_default("redis_cooldown_seconds")
    sessions_redis_timeout_ms: float = _server_default("sessions_redis_timeout_ms")

    @property
    def keys_configured(self) -> bool:
        """Requests need a key: anonymous ones (API_KEYS), named ones (API_KEYS_FILE) or both."""
        return bool(self.api_keys or self.api_keys_file)


# ---------------------------------------------------------------- reading the table


def _bounded(name: str, raw: str, value: float, key: Key) -> None:
    if key.minimum is not None and value < key.minimum:
        raise ConfigError(f"{name} has value {raw!r}: must be >= {key.minimum}")
    if key.maximum is not None and value > key.maximum:
        raise ConfigError(f"{name} has value {raw!r}: must be <= {key.maximum}")


def _parse_int(key: Key, name: str, raw: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} has value {raw!r}: not an integer") from None
    _bounded(name, raw, value, key)
    return value


def _parse_float(key: Key, name: str, raw: str) -> float:
    try:
        value = float(raw.strip())
    except ValueError:
        raise ConfigError(f"{name} has value {raw!r}: not a number") from None
    if value != value:  # NaN
        raise ConfigError(f"{name} has value {raw!r}: not a number")
    _bounded(name, raw, value, key)
    return value


def _parse_bool(key: Key, name: str, raw: str) -> bool:
    text = raw.strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"{name} has value {raw!r}: not a boolean (use true or false)")


def _parse_list(key: Key, name: str, raw: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in raw.split(",") if part.strip())


_PARSERS: dict[Kind, Callable[[Key, str, str], Value]] = {
    "str": lambda key, name, raw: raw.strip(),
    "lower": lambda key, name, raw: raw.strip().lower(),
    "path": lambda key, name, raw: os.path.expanduser(raw.strip()),
    "int": _parse_int,
    "opt_int": _parse_int,
    "float": _parse_float,
    "bool": _parse_bool,
    "list": _parse_list,
}
_TEXT_KINDS = frozenset({"str", "lower", "path"})


def _read(key: Key, name: str, env: Mapping[str, str], tier: str | None = None) -> Value:
    """`key` from the variable `name`; unset (or blank, except for text) means the default."""
    raw = env.get(name)
    if raw is None or (not raw.strip() and (key.blank_is_default or key.kind not in _TEXT_KINDS)):
        return key.default_for(tier)
    return _PARSERS[key.kind](key, name, raw)


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
    if tier == "speech":  # a CTranslate2 conversion has model.bin; an MLX one weights.npz or .safetensors
        mlx = (folder / "weights.npz").exists() or (folder / "weights.safetensors").exists()
        return "mlx_whisper" if mlx and not (folder / "model.bin").exists() else "faster_whisper"
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
    return {"embedding": EMBEDDING_BACKENDS, "reranker": RERANKER_BACKENDS, "speech": SPEECH_BACKENDS}[tier]


_TIER_KEY = {key.name: key for key in TIER_KEYS}


def _tier_config(tier: str, env: Mapping[str, str]) -> TierConfig | None:
    path_key = _TIER_KEY["model_path"].env_name(tier)
    backend_key = _TIER_KEY["backend"].env_name(tier)
    path = str(_read(_TIER_KEY["model_path"], path_key, env, tier))
    raw_backend = str(_read(_TIER_KEY["backend"], backend_key, env, tier))
    backend = BACKEND_ALIASES.get(raw_backend, raw_backend)
    pooled = any(env.get(_TIER_KEY[name].env_name(tier), "").strip() for name in ("upstreams", "base_url"))
    if pooled and backend in ("", "remote") and (path_key not in env or not path):
        path, backend = "", "remote"  # a pool and no model of its own: remote, whatever the embedded default
    if not path and backend != "remote":
        # The reranker's default is similarity over the embedding tier; it needs no model path.
        similarity_ok = tier == "reranker" and (backend == "similarity" or (not backend and path_key not in env))
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
    read_above = ("model_path", "backend")
    values = {key.name: _read(key, key.env_name(tier), env, tier) for key in TIER_KEYS if key.name not in read_above}
    config = TierConfig(name=tier, model_path=path, backend=backend, **values)
    _check_embedding_mode(config, env)
    _check_upstreams(config)
    _check_isolation(config)
    if config.speculative not in ("off", "ngram"):
        raise ConfigError(f"{config.name.upper()}_SPECULATIVE has value {config.speculative!r}: use off or ngram")
    if config.compute_type not in COMPUTE_TYPES:
        raise ConfigError(
            f"{tier.upper()}_COMPUTE_TYPE has value {config.compute_type!r}: use {', '.join(COMPUTE_TYPES)}"
        )
    return config


def _check_embedding_mode(config: TierConfig, env: Mapping[str, str]) -> None:
    """The original service's {TIER}_EMBEDDING_MODE loaded a GGUF as an embedding model. Here the embedding
    tier always does that and no other tier embeds, so any other value is refused rather than ignored."""
    if config.embedding_mode == (config.name == "embedding"):
        return
    name = _TIER_KEY["embedding_mode"].env_name(config.name)
    raw = env.get(name, "")
    if config.name == "embedding":
        raise ConfigError(f"{name} has value {raw!r}: the embedding tier always loads its model for embeddings")
    raise ConfigError(
        f"{name} has value {raw!r}: a {config.kind} tier does not also answer /v1/embeddings; to embed with "
        "this model, set EMBEDDING_MODEL_PATH to it (a GGUF is then loaded in llama.cpp's embedding mode)"
    )


def _check_upstreams(config: TierConfig) -> None:
    """A remote tier has a pool of http(s) URLs; a local tier has none."""
    prefix = config.name.upper()
    urls = {
        f"{prefix}_UPSTREAMS": config.upstreams,
        f"{prefix}_BASE_URL": (config.base_url,) if config.base_url else (),
    }
    for name, values in urls.items():
        for url in values:
            if not url.startswith(("http://", "https://")):
                raise ConfigError(f"{name} has value {url!r}: an upstream is an http(s):// URL")
            _check_weight(name, url)
            if config.backend != "remote":
                raise ConfigError(
                    f"{name} has value {url!r} but the {config.name} tier's backend is {config.backend!r} "
                    f"(set {prefix}_BACKEND=remote, or clear {prefix}_MODEL_PATH)"
                )
    for url in config.spillover_upstreams:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"{prefix}_SPILLOVER_UPSTREAMS has value {url!r}: an upstream is an http(s):// URL")
        _check_weight(f"{prefix}_SPILLOVER_UPSTREAMS", url)
        if config.kind != "chat" or config.backend == "remote":
            raise ConfigError(
                f"{prefix}_SPILLOVER_UPSTREAMS has value {url!r}: spill-over is for local chat tiers "
                f"(the {config.name} tier is {config.kind}, backend {config.backend!r})"
            )
    if config.backend == "remote" and not config.upstream_urls:
        raise ConfigError(
            f"{prefix}_BACKEND is 'remote' but no upstream is set "
            f"(set {prefix}_UPSTREAMS, {prefix}_BASE_URL or an http(s):// {prefix}_MODEL_PATH)"
        )
    if config.lb_policy not in LB_POLICIES:
        raise ConfigError(f"{prefix}_LB_POLICY has value {config.lb_policy!r}: use {', '.join(LB_POLICIES)}")
    if config.upstream_api not in ("openai", "tei"):
        raise ConfigError(f"{prefix}_UPSTREAM_API has value {config.upstream_api!r}: use openai or tei")


def _check_weight(name: str, entry: str) -> None:
    """An upstream's optional weight: `http://gpu1:8000/v1|2` (a positive number after the last `|`)."""
    _, bar, weight = entry.rpartition("|")
    if not bar:
        return
    try:
        value = float(weight)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise ConfigError(f"{name} has value {entry!r}: the weight after '|' must be a positive number")


def _check_isolation(config: TierConfig) -> None:
    """Process isolation runs the models of local chat, embedding and rerank tiers (a remote tier has none)."""
    name = f"{config.name.upper()}_ISOLATION"
    if config.isolation not in ISOLATIONS:
        raise ConfigError(f"{name} has value {config.isolation!r}: use thread or process")
    if config.isolation == "process" and config.kind not in ("chat", "embedding", "rerank"):
        raise ConfigError(f"{name} has value 'process': only chat, embedding and rerank tiers run in a process")


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


def _check_cors_origins(origins: tuple[str, ...]) -> None:
    """Each origin is "*" or scheme://host[:port], compared exactly (so no path, no trailing slash)."""
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
            raise ConfigError(
                f"CORS_ORIGINS has value {origin!r}: an origin is scheme://host[:port] (e.g. http://localhost:3000)"
            )


def _check_tls(certfile: str, keyfile: str) -> None:
    """Both files or neither; each must be a readable file (uvicorn would fail later, less clearly)."""
    if bool(certfile) != bool(keyfile):
        set_name, unset = ("SSL_CERTFILE", "SSL_KEYFILE") if certfile else ("SSL_KEYFILE", "SSL_CERTFILE")
        raise ConfigError(f"{set_name} is set but {unset} is empty: TLS needs both")
    for name, path in (("SSL_CERTFILE", certfile), ("SSL_KEYFILE", keyfile)):
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"{name} has value {path!r}: not a readable file")


def _check_redis(values: Mapping[str, Any]) -> None:
    """Redis URLs redis-py can open; a prefix that is no glob pattern (clearing the cache scans
    `{prefix}:cache:*`, so a `*` in the prefix would reach other keys). Passwords stay out of errors."""
    for name in ("cache_redis_url", "rate_limit_redis_url", "sessions_redis_url"):
        url = values[name]
        if url and not re.fullmatch(r"(rediss?|unix)://\S+", url):
            shown = re.sub(r"//[^@/]*@", "//***@", url)
            raise ConfigError(
                f"{name.upper()} has value {shown!r}: use redis://host:6379/0, rediss://... or unix://..."
            )
    prefix = values["redis_prefix"]
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}", prefix):
        raise ConfigError(f"REDIS_PREFIX has value {prefix!r}: letters, digits, '_', '.', ':' and '-' only")


_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _tiers(env: Mapping[str, str]) -> dict[str, TierConfig]:
    tiers: dict[str, TierConfig] = {}
    for tier in TIERS:
        config = _tier_config(tier, env)
        if config is not None:
            tiers[tier] = config
    _check_names(tiers)
    reranker = tiers.get("reranker")
    if reranker is not None and reranker.backend == "similarity" and "embedding" not in tiers:
        raise ConfigError(
            "RERANKER_BACKEND is 'similarity' but the embedding tier is off (EMBEDDING_MODEL_PATH is empty)"
        )
    return tiers


def load_settings(env: Mapping[str, str]) -> Settings:
    """Build `Settings` from an environment mapping; raise `ConfigError` on the first bad value."""
    tiers = _tiers(env)
    values: dict[str, Any] = {key.name: _read(key, key.env, env) for key in SERVER_KEYS}
    if values["log_level"] not in _LOG_LEVELS:
        raise ConfigError(f"LOG_LEVEL has value {values['log_level']!r}: use debug, info, warning, error or critical")
    host = values["host"]
    if not values["api_keys"] and not values["api_keys_file"] and not _is_loopback(host):
        raise ConfigError(
            f"HOST has value {host!r}: listening beyond this machine needs API_KEYS or API_KEYS_FILE "
            "(set API_KEYS=<key>[,<key>...], or HOST=127.0.0.1)"
        )
    _check_cors_origins(values["cors_origins"])
    _check_tls(values["ssl_certfile"], values["ssl_keyfile"])
    _check_redis(values)
    return Settings(tiers=tiers, **values)


# ---------------------------------------------------------------- tier changes at run time (admin API)


def render_value(value: Value) -> str:
    """A value as the text of its variable (what `_PARSERS` reads back)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return ",".join(str(item) for item in value)
    return str(value)


def tier_env(config: TierConfig) -> dict[str, str]:
    """Variables that rebuild `config`: every key of the table, under the tier's prefix."""
    return {key.env_name(config.name): render_value(getattr(config, key.name)) for key in TIER_KEYS}


def apply_overrides(settings: Settings, overrides: Mapping[str, Mapping[str, str]]) -> Settings:
    """`settings` with some tiers' keys changed at run time, checked exactly as at start-up.

    `overrides` maps a tier to {key name: text}, names from `TIER_KEYS` ("model_path", "n_ctx", ...). A tier
    the settings leave off starts from its defaults; a new model_path without a backend infers the backend
    again; model_path "" turns the tier off. Errors name the variable, as at start-up."""
    env: dict[str, str] = {}
    for tier in TIERS:
        current = settings.tiers.get(tier)
        base = tier_env(current) if current is not None else {_TIER_KEY["model_path"].env_name(tier): ""}
        changes = overrides.get(tier, {})
        unknown = sorted(set(changes) - set(_TIER_KEY))
        if unknown:
            raise ConfigError(f"the {tier} tier has no setting {unknown[0]!r}")
        if "model_path" in changes and "backend" not in changes:
            base.pop(_TIER_KEY["backend"].env_name(tier), None)
        env.update(base)
        env.update({_TIER_KEY[name].env_name(tier): text for name, text in changes.items()})
    return dataclasses.replace(settings, tiers=_tiers(env))


def read_environment(dotenv_path: str | os.PathLike[str] = ".env") -> dict[str, str]:
    """The real environment over `.env` (real environment wins)."""
    from dotenv import dotenv_values

    merged: dict[str, str] = {}
    if Path(dotenv_path).is_file():
        merged.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
    merged.update(os.environ)
    return merged
