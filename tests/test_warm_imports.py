"""No cold start for lazily loaded tiers: their libraries are imported in the background at start-up
(model_manager.py `preload`, `warm_modules`), and only for tiers that are configured."""

from __future__ import annotations

import sys
import threading
from collections.abc import Mapping
from pathlib import Path

import pytest

from config import load_settings
from manager.factories import default_factories
from model_manager import ModelManager
from tests.fakes import FakeRegistry


def manager(tmp_path: Path, env: Mapping[str, str], fakes: bool = False) -> ModelManager:
    settings = load_settings({"MODELS_DIR": str(tmp_path), "PERSIST_TIER_CHANGES": "false", **env})
    return ModelManager(settings, FakeRegistry().factories() if fakes else default_factories())


def test_the_libraries_of_lazy_local_tiers_are_warmed_in_tier_order(tmp_path: Path) -> None:
    # The defaults: Gemma (light), MiniLM (embedding), the similarity reranker over it, Whisper (speech).
    modules = ["llama_cpp", "chat.llama_engine", "sentence_transformers", "faster_whisper"]
    assert manager(tmp_path, {}).lazy_modules() == modules


@pytest.mark.parametrize(
    "env",
    [
        {"EMBEDDING_MODEL_PATH": "", "RERANKER_MODEL_PATH": ""},  # not configured: costs nothing
        {"EMBEDDING_PRELOAD": "true"},  # loaded at start-up anyway
        {"EMBEDDING_ISOLATION": "process"},  # imported by its worker process, not this one
    ],
    ids=["not-configured", "preloaded", "own-process"],
)
def test_nothing_is_warmed_for_a_tier_that_does_not_load_here_on_first_use(
    tmp_path: Path, env: Mapping[str, str]
) -> None:
    assert "sentence_transformers" not in manager(tmp_path, env).lazy_modules()


def test_loaders_of_tests_warm_nothing(tmp_path: Path) -> None:
    assert manager(tmp_path, {"LIGHT_MODEL_PATH": "/models/fake.gguf"}, fakes=True).lazy_modules() == []


def test_warm_imports_off_starts_no_thread(tmp_path: Path) -> None:
    manager(tmp_path, {"WARM_IMPORTS": "false"}).preload()
    assert not [t for t in threading.enumerate() if t.name == "warm-imports"]


@pytest.mark.real
def test_preload_imports_the_library_on_a_background_thread(tmp_path: Path) -> None:
    manager(tmp_path, {}).preload()
    warming = [t for t in threading.enumerate() if t.name == "warm-imports"]
    for thread in warming:  # none left when an earlier test already imported it and the thread is done
        thread.join(300)
        assert not thread.is_alive()
    assert "sentence_transformers" in sys.modules
