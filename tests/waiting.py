"""Waiting in tests: poll for an event, with one generous deadline.

Tests run on small machines shared with other test runs, next to a model decoding on the same cores:
everything may be slow, nothing may be wrong. So a test waits for the event it needs, and the deadline
only bounds how long a broken test takes to fail. It is never what a test measures.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEADLINE_S = 120.0  # the default deadline of every wait in the tests
POLL_S = 0.01


def wait_for(predicate: Callable[[], T], what: str, timeout: float = DEADLINE_S) -> T:
    """Poll `predicate` until it returns something truthy, and return that; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout:g} s")
        time.sleep(POLL_S)  # a poll interval, not synchronisation: the predicate decides


async def wait_for_async(predicate: Callable[[], T], what: str, timeout: float = DEADLINE_S) -> T:
    """`wait_for` inside an event loop: yields to the loop between polls, so the awaited work can run."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout:g} s")
        await asyncio.sleep(POLL_S)
