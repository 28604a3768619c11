"""Tier settings changed at run time through the admin API, kept across restarts.

One small JSON file, `MODELS_DIR/.tier-overrides.json`: {"version": 1, "tiers": {tier: {key: text}}}, key
names from config's `TIER_KEYS` and values as the text their variables would hold, so they are read back
through the same parsing and checks as `.env` (`config.apply_overrides`). It sits beside the models it
names, and it is written whole and atomically (a temporary file, then a rename), so a crash leaves either
the old or the new version. JSON rather than SQLite: a handful of rows, read once at start-up and written
on each swap, and an operator can read or fix it by hand.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from config import ConfigError, Settings

log = logging.getLogger("llmservice.models")

Overrides = dict[str, dict[str, str]]  # tier -> {TIER_KEYS name: text}
FILE_NAME = ".tier-overrides.json"
_VERSION = 1


class OverrideStore:
    """Where admin changes to tiers are kept: a JSON file, or nowhere (`path` None: memory only)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    @classmethod
    def for_settings(cls, settings: Settings) -> OverrideStore:
        return cls(Path(settings.models_dir) / FILE_NAME if settings.persist_tier_changes else None)

    def load(self) -> Overrides:
        """The stored changes; none when there is no file. A file we cannot use stops the start-up,
        as a bad `.env` value does: serving other models than the operator chose would be worse."""
        if self.path is None or not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{self.path}: not readable JSON ({exc}); fix or delete the file") from None
        tiers = data.get("tiers") if isinstance(data, dict) else None
        if not isinstance(tiers, dict) or not all(
            isinstance(values, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in values.items())
            for values in tiers.values()
        ):
            raise ConfigError(f'{self.path}: expected {{"tiers": {{tier: {{key: text}}}}}}; fix or delete the file')
        return {str(tier): dict(values) for tier, values in tiers.items()}

    def save(self, overrides: Mapping[str, Mapping[str, str]]) -> None:
        """Write the whole set (blocking: call it off the event loop)."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        body = {"version": _VERSION, "tiers": {tier: dict(values) for tier, values in overrides.items()}}
        staging.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(staging, self.path)
        log.info("tier changes saved to %s", self.path)
