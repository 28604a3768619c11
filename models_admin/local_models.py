"""The models in MODELS_DIR: GGUF files and model folders, with their size, format and the backend that
would load them; removal of one, confined to MODELS_DIR.

A model's name is its path relative to MODELS_DIR, with "/" (a download of one GGUF out of a repo is
`owner--repo/file.gguf`). Hidden entries (huggingface_hub's `.cache/` metadata, our `.tier-overrides.json`)
and unfinished downloads are never listed. Everything here touches the disk: call it off the event loop.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from config import TierConfig
from core.errors import Conflict, InvalidRequest, NotFound

# Folder formats: (what gives it away, the kind of tier it serves, the backend that loads it).
_GGUF = ("gguf", "any", "llamacpp")


@dataclass(frozen=True)
class LocalModel:
    name: str  # relative to MODELS_DIR
    path: str  # absolute: what a tier's MODEL_PATH would say
    format: str  # gguf | bge_m3 | sentence_transformers | cross_encoder | transformers | ctranslate2
    kind: str  # the tiers it suits: any | chat | embedding | rerank | speech
    backend: str  # the backend that would load it (config.infer_backend's choice for that kind)
    size_bytes: int

    def as_json(self, used_by: list[str]) -> dict[str, object]:
        return {**asdict(self), "used_by": used_by}


def _hidden(path: Path) -> bool:
    return path.name.startswith(".") or path.name.endswith(".incomplete")


def _files(folder: Path) -> Iterable[Path]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # huggingface_hub's .cache/ is not the model
        for name in files:
            if not name.startswith(".") and not name.endswith(".incomplete"):
                yield Path(root) / name


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in _files(path) if p.is_file())


def folder_format(folder: Path) -> tuple[str, str, str] | None:
    """(format, kind, backend) of a model folder, or None when it holds no model we know."""
    has = lambda name: (folder / name).exists()  # noqa: E731
    if has("colbert_linear.pt") or has("sparse_linear.pt"):
        return ("bge_m3", "embedding", "bge_m3")
    if has("modules.json") or has("config_sentence_transformers.json"):
        return ("sentence_transformers", "embedding", "sentence_transformers")
    if has("model.bin") and has("vocabulary.json"):
        return ("ctranslate2", "speech", "faster_whisper")
    if has("config.json"):
        try:
            architectures = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("architectures")
        except (OSError, ValueError, AttributeError):
            architectures = None
        if any(str(a).endswith("ForSequenceClassification") for a in architectures or ()):
            return ("cross_encoder", "rerank", "cross_encoder")
        return ("transformers", "chat", "mlx")  # mlx-lm reads HF folders and MLX conversions
    return None


def list_models(models_dir: Path) -> list[LocalModel]:
    """Every model in MODELS_DIR: top-level GGUF files and model folders, and the GGUF files inside
    other folders (a repo downloaded with some of its quantisations)."""
    if not models_dir.is_dir():
        return []
    found: list[LocalModel] = []

    def add(path: Path, fmt: tuple[str, str, str]) -> None:
        name = path.relative_to(models_dir).as_posix()
        found.append(LocalModel(name, str(path.absolute()), *fmt, size_bytes=_size(path)))

    for entry in sorted(models_dir.iterdir()):
        if _hidden(entry):
            continue
        if entry.is_file() and entry.name.lower().endswith(".gguf"):
            add(entry, _GGUF)
        elif entry.is_dir():
            fmt = folder_format(entry)
            if fmt is not None:
                add(entry, fmt)
            for file in sorted(_files(entry)):
                if file.name.lower().endswith(".gguf"):
                    add(file, _GGUF)
    return found


def used_by(model: LocalModel, tiers: Mapping[str, TierConfig]) -> list[str]:
    """The tiers whose model is this one (or lies inside this folder)."""
    target = os.path.realpath(model.path)
    users = []
    for name, tier in tiers.items():
        if not tier.model_path or tier.model_path.startswith(("package:", "http://", "https://")):
            continue
        path = os.path.realpath(tier.model_path)
        if path == target or path.startswith(target + os.sep):
            users.append(name)
    return users


def confined(models_dir: Path, name: str) -> Path:
    """`name` as a path inside MODELS_DIR, or a 400: no absolute paths, no "..", no hidden parts, and no
    symlinked folder on the way out of MODELS_DIR."""
    parts = PurePosixPath(name).parts
    if not name or name.startswith("/") or "\\" in name or any(p in ("..", ".") or p.startswith(".") for p in parts):
        raise InvalidRequest(f"{name!r} is not the name of a model in MODELS_DIR", param="name")
    root = models_dir.resolve()
    target = models_dir.joinpath(*parts)
    parent = target.parent.resolve()
    if parent != root and root not in parent.parents:
        raise InvalidRequest(f"{name!r} is not the name of a model in MODELS_DIR", param="name")
    return target


def find(models_dir: Path, name: str) -> LocalModel:
    confined(models_dir, name)
    for model in list_models(models_dir):
        if model.name == name:
            return model
    raise NotFound(f"No model {name!r} in MODELS_DIR")


def remove(models_dir: Path, name: str, tiers: Mapping[str, TierConfig], busy: Iterable[Path] = ()) -> LocalModel:
    """Delete a listed model that no tier uses and no download is writing (`busy`: their folders)."""
    model = find(models_dir, name)
    users = used_by(model, tiers)
    if users:
        raise Conflict(f"The model {name!r} is in use by the {', '.join(users)} tier(s); swap or reset them first")
    target = confined(models_dir, name)
    for folder in busy:
        if folder.resolve() in (target.resolve(), *target.resolve().parents):
            raise Conflict(f"A download is writing into {name!r}; cancel it first")
    if target.is_symlink() or target.is_file():
        target.unlink()
        _forget_download(models_dir, name)
    else:
        shutil.rmtree(target)
    _drop_empty_repo_folder(models_dir, name)
    return model


def _forget_download(models_dir: Path, name: str) -> None:
    """A file from a repo download: drop huggingface_hub's metadata for it, so a later download starts clean."""
    top, *rest = PurePosixPath(name).parts
    if rest:
        meta = models_dir / top / ".cache" / "huggingface" / "download" / Path(*rest)
        meta.with_name(meta.name + ".metadata").unlink(missing_ok=True)


def _drop_empty_repo_folder(models_dir: Path, name: str) -> None:
    top = models_dir / PurePosixPath(name).parts[0]
    if top.is_dir() and not top.is_symlink() and not any(True for _ in _files(top)):
        shutil.rmtree(top)
