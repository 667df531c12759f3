"""Waiting on a condition in async tests: poll it, bounded, and fail with the last value seen."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
POLL_INTERVAL_SECONDS = 0.02


async def eventually(probe: Callable[[], Awaitable[T | None]], within: float = 10.0, what: str = "") -> T:
    """Poll `probe` until it returns something truthy (bounded); fail with the last value seen."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        value = await probe()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not within {within}s: {what} (last: {value!r})")
        await asyncio.sleep(POLL_INTERVAL_SECONDS)  # poll again
