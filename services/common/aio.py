"""Running the product's coroutines: one event loop policy for every command.

`run` uses uvloop (a dependency: its event loop makes the socket, timer and callback work of
asyncio several times cheaper than the default loop's) unless the caller prefers the standard
loop: toolexec does, because spawning a child with ``preexec_fn`` (its rlimits) is several times
slower under uvloop (`agentplane bench toolexec`: `execute true` p50 3 ms vs 10-13 ms).
``AGENTPLANE_EVENT_LOOP=asyncio|uvloop`` overrides the choice for every command (to compare, or
to debug with asyncio's own debug mode).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


UVLOOP = "uvloop"
ASYNCIO = "asyncio"


def loop_factory(prefer: str = UVLOOP) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop constructor to use, or None for asyncio's default."""
    choice = os.environ.get("AGENTPLANE_EVENT_LOOP", "").strip().lower() or prefer
    if choice == ASYNCIO:
        return None
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; only a broken install lacks it
        return None
    return uvloop.new_event_loop


def run(coro: Coroutine[Any, Any, T], *, prefer: str = UVLOOP) -> T:
    """Run `coro` to completion on a fresh event loop (see the module docstring)."""
    with asyncio.Runner(loop_factory=loop_factory(prefer)) as runner:
        return runner.run(coro)
