"""API keys with names: who is calling, which tiers it may use, its limits, whether it is an admin.

Two sources. `API_KEYS` holds anonymous keys, as before: every tier, no limits, admin routes allowed.
`API_KEYS_FILE` is a TOML file with one table per calling service:

    [[keys]]
    name = "n8n"                  # in metrics and the access log (never the secret)
    key_sha256 = "9f86d0..."      # or key = "sk-..." (the secret itself)
    tiers = ["light", "embedding"]  # optional: the tiers it may use (default: all)
    rpm = 60                      # optional limits, 0 or absent = none: requests per minute,
    tpm = 100000                  # tokens per minute (prompt + completion),
    max_parallel = 4              # requests at once
    admin = false                 # true: /admin/..., /api/admin/... and /metrics
    priority = "normal"           # optional: its requests' default priority and the highest they may
                                  # ask for (absent: default normal, any may be asked; core/priority.py)

The file must not be readable by other users (it is refused at start-up, and a reload is skipped).
It is read again when it changes (its mtime, size and inode are checked on each request: one stat)
or after SIGHUP; a reload that fails keeps the keys already loaded and logs why.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import signal
import stat
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType

from config import TIERS, ConfigError

log = logging.getLogger("llmservice.keys")
ANONYMOUS = "anonymous"  # the name of every API_KEYS key
SCOPE_KEY = "llmservice.api_key"  # the ApiKey of a request, set in the ASGI scope by BearerAuth
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # safe in metric labels and log lines
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_FIELDS = frozenset({"name", "key", "key_sha256", "tiers", "rpm", "tpm", "max_parallel", "admin", "priority"})
_LIMITS = ("rpm", "tpm", "max_parallel")
_PRIORITIES = ("high", "normal", "low")


@dataclass(frozen=True)
class ApiKey:
    name: str
    digest: bytes = field(repr=False)  # SHA-256 of the secret
    tiers: frozenset[str] | None = None  # None: every tier
    rpm: int = 0  # 0 = no limit (also for tpm and max_parallel)
    tpm: int = 0
    max_parallel: int = 0
    admin: bool = False
    priority: str | None = None  # "high", "normal" or "low": the default and the ceiling; None: neither

    @property
    def limited(self) -> bool:
        return bool(self.rpm or self.tpm or self.max_parallel)

    def allows(self, tier: str) -> bool:
        return self.tiers is None or tier in self.tiers


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def anonymous_keys(secrets: Sequence[str]) -> tuple[ApiKey, ...]:
    return tuple(ApiKey(ANONYMOUS, digest(secret), admin=True) for secret in secrets)


# ---------------------------------------------------------------- the file


def _private_file(path: str) -> bytes:
    """The file's bytes; refused when other users may read or write it (checked on the open file)."""
    try:
        with open(path, "rb") as handle:
            mode = os.fstat(handle.fileno()).st_mode
            if mode & (stat.S_IROTH | stat.S_IWOTH):
                raise ConfigError(
                    f"API_KEYS_FILE has value {path!r}: the file is readable or writable by other users "
                    f"(mode {stat.S_IMODE(mode):04o}); run chmod 600 on it"
                )
            return handle.read()
    except OSError as exc:
        raise ConfigError(f"API_KEYS_FILE has value {path!r}: cannot read it ({exc.strerror})") from None


def read_keys_file(path: str) -> tuple[ApiKey, ...]:
    """Every entry of the key file, checked; a `ConfigError` names the file, the entry and the field."""
    try:
        document = tomllib.loads(_private_file(path).decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"API_KEYS_FILE {path!r}: not valid TOML ({exc})") from None
    extra = set(document) - {"keys"}
    if extra:
        raise ConfigError(f"API_KEYS_FILE {path!r}: unknown top-level entries {sorted(extra)} (use [[keys]] tables)")
    entries = document.get("keys", [])
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise ConfigError(f"API_KEYS_FILE {path!r}: 'keys' must be an array of tables ([[keys]])")
    keys = tuple(_entry(path, index, entry) for index, entry in enumerate(entries))
    _unique(path, keys)
    return keys


