"""Chat model loaders: a GGUF file goes to llama.cpp (chat/llama_engine.py), an MLX folder to
mlx-lm (chat/mlx_engine.py). Each is called on the model's owner thread (chat/scheduler.py) and
imports its heavy library only then.
"""

from __future__ import annotations

import os
from pathlib import Path

from config import Settings, TierConfig
from core.errors import ModelUnavailable
from core.model_paths import resolve_model_path
from core.protocols import ChatModel


def load_llamacpp_chat(tier: TierConfig, settings: Settings) -> ChatModel:
    from chat.llama_engine import LlamaCppChat

    path = resolve_model_path(tier.model_path)
    if not os.path.isfile(path):
        raise ModelUnavailable(f"The {tier.name} tier's model file does not exist")
    try:
        return LlamaCppChat(tier, path)
    except ValueError as exc:  # llama-cpp-python reports unreadable files as ValueError
        raise ModelUnavailable(f"The {tier.name} tier's model file could not be loaded: not a valid GGUF") from exc


def load_mlx_chat(tier: TierConfig, settings: Settings) -> ChatModel:
    from chat import mlx_vision
    from chat.mlx_engine import MlxChat

    path = resolve_model_path(tier.model_path)
    if not Path(path).is_dir():
        raise ModelUnavailable(f"The {tier.name} tier's model folder does not exist")
    if mlx_vision.is_vision_folder(path):  # a vision-language model: mlx-vlm, not mlx-lm
        return mlx_vision.MlxVisionChat(tier, path)
    return MlxChat(tier, path)
