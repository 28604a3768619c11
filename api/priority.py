"""A request's priority: the `priority` body field, else the `X-Priority` header, else its key's default.

A named API key with `priority = "..."` (middleware/keys.py) sets both its requests' default and the
highest priority they may ask for: asking for more is served at the key's level, not refused, so a client
library that always sends `high` keeps working. Requests without such a key (no keys, `API_KEYS` keys,
named keys without the field) default to normal and may ask for any. An unknown value is a 400.
"""

from __future__ import annotations

from fastapi import Request

from core import priority
from core.priority import Priority
from middleware.keys import SCOPE_KEY, ApiKey

HEADER = "x-priority"


def apply(request: Request, asked: str | int | None = None) -> Priority:
    """Work out the request's priority and put it in force for the rest of the request (the queues read
    it when the request is queued). An integer body field (Cohere's rerank `priority`) is ignored."""
    header = request.headers.get(HEADER)
    if isinstance(asked, str):
        wanted: Priority | None = Priority.parse(asked)
    elif header is not None:
        wanted = Priority.parse(header, param="X-Priority")
    else:
        wanted = None
    key: ApiKey | None = request.scope.get(SCOPE_KEY)
    ceiling = Priority.parse(key.priority) if key is not None and key.priority else None
    if wanted is None:
        chosen = ceiling if ceiling is not None else Priority.NORMAL
    else:
        chosen = min(wanted, ceiling) if ceiling is not None else wanted
    priority.use(chosen)
    return chosen
