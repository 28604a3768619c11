"""Configuration: defaults, backend inference, precedence, and a table of bad values."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from config import ConfigError, Settings, TierConfig, infer_backend, load_settings, read_environment
from core.config_keys import PACKAGED_GEMMA, PACKAGED_MINILM, SERVER_KEYS, TIER_KEYS, TIERS, Key, TierKey

ENV_EXAMPLE = Path(__file__).resolve().parent.parent / ".env.example"


def test_embedded_defaults_configure_light_embedding_reranker_and_speech() -> None:
    settings = load_settings({})
    assert set(settings.tiers) == {"light", "embedding", "reranker", "speech"}
    assert settings.tiers["light"].model_path == PACKAGED_GEMMA
    assert settings.tiers["light"].backend == "llamacpp"
    assert settings.tiers["embedding"].model_path == PACKAGED_MINILM
    assert settings.tiers["embedding"].backend == "sentence_transformers"
    assert settings.tiers["reranker"].backend == "similarity"
    assert settings.host == "127.0.0.1" and settings.port == 8000


def test_tier_keys_are_read_with_types() -> None:
    settings = load_settings(
        {
            "MEDIUM_MODEL_PATH": "/m/qwen-7b.gguf",
            "MEDIUM_N_CTX": "2048",
            "MEDIUM_N_THREADS": "3",
            "MEDIUM_TEMPERATURE": "0.2",
            "MEDIUM_USE_MMAP": "false",
            "MEDIUM_ALIASES": "gpt-4, big ",
            "MEDIUM_TTL": "300",
            "MEDIUM_PARALLEL": "8",
        }
    )
    medium = settings.tiers["medium"]
    assert (medium.n_ctx, medium.n_threads, medium.temperature) == (2048, 3, 0.2)
    assert medium.use_mmap is False
    assert medium.aliases == ("gpt-4", "big")
    assert (medium.ttl, medium.parallel) == (300.0, 8)
    assert medium.model_id == "medium/qwen-7b"


@pytest.mark.parametrize(
    ("path", "tier", "expected"),
    [
        ("/m/model.gguf", "light", "llamacpp"),
        ("/m/MODEL.GGUF", "embedding", "llamacpp"),
        ("http://127.0.0.1:9000/v1", "heavy", "remote"),
        ("/m/some-mlx-folder", "medium", "mlx"),
        ("/m/st-folder", "embedding", "sentence_transformers"),
        ("/m/ce-folder", "reranker", "cross_encoder"),
    ],
)
def test_backend_is_inferred_from_the_path(path: str, tier: str, expected: str) -> None:
    assert infer_backend(tier, path) == expected


def test_bge_m3_folder_is_detected(tmp_path: Path) -> None:
    (tmp_path / "colbert_linear.pt").write_bytes(b"")
    assert infer_backend("embedding", str(tmp_path)) == "bge_m3"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LIGHT_N_CTX": "big"}, "LIGHT_N_CTX has value 'big': not an integer"),
        ({"LIGHT_N_CTX": "8"}, "LIGHT_N_CTX has value '8': must be >= 16"),
        ({"LIGHT_TEMPERATURE": "hot"}, "LIGHT_TEMPERATURE has value 'hot': not a number"),
        ({"LIGHT_TEMPERATURE": "3"}, "LIGHT_TEMPERATURE has value '3': must be <= 2.0"),
        ({"LIGHT_TOP_P": "nan"}, "LIGHT_TOP_P has value 'nan': not a number"),
        ({"LIGHT_USE_MMAP": "maybe"}, "LIGHT_USE_MMAP has value 'maybe': not a boolean"),
        ({"LIGHT_BACKEND": "tensorrt"}, "LIGHT_BACKEND has value 'tensorrt': not a light backend"),
        ({"EMBEDDING_BACKEND": "mlx"}, "EMBEDDING_BACKEND has value 'mlx': not a embedding backend"),
        ({"HEAVY_BACKEND": "llamacpp"}, "HEAVY_BACKEND is 'llamacpp' but HEAVY_MODEL_PATH is empty"),
        ({"PORT": "-1"}, "PORT has value '-1': must be >= 0"),
        ({"SHUTDOWN_TIMEOUT": "soon"}, "SHUTDOWN_TIMEOUT has value 'soon': not a number"),
        ({"LOG_LEVEL": "loud"}, "LOG_LEVEL has value 'loud'"),
        ({"LIGHT_ALIASES": "embedding"}, "LIGHT_ALIASES has value 'embedding': that is the name of a tier"),
        (
            {"MEDIUM_MODEL_PATH": "/m/x.gguf", "LIGHT_ALIASES": "gpt", "MEDIUM_ALIASES": "gpt"},
            "MEDIUM_ALIASES has value 'gpt': already an alias of tier 'light'",
        ),
        ({"EMBEDDING_MODEL_PATH": ""}, "RERANKER_BACKEND is 'similarity' but the embedding tier is off"),
        ({"LIGHT_PARALLEL": "0"}, "LIGHT_PARALLEL has value '0': must be >= 1"),
    ],
)
def test_bad_values_name_the_variable_and_the_value(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert message in str(caught.value)


def test_empty_model_path_turns_a_tier_off() -> None:
    settings = load_settings({"LIGHT_MODEL_PATH": "", "MEDIUM_MODEL_PATH": "/m/a.gguf", "RERANKER_MODEL_PATH": ""})
    assert "light" not in settings.tiers and "reranker" not in settings.tiers
    assert "medium" in settings.tiers


def test_real_environment_overrides_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("LIGHT_N_CTX=1024\nLIGHT_TOP_K=7\n# a comment\n")
    monkeypatch.setenv("LIGHT_N_CTX", "2048")
    settings = load_settings(read_environment(dotenv))
    assert settings.tiers["light"].n_ctx == 2048
    assert settings.tiers["light"].top_k == 7


# ---------------------------------------------------------------- the table of keys

KIND_TYPES: dict[str, object] = {
    "str": str,
    "lower": str,
    "path": str,
    "int": int,
    "opt_int": int | None,
    "float": float,
    "bool": bool,
    "list": tuple[str, ...],
}


@pytest.mark.parametrize(
    ("cls", "keys", "outside"), [(Settings, SERVER_KEYS, {"tiers"}), (TierConfig, TIER_KEYS, {"name"})]
)
def test_every_field_is_read_from_the_table_with_its_type(
    cls: type[object], keys: tuple[Key, ...], outside: set[str]
) -> None:
    names = [f.name for f in dataclasses.fields(cls) if f.name not in outside]
    assert [key.name for key in keys] == names, "the table lists the dataclass fields once, in field order"
    hints = typing.get_type_hints(cls)
    for key in keys:
        assert hints[key.name] == KIND_TYPES[key.kind], key.name


def test_unset_keys_take_the_table_default_of_their_tier() -> None:
    settings = load_settings({})  # light (chat), embedding and reranker
    for tier in settings.tiers.values():
        for key in TIER_KEYS:
            if key.name != "backend":  # inferred from the path
                assert getattr(tier, key.name) == key.default_for(tier.name), (tier.name, key.name)
    for key in SERVER_KEYS:
        assert getattr(settings, key.name) == key.default, key.name
    embedding, light = settings.tiers["embedding"], settings.tiers["light"]
    assert (embedding.n_ctx, embedding.embedding_mode, light.n_ctx, light.embedding_mode) == (512, True, 4096, False)


BOUNDED = [
    (key, bound)
    for key in (*SERVER_KEYS, *TIER_KEYS)
    for bound in ("minimum", "maximum")
    if getattr(key, bound) is not None
]


@pytest.mark.parametrize(("key", "bound"), BOUNDED, ids=[f"{key.env}-{bound}" for key, bound in BOUNDED])
def test_values_beyond_a_bound_are_refused_with_the_variable_name(key: Key, bound: str) -> None:
    limit = getattr(key, bound)
    step = 1 if key.kind in ("int", "opt_int") else 0.5
    raw = str(limit - step if bound == "minimum" else limit + step)
    name = key.env_name("light") if isinstance(key, TierKey) else key.env
    with pytest.raises(ConfigError, match=re.escape(f"{name} has value {raw!r}: must be")):
        load_settings({name: raw})


def test_timeouts_accept_fractions_of_a_second() -> None:
    settings = load_settings({"SHUTDOWN_TIMEOUT": "0.5", "DRAIN_TIMEOUT": "0.25", "LIGHT_TTL": "1.5"})
    assert (settings.shutdown_timeout, settings.drain_timeout, settings.tiers["light"].ttl) == (0.5, 0.25, 1.5)


def documented_keys() -> set[str]:
    """Names set in .env.example, commented out or not (`KEY=...` or `# KEY=...`)."""
    found = re.findall(r"^#?[ \t]*([A-Z][A-Z0-9_]*)=", ENV_EXAMPLE.read_text(), flags=re.MULTILINE)
    return set(found)


def test_env_example_documents_exactly_the_table() -> None:
    # Server keys appear as themselves; a tier key appears once, under any one tier's prefix.
    documented = documented_keys()
    prefixes = tuple(f"{tier.upper()}_" for tier in TIERS)
    server = {name for name in documented if not name.startswith(prefixes)}
    tier_suffixes = {name.split("_", 1)[1] for name in documented if name.startswith(prefixes)}
    assert server == {key.env for key in SERVER_KEYS}
    assert tier_suffixes == {key.env for key in TIER_KEYS}
