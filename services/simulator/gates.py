"""Gates: named points where scripted replies hold until the test opens them.

A test that must act while the model is generating (send, queue, interrupt, edit, kill a
replica) marks the turn with a gate, waits until a reply is held there, acts, and opens the
gate. Nothing depends on a delay being long enough, so the test is as fast as the machine
allows and never flaky on a slow one.

A gate is created closed the first time anything names it. Opening it releases every reply
held there and lets later ones through until it is closed again. A held reply whose client
goes away is released at once (and recorded as closed by the client), so cancellation and
deadlines behave as they do against a real provider.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

# How often a held reply (and a stream pausing between chunks) looks at its socket, so a client
# that goes away is noticed and recorded promptly however long the wait.
CLOSED_POLL_SECONDS = 0.005


@dataclass(frozen=True)
class GateView:
    """A gate's state: whether it is open, how many replies it holds now and how many reached it."""

    name: str
    open: bool
    held: int
    arrived: int

    def as_json(self) -> dict[str, object]:
        """The JSON the control endpoints answer with."""
        return {"name": self.name, "open": self.open, "held": self.held, "arrived": self.arrived}


@dataclass
class _Gate:
    opened: asyncio.Event = field(default_factory=asyncio.Event)
    held: int = 0
    arrived: int = 0


class Gates:
    """The simulator's gates; `notify` wakes whoever waits on the simulator's state."""

    def __init__(self, notify: Callable[[], Awaitable[None]]) -> None:
        self._gates: dict[str, _Gate] = {}
        self._notify = notify

    def _get(self, name: str) -> _Gate:
        gate = self._gates.get(name)
        if gate is None:
            gate = self._gates[name] = _Gate()
        return gate

    def view(self, name: str) -> GateView:
        """The state of gate `name` (a closed gate nothing reached yet if it is new)."""
        gate = self._get(name)
        return GateView(name, gate.opened.is_set(), gate.held, gate.arrived)

    def views(self) -> list[GateView]:
        """Every gate named so far."""
        return [self.view(name) for name in sorted(self._gates)]

    async def open(self, name: str) -> GateView:
        """Release every reply held at `name`; later replies pass until it is closed."""
        self._get(name).opened.set()
        await self._notify()
        return self.view(name)

    async def close(self, name: str) -> GateView:
        """Make later replies hold at `name` again (replies already released stay released)."""
        self._get(name).opened.clear()
        await self._notify()
        return self.view(name)

    async def hold(self, name: str, connected: Callable[[], bool]) -> bool:
        """Wait at gate `name` until it is open: True, or False as soon as `connected()` is false."""
        gate = self._get(name)
        gate.arrived += 1
        if gate.opened.is_set():
            await self._notify()
            return True
        gate.held += 1
        await self._notify()
        try:
            while not gate.opened.is_set():
                if not connected():
                    return False
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSED_POLL_SECONDS):
                        await gate.opened.wait()
            return True
        finally:
            gate.held -= 1
            # Shielded: a cancelled handler must still wake the waiters.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._notify())
