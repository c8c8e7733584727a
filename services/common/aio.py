"""Running the product's coroutines: one event loop policy for every command.

`run` uses uvloop when it is installed (it is a dependency; its event loop makes the socket,
timer and callback work of asyncio several times cheaper than the default loop's), unless
``AGENTPLANE_EVENT_LOOP=asyncio`` asks for the standard loop (to compare, or to debug with
asyncio's own debug mode).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop constructor to use, or None for asyncio's default."""
    if os.environ.get("AGENTPLANE_EVENT_LOOP", "uvloop").strip().lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; only a broken install lacks it
        return None
    return uvloop.new_event_loop


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` to completion on a fresh event loop (see the module docstring)."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(coro)
