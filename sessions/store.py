"""Where sessions and stored responses live: a small store of JSON records with an owner and an expiry.

`RecordStore` is the seam. `MemoryStore` is the default (one process, lost on restart). A Redis store
(issue 12) implements the same five methods: one key per record holding its JSON with the record's
TTL (`put(new=True)` is SET NX, `put(new=False)` SET XX), a sorted set per owner and kind for
`page`, and a counter for the limit; records then survive restarts and are shared by replicas. The
memory store keeps records as JSON text too, so both stores accept and return exactly the same
values, and a caller can never change a stored record by holding on to what it read.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal, Protocol

from core.errors import Overloaded
from core.turns import JsonObject

RecordKind = Literal["session", "response"]


class StoreFull(Overloaded):
    """The store holds SESSIONS_MAX live records: a new one waits until some expire or are deleted."""

    code = "sessions_full"


@dataclass(frozen=True)
class Record:
    id: str
    kind: RecordKind
    owner: str  # a digest of the API key that made it; "" without API_KEYS
    created_at: float  # time.time()
    expires_at: float | None  # time.time(); None = never
    body: JsonObject

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


class RecordStore(Protocol):
    async def get(self, record_id: str) -> Record | None:
        """The live record, or None (missing or expired)."""
        ...

    async def put(self, record: Record, *, new: bool) -> bool:
        """`new`: insert (StoreFull at the limit; False if the id exists). Else replace a live record
        (False when it is gone: a deleted session is never brought back by a late write)."""
        ...

    async def delete(self, record_id: str) -> bool: ...

    async def page(self, kind: RecordKind, owner: str, after: str | None, limit: int) -> tuple[list[Record], bool]:
        """Up to `limit` live records of `owner`, oldest first, after the one with id `after`; and
        whether more follow."""
        ...

    async def purge(self) -> int:
        """Drop expired records; how many went."""
        ...


class MemoryStore:
    """Records in one dict, in creation order (which is the listing order)."""

    def __init__(self, max_records: int, clock: Callable[[], float] = time.time) -> None:
        self.max_records = max_records
        self.clock = clock
        self._records: dict[str, tuple[Record, str]] = {}  # id -> (the record, its body as JSON text)

    async def get(self, record_id: str) -> Record | None:
        entry = self._records.get(record_id)
        if entry is None:
            return None
        record, text = entry
        if record.expired(self.clock()):
            del self._records[record_id]
            return None
        return replace(record, body=json.loads(text))

    async def put(self, record: Record, *, new: bool) -> bool:
        live = await self.get(record.id) is not None
        if new == live:
            return False
        if new and len(self._records) >= self.max_records and not await self.purge():
            soonest = min((r.expires_at for r, _ in self._records.values() if r.expires_at is not None), default=None)
            wait = int(soonest - self.clock()) + 1 if soonest is not None else 60
            raise StoreFull(f"The server keeps at most {self.max_records} sessions and responses", retry_after=wait)
        text = json.dumps(record.body, ensure_ascii=False, separators=(",", ":"))
        self._records[record.id] = (replace(record, body={}), text)
        return True

    async def delete(self, record_id: str) -> bool:
        return await self.get(record_id) is not None and self._records.pop(record_id, None) is not None

    async def page(self, kind: RecordKind, owner: str, after: str | None, limit: int) -> tuple[list[Record], bool]:
        now = self.clock()
        ids = [r.id for r, _ in self._records.values() if r.kind == kind and r.owner == owner and not r.expired(now)]
        if after is not None and after not in ids:
            return [], False  # the cursor expired meanwhile: never start over from the first page
        start = ids.index(after) + 1 if after is not None else 0
        chosen = ids[start : start + limit]
        records = [record for record in [await self.get(i) for i in chosen] if record is not None]
        return records, start + limit < len(ids)

    async def purge(self) -> int:
        now = self.clock()
        expired = [key for key, (record, _) in self._records.items() if record.expired(now)]
        for key in expired:
            del self._records[key]
        return len(expired)

    def __len__(self) -> int:
        return len(self._records)
