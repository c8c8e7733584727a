"""Waiting on real conditions with a bounded deadline (never a bare sleep)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


async def eventually(
    condition: Callable[[], Awaitable[bool]], *, within: float, interval: float = 0.02
) -> None:
    """Poll `condition` until it is true; fail the test after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        if await condition():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within} s")
        await asyncio.sleep(interval)
