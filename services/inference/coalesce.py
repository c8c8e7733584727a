"""Delta coalescing: the first delta goes out at once, later ones at most every `interval`.

A gRPC message per token costs more than the token is worth. Text and reasoning are kept in
separate buffers; switching between them flushes the other first so order is preserved.
"""

from __future__ import annotations

TEXT = 0
REASONING = 1


class Coalescer:
    """Buffers text and reasoning pieces and says when they are due."""

    __slots__ = ("_kind", "_parts", "interval", "last_flush", "sent_any")

    def __init__(self, interval_s: float) -> None:
        self.interval = interval_s
        self.last_flush = 0.0
        self.sent_any = False
        self._kind = TEXT
        self._parts: list[str] = []

    @property
    def pending(self) -> bool:
        """Whether something is buffered."""
        return bool(self._parts)

    @property
    def kind(self) -> int:
        """TEXT or REASONING: the kind of what is buffered."""
        return self._kind

    def add(self, kind: int, text: str, now: float) -> list[tuple[int, str]]:
        """Buffer `text`; returns what must be sent now (possibly nothing)."""
        out: list[tuple[int, str]] = []
        if self._parts and kind != self._kind:
            out.append(self.take())
        self._kind = kind
        self._parts.append(text)
        if not self.sent_any or now - self.last_flush >= self.interval:
            out.append(self.take())
            self.sent_any = True
            self.last_flush = now
        return out

    def due_in(self, now: float) -> float:
        """Seconds until the buffer is due (<= 0: due now)."""
        return self.last_flush + self.interval - now

    def take(self) -> tuple[int, str]:
        """Empty the buffer and return (kind, text)."""
        text = "".join(self._parts)
        self._parts.clear()
        return self._kind, text

    def mark_flushed(self, now: float) -> None:
        """Record a flush made by the caller (timer or before a tool call)."""
        self.last_flush = now
        self.sent_any = True
