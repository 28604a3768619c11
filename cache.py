"""Exact-match response cache: an LRU/TTL tier in memory, an optional Redis tier shared by replicas
(scale/redis_cache.py) and an optional diskcache tier on disk, looked up in that order.

Keys are SHA-256 digests made by core/cache_keys.py from the endpoint, the tier, the model's identity
and the normalised request. Values are JSON-serialisable objects, stored as JSON bytes wrapped with their key; on disk a
`JsonOnlyDisk` refuses anything that is not plain bytes, so a planted pickle is never unpickled, and
reads or deletes a value file only when the row names one of its own files inside the cache directory,
so a tampered row cannot reach any other file.

A cache failure never fails a request: a broken or full disk means serving uncached, with one
warning (repeated failures are logged at debug level until the disk works again); an unreachable or
frozen Redis costs a request at most REDIS_TIMEOUT_MS, then is bypassed for a cooldown.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import os
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import cachetools
import orjson
from diskcache import UNKNOWN, Cache, Disk
from diskcache.core import MODE_BINARY, MODE_RAW

from config import Settings
from scale.redis_cache import RedisTier, redis_tier

log = logging.getLogger("llmservice.cache")
T = TypeVar("T")

# True in a request whose model is not the one its cache key names (it resolved its tier just before the
# tier's model was swapped, and the new model serves it): nothing it computes is stored.
_skip_storing: contextvars.ContextVar[bool] = contextvars.ContextVar("llmservice_cache_skip", default=False)


def skip_storing() -> None:
    """Keep the current request's answers out of the cache (its task, and the tasks it starts after this)."""
    _skip_storing.set(True)


class UnsafeEntry(ValueError):
    """A disk entry that is not plain JSON bytes (a pickle, a foreign value): never decoded."""


# ---------------------------------------------------------------- disk


# The only value file names diskcache's Disk.filename makes: two hex levels, then 28 hex digits ".val".
_VALUE_FILE = re.compile(r"[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{28}\.val")


class JsonOnlyDisk(Disk):
    """A diskcache `Disk` for string keys and bytes values only; it refuses to unpickle anything, and
    touches only value files inside its directory whatever a (possibly tampered) row says."""

    def __init__(self, directory: str, **settings: Any) -> None:
        super().__init__(directory, **settings)
        self._root = os.path.realpath(directory)

    def _confined(self, filename: object) -> str | None:
        """The real path of a row's value file, or None when the name is not one diskcache made or
        resolves (through `..`, an absolute path or a symlink) outside the cache directory."""
        if not isinstance(filename, str) or not _VALUE_FILE.fullmatch(filename.replace(os.sep, "/")):
            return None
        path = os.path.realpath(os.path.join(self._root, filename))
        return path if os.path.commonpath([self._root, path]) == self._root else None

    def put(self, key: Any) -> tuple[Any, bool]:
        if type(key) is not str:
            raise TypeError("cache keys are strings")
        return key, True

    def get(self, key: Any, raw: bool) -> Any:
        if not raw:
            raise UnsafeEntry("refusing to unpickle a cache key")
        return key

    def store(self, value: Any, read: bool, key: Any = UNKNOWN) -> tuple[int, int, str | None, Any]:
        if type(value) is not bytes:
            raise TypeError("cache values are JSON bytes")
        return super().store(value, read, key)

    def fetch(self, mode: int, filename: str | None, value: Any, read: bool) -> bytes:
        if mode not in (MODE_RAW, MODE_BINARY) or read:
            raise UnsafeEntry(f"refusing to decode a cache entry of mode {mode}")
        if mode == MODE_RAW:
            data = super().fetch(mode, filename, value, read)
        else:
            path = self._confined(filename)
            if path is None:
                raise UnsafeEntry("a cache entry names a file outside the cache directory")
            with open(path, "rb") as reader:  # a missing file is an OSError: diskcache answers a miss
                data = reader.read()
        if type(data) is not bytes:
            raise UnsafeEntry("a cache entry is not bytes")
        return data

    def remove(self, file_path: str) -> None:
        # diskcache calls this with the row's filename when it deletes, culls, expires or clears a row.
        if self._confined(file_path) is None:
            log.warning("not deleting %r: a cache row named a file outside the cache directory", file_path)
            return
        super().remove(file_path)


# A change to this format strands stored entries: bump SCHEMA_VERSION (core/cache_keys.py) with it.
def encode_entry(key: str, value: Any) -> bytes:
    # orjson: an embedding entry is 384+ floats, which json.dumps formats one by one in Python (~20x slower).
    return orjson.dumps({"key": key, "value": value}, option=orjson.OPT_NON_STR_KEYS)


