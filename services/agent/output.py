"""Bounded process output: keeps the head and the tail, renders UTF-8 safely with a truncation flag."""

from __future__ import annotations

from dataclasses import dataclass

OUTPUT_LIMIT_BYTES = 32 * 1024


@dataclass(frozen=True)
class RenderedOutput:
    """Output as text for the model."""

    text: str
    truncated: bool
    total_bytes: int
    omitted_bytes: int


class CappedOutput:
    """Accumulates a byte stream keeping at most `limit` bytes: the first half and the last half.

    Memory stays bounded however much a process prints; `total_bytes` counts everything.
    """

    def __init__(self, limit: int = OUTPUT_LIMIT_BYTES) -> None:
        self.limit = limit
        self._half = limit // 2
        self._head = bytearray()
        self._tail = bytearray()
        self.total_bytes = 0

    def append(self, data: bytes) -> None:
        """Add a chunk of output."""
        self.total_bytes += len(data)
        room = self._half - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if data:
            self._tail += data
            # Trim lazily (amortised) so appending many small chunks stays cheap.
            if len(self._tail) > 2 * self._half:
                del self._tail[: len(self._tail) - self._half]

    def render(self) -> RenderedOutput:
        """The kept output as text: everything when it fits, else head + marker + tail."""
        tail = bytes(self._tail[-self._half :]) if self._half else b""
        kept = len(self._head) + len(tail)
        omitted = self.total_bytes - kept
        if omitted <= 0:
            text = (bytes(self._head) + tail).decode("utf-8", errors="replace")
            return RenderedOutput(text, False, self.total_bytes, 0)
        head_bytes = _cut_head(bytes(self._head))
        tail_bytes = _cut_tail(tail)
        omitted = self.total_bytes - len(head_bytes) - len(tail_bytes)
        text = (
            head_bytes.decode("utf-8", errors="replace")
            + f"\n[... {omitted} bytes of output omitted ...]\n"
            + tail_bytes.decode("utf-8", errors="replace")
        )
        return RenderedOutput(text, True, self.total_bytes, omitted)


def _cut_head(data: bytes) -> bytes:
    """Drop an incomplete UTF-8 sequence at the end of `data`."""
    end = len(data)
    # Walk back over at most 3 continuation bytes to the lead byte of the last character.
    i = end - 1
    while i >= 0 and end - i <= 4 and (data[i] & 0xC0) == 0x80:
        i -= 1
    if i < 0:
        return data
    lead = data[i]
    need = 1 if lead < 0x80 else 2 if lead >> 5 == 0b110 else 3 if lead >> 4 == 0b1110 else 4
    if lead >= 0x80 and end - i < need:
        return data[:i]
    return data


def _cut_tail(data: bytes) -> bytes:
    """Drop continuation bytes at the start of `data` (the rest of a character cut in half)."""
    i = 0
    while i < len(data) and i < 4 and (data[i] & 0xC0) == 0x80:
        i += 1
    return data[i:]