def _entry(path: str, index: int, entry: Mapping[str, object]) -> ApiKey:
    where = f"API_KEYS_FILE {path!r}: keys[{index}]"

    def fail(message: str) -> ConfigError:
        return ConfigError(f"{where}: {message}")

    unknown = set(entry) - _FIELDS
    if unknown:
        raise fail(f"unknown fields {sorted(unknown)} (known: {', '.join(sorted(_FIELDS))})")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name == ANONYMOUS:
        raise fail(f"name {name!r}: 1-64 letters, digits, '.', '_' or '-', not {ANONYMOUS!r}")
    where += f" (name {name!r})"
    secret, hashed = entry.get("key"), entry.get("key_sha256")
    if (secret is None) == (hashed is None):
        raise fail("set exactly one of key and key_sha256")
    if secret is not None and (not isinstance(secret, str) or not secret or secret != secret.strip()):
        raise fail("key must be a non-empty string without surrounding spaces")
    if hashed is not None and (not isinstance(hashed, str) or not _HEX64.fullmatch(hashed)):
        raise fail("key_sha256 must be 64 hex digits (sha256sum of the key)")
    limits = {}
    for limit in _LIMITS:
        value = entry.get(limit, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise fail(f"{limit} has value {value!r}: a whole number >= 0 (0 = no limit)")
        limits[limit] = value
    admin = entry.get("admin", False)
    if not isinstance(admin, bool):
        raise fail(f"admin has value {admin!r}: true or false")
    priority = entry.get("priority")
    if priority is not None and priority not in _PRIORITIES:
        raise fail(f"priority has value {priority!r}: one of {', '.join(_PRIORITIES)}")
    return ApiKey(
        name,
        digest(secret) if isinstance(secret, str) else bytes.fromhex(str(hashed)),
        tiers=_tiers(entry.get("tiers"), where),
        admin=admin,
        priority=priority if isinstance(priority, str) else None,
        **limits,
    )


def _tiers(value: object, where: str) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(t, str) for t in value):
        raise ConfigError(f"{where}: tiers has value {value!r}: a non-empty list of tier names")
    tiers = frozenset(t.strip().lower() for t in value)
    unknown = tiers - set(TIERS)
    if unknown:
        raise ConfigError(f"{where}: tiers names {sorted(unknown)}: not tiers (choose from {', '.join(TIERS)})")
    return tiers


def _unique(path: str, keys: Sequence[ApiKey]) -> None:
    names: set[str] = set()
    digests: dict[bytes, str] = {}
    for key in keys:
        if key.name in names:
            raise ConfigError(f"API_KEYS_FILE {path!r}: the name {key.name!r} is used twice")
        if key.digest in digests:
            raise ConfigError(f"API_KEYS_FILE {path!r}: {key.name!r} has the same key as {digests[key.digest]!r}")
        names.add(key.name)
        digests[key.digest] = key.name


# ---------------------------------------------------------------- the store


def _stamp(path: str) -> tuple[int, int, int] | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_mtime_ns, info.st_size, info.st_ino


class KeyStore:
    """The keys in force. `lookup` compares a presented key with every one in constant time."""

    def __init__(self, plain: Sequence[str] = (), path: str = "") -> None:
        self.path = path
        self._anonymous = anonymous_keys(plain)
        self._named: tuple[ApiKey, ...] = ()
        self._stamp: tuple[int, int, int] | None = None
        self._reload_requested = False
        if path:
            self._stamp = _stamp(path)
            self._named = read_keys_file(path)  # at start-up a bad file is fatal
            log.info("API keys: %d named key(s) from %s", len(self._named), path)

    @property
    def enabled(self) -> bool:
        """Requests need a key (a key file with no entries still shuts every door)."""
        return bool(self._anonymous) or bool(self.path)

    @property
    def keys(self) -> tuple[ApiKey, ...]:
        return self._anonymous + self._named

    def lookup(self, presented: str) -> ApiKey | None:
        self.refresh()
        # Hashing first makes both sides the same length; every key is compared (no early exit).
        candidate = digest(presented)
        found: ApiKey | None = None
        for key in self.keys:
            if hmac.compare_digest(candidate, key.digest) and found is None:
                found = key
        return found

    def refresh(self) -> None:
        """Re-read the file when it changed on disk or SIGHUP asked for it."""
        if not self.path:
            return
        stamp = _stamp(self.path)
        if stamp == self._stamp and not self._reload_requested:
            return
        self._reload_requested = False
        self._stamp = stamp  # a bad file is reported once, not on every request
        self.reload()

    def reload(self) -> bool:
        """Read the file again; on failure keep the keys in force. True when the new keys took over."""
        try:
            named = read_keys_file(self.path)
        except ConfigError as exc:
            log.error("API keys not reloaded, the previous %d key(s) stay in force: %s", len(self._named), exc)
            return False
        self._named = named
        log.info("API keys reloaded: %d named key(s) from %s", len(named), self.path)
        return True

    def request_reload(self, signum: int = 0, frame: FrameType | None = None) -> None:
        """A signal handler: only sets a flag (the next request reloads)."""
        self._reload_requested = True

    @contextlib.contextmanager
    def reload_on_sighup(self) -> Iterator[None]:
        """SIGHUP asks for a reload while inside. Only the main thread can install a handler; elsewhere
        (an app served from a test's thread) the file's change check alone applies."""
        if not self.path or not hasattr(signal, "SIGHUP"):
            yield
            return
        try:
            previous = signal.signal(signal.SIGHUP, self.request_reload)
        except ValueError:  # not the main thread
            yield
            return
        try:
            yield
        finally:
            signal.signal(signal.SIGHUP, previous)