def decode_entry(key: str, data: bytes) -> Any:
    """The value stored under `key`; raises UnsafeEntry when the bytes are not what we wrote for it."""
    try:
        entry = orjson.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:  # orjson's error is a JSONDecodeError
        raise UnsafeEntry("a cache entry is not valid JSON") from exc
    if not isinstance(entry, dict) or entry.get("key") != key or "value" not in entry:
        raise UnsafeEntry("a cache entry does not match its key")
    return entry["value"]


def open_cache_dir(directory: str) -> Path:
    """Create the cache directory with mode 0700 (answers may hold private prompts)."""
    path = Path(directory)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


# ---------------------------------------------------------------- the cache


class ResponseCache:
    """Memory LRU/TTL in front of an optional disk tier; every method is safe to call concurrently.

    The async methods run disk I/O on a worker thread; a memory hit never leaves the event loop.
    """

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = settings.enable_cache
        self.ttl = settings.cache_ttl_seconds
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._memory: cachetools.Cache[str, bytes] | None = None
        self.disk: Cache | None = None
        self.redis: RedisTier | None = None
        self._disk_warned = False
        if not self.enabled:
            return
        self.redis = redis_tier(settings)
        if settings.cache_max_size > 0:
            if self.ttl > 0:
                self._memory = cachetools.TTLCache(settings.cache_max_size, self.ttl, timer=clock)
            else:
                self._memory = cachetools.LRUCache(settings.cache_max_size)
        if settings.cache_persist_to_disk:
            self._open_disk(settings.cache_dir)

    def _open_disk(self, directory: str) -> None:
        try:
            path = open_cache_dir(directory)
            self.disk = Cache(str(path), disk=JsonOnlyDisk, timeout=2)
        except Exception as exc:  # noqa: BLE001 - a broken cache directory means running without it
            self._disk_failed("open", exc)
            self.disk = None

    def _disk_failed(self, action: str, exc: BaseException) -> None:
        if not self._disk_warned:
            self._disk_warned = True
            log.warning("disk cache %s failed (%s: %s); serving uncached", action, type(exc).__name__, exc)
        else:
            log.debug("disk cache %s failed again: %s", action, exc)

    # ------------------------------------------------------------ sync core (any thread)

    def _memory_get(self, key: str) -> bytes | None:
        if self._memory is None:
            return None
        with self._lock:
            return self._memory.get(key)

    def _memory_put(self, key: str, data: bytes) -> None:
        if self._memory is not None:
            with self._lock:
                self._memory[key] = data

    def _disk_get(self, key: str) -> tuple[Any, bytes] | None:
        """The value under `key` and its bytes (for the Redis tier), or None."""
        disk = self.disk
        if disk is None:
            return None
        try:
            data = disk.get(key)
            if data is None:
                return None
            value = decode_entry(key, data)
        except UnsafeEntry as exc:
            log.warning("dropping a bad disk cache entry (%s)", exc)
            self._disk_delete(key)
            return None
        except Exception as exc:  # noqa: BLE001 - sqlite, I/O or timeout errors: serve uncached
            self._disk_failed("read", exc)
            return None
        self._memory_put(key, data)
        return value, data

    def _disk_delete(self, key: str) -> None:
        if self.disk is not None:
            try:
                self.disk.delete(key)
            except Exception as exc:  # noqa: BLE001
                self._disk_failed("delete", exc)

    def _disk_store(self, encoded: Mapping[str, bytes]) -> None:
        if self.disk is None:
            return
        try:
            for key, data in encoded.items():
                self.disk.set(key, data, expire=self.ttl or None)
        except Exception as exc:  # noqa: BLE001 - disk full, read-only, locked: keep serving
            self._disk_failed("write", exc)
        else:
            self._disk_warned = False

    def _count(self, found: Iterable[Any | None]) -> None:
        for value in found:
            if value is None:
                self.misses += 1
            else:
                self.hits += 1

    # ------------------------------------------------------------ async API

    async def get(self, key: str) -> Any | None:
        """The value under `key`, or None (a miss)."""
        return (await self.get_many([key]))[0]

    async def get_many(self, keys: Sequence[str]) -> list[Any | None]:
        """Values for `keys` in order, None where missing: a batch computes only what is new."""
        if not self.enabled:
            return [None] * len(keys)
        found: list[Any | None] = []
        for key in keys:
            data = self._memory_get(key)
            found.append(decode_entry(key, data) if data is not None else None)
        missing = [i for i, value in enumerate(found) if value is None]
        if missing and self.redis is not None:
            missing = await self._redis_get(keys, missing, found)
        if missing and self.disk is not None:
            from_disk = await asyncio.to_thread(lambda: [self._disk_get(keys[i]) for i in missing])
            shared: dict[str, bytes] = {}
            for i, hit in zip(missing, from_disk, strict=True):
                if hit is not None:
                    found[i], shared[keys[i]] = hit
            if shared and self.redis is not None:
                await self.redis.put_many(shared)  # what this replica kept on disk, the others can share
        self._count(found)
        return found

    async def _redis_get(self, keys: Sequence[str], missing: list[int], found: list[Any | None]) -> list[int]:
        """Fill `found` from Redis at the `missing` positions; the positions still missing."""
        assert self.redis is not None
        still: list[int] = []
        for i, data in zip(missing, await self.redis.get_many([keys[i] for i in missing]), strict=True):
            if data is None:
                still.append(i)
                continue
            try:
                found[i] = decode_entry(keys[i], data)
            except UnsafeEntry as exc:
                log.warning("dropping a bad redis cache entry (%s)", exc)
                await self.redis.drop(keys[i])
                still.append(i)
                continue
            self._memory_put(keys[i], data)
        return still

    async def get_or_compute_many(
        self,
        keys: Sequence[str],
        items: Sequence[T],
        compute: Callable[[list[T]], Awaitable[Sequence[Any]]],
    ) -> tuple[list[Any], int]:
        """Values for `items` in order, computing only those not cached (each distinct key once).

        `compute` gets the missing items and returns their values in the same order; they are
        stored before returning. Returns (values, number of items served from the cache).
        """
        found = await self.get_many(keys)
        missing: dict[str, T] = {}
        for key, item, value in zip(keys, items, found, strict=True):
            if value is None and key not in missing:
                missing[key] = item
        if missing:
            computed = list(await compute(list(missing.values())))
            if len(computed) != len(missing):
                raise ValueError(f"compute returned {len(computed)} values for {len(missing)} items")
            fresh = dict(zip(missing, computed, strict=True))
            await self.put_many(fresh)
            found = [fresh[key] if value is None else value for key, value in zip(keys, found, strict=True)]
        hits = sum(1 for key in keys if key not in missing)
        return found, hits

    async def put(self, key: str, value: Any) -> None:
        await self.put_many({key: value})

    async def put_many(self, items: Mapping[str, Any]) -> None:
        """Store JSON-serialisable values; never raises for a disk or Redis problem."""
        if not self.enabled or not items or _skip_storing.get():
            return
        encoded = {key: encode_entry(key, value) for key, value in items.items()}
        for key, data in encoded.items():
            self._memory_put(key, data)
        if self.redis is not None:
            await self.redis.put_many(encoded)
        if self.disk is not None:
            await asyncio.to_thread(self._disk_store, encoded)

    def stats(self) -> dict[str, Any]:
        memory_entries, memory_bytes = 0, 0
        if self._memory is not None:
            with self._lock:
                memory_entries = len(self._memory)
                memory_bytes = sum(len(data) for data in self._memory.values())
        disk_entries, disk_bytes = 0, 0
        if self.disk is not None:
            try:
                disk_entries, disk_bytes = len(self.disk), self.disk.volume()
            except Exception as exc:  # noqa: BLE001
                self._disk_failed("stats", exc)
        return {
            "enabled": self.enabled,
            "persistent": self.disk is not None,
            "entries": max(memory_entries, disk_entries),
            "memory_entries": memory_entries,
            "disk_entries": disk_entries,
            "hits": self.hits,
            "misses": self.misses,
            "bytes": memory_bytes + disk_bytes,
            "memory_bytes": memory_bytes,
            "disk_bytes": disk_bytes,
            **({"redis": self.redis.stats()} if self.redis is not None else {}),
        }

    async def clear(self) -> dict[str, Any]:
        """Drop every entry (memory, our keys in Redis, disk) and reset the counters; returns how many
        were dropped. Other replicas keep their memory tiers until their entries expire."""
        removed = 0
        result: dict[str, Any] = {}
        if self.redis is not None:
            try:
                result["redis_removed"] = await self.redis.clear()
            except Exception as exc:  # noqa: BLE001 - reported to the operator who asked
                log.warning("clearing the redis cache tier failed: %s: %s", type(exc).__name__, exc)
                result["redis_error"] = f"{type(exc).__name__}: {exc}"[:200]
        if self._memory is not None:
            with self._lock:
                removed = len(self._memory)
                self._memory.clear()
        if self.disk is not None:
            try:
                removed = max(removed, await asyncio.to_thread(self.disk.clear))
            except Exception as exc:  # noqa: BLE001
                self._disk_failed("clear", exc)
        self.hits = self.misses = 0
        return {"removed": removed, **result}

    async def aclose(self) -> None:
        """Close the Redis client and the disk tier (the app's shutdown)."""
        if self.redis is not None:
            await self.redis.link.aclose()
        self.close()

    def close(self) -> None:
        if self.disk is not None:
            try:
                self.disk.close()
                log.info("disk cache closed")
            except Exception as exc:  # noqa: BLE001
                self._disk_failed("close", exc)
            self.disk = None
