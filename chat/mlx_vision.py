"""MLX vision models (mlx-vlm): which model folders read images."""

from __future__ import annotations

import json
from pathlib import Path


def is_vision_folder(path: str) -> bool:
    """A model folder whose config has a vision tower (what mlx-vlm loads), read without loading anything."""
    try:
        config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and isinstance(config.get("vision_config"), dict)
