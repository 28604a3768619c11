"""Model factories a Ray Serve replica can import by name (`tests.ray_fakes:factories`): each replica
builds its own fakes, as each real replica loads its own models."""

from __future__ import annotations

from typing import Any

from config import Settings, TierConfig
from tests.fakes import FakeEmbedder, FakeRegistry


def factories() -> dict[str, Any]:
    embedder = FakeEmbedder()

    def load_embedder(tier: TierConfig, settings: Settings) -> FakeEmbedder:
        return embedder

    return {**FakeRegistry().factories(), "embedding:sentence_transformers": load_embedder}
