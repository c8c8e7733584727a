"""The demo's live view of a chat: streamed text, each tool call with the start of its output, and a
progress indicator on a terminal while the model works."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from typing import TextIO

from agentplane.chat.v1 import chat_pb2

from services.cli.chat import discarded_note, summarize_arguments

OUTPUT_LINES = 12
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


class LiveView:
    """Prints chat events as they come. The spinner runs only on a terminal (never in a log or a pipe)
    and only while nothing else is printed, so it never interleaves with the conversation."""

    def __init__(self, out: TextIO = sys.stdout, *, spinner: bool | None = None) -> None:
        self._out = out
        self._mid_line = False
        self._spinner = out.isatty() if spinner is None else spinner
        self._spin_task: asyncio.Task[None] | None = None
        self._spin_label = ""
        self._spin_since = 0.0
        self._spin_shown = False
        self._last_delta = ""
        # Replies announced discarded: their late deltas are not shown.
        self._discarded: set[str] = set()

    @property
    def stream(self) -> TextIO:
        """Where the view writes (stderr under ``-o json``, which keeps stdout for the summary)."""
        return self._out

    def event(self, event: chat_pb2.ChatEvent) -> None:
        """Print one event."""
        self._stop_spinner()
        kind = event.WhichOneof("event")
        if kind == "part_delta":
            delta = event.part_delta
            if delta.message_id in self._discarded:
                return
            kind_of_delta = str(delta.WhichOneof("delta"))
            if kind_of_delta != self._last_delta:
                self._end_line()
                if kind_of_delta == "reasoning":
                    self._write("(thinking) ")
            self._last_delta = kind_of_delta
            if kind_of_delta == "reasoning":
                self._write(f"\x1b[2m{delta.reasoning}\x1b[0m" if self._spinner else delta.reasoning)
            else:
                self._write(delta.text)
            self._start_spinner("the model is writing")
            return
        self._end_line()
        self._last_delta = ""
        if kind == "tool_call_started":
            call = event.tool_call_started.tool_call
            self._line(f"→ {call.name}({summarize_arguments(call.arguments_json, 60)})")
            self._start_spinner(f"running {call.name}")
        elif kind == "tool_call_finished":
            result = event.tool_call_finished.tool_result
            self._line(("  ✗ " if result.is_error else "  ✓ ") + result.tool_name)
            for text in clip_lines(result.content, OUTPUT_LINES):
                self._line(f"    │ {text}")
            self._start_spinner("the model is thinking")
        elif kind == "status_changed":
            change = event.status_changed
            if change.status == chat_pb2.CHAT_STATUS_RUNNING:
                self._start_spinner("the model is thinking")
            elif change.HasField("error"):
                self._line(f"[error {change.error.reason}: {change.error.message}]")
        elif kind == "reply_discarded":
            # The partial text is on the screen already: mark it as not part of the answer.
            self._discarded.add(event.reply_discarded.message_id)
            self._line(discarded_note(event.reply_discarded))
            if event.reply_discarded.retrying:
                self._start_spinner("the model is starting over")
        elif kind == "retry_scheduled":
            retry = event.retry_scheduled
            self._line(
                f"[the provider failed ({retry.reason}); retry {retry.attempt} in {retry.delay_ms} ms]"
            )
            self._start_spinner("waiting to retry")
        elif kind == "message_persisted" and event.message_persisted.role == chat_pb2.MESSAGE_ROLE_USER:
            text = "".join(
                p.text.text for p in event.message_persisted.parts if p.WhichOneof("part") == "text"
            )
            self._line(f"> {text}")
            self._start_spinner("the model is thinking")

    def close(self) -> None:
        """Stop the spinner and end the current line."""
        self._stop_spinner()
        self._end_line()

    def _write(self, text: str) -> None:
        if text:
            self._out.write(text)
            self._out.flush()
            self._mid_line = not text.endswith("\n")

    def _line(self, text: str) -> None:
        self._write(text + "\n")

    def _end_line(self) -> None:
        if self._mid_line:
            self._write("\n")

    def _start_spinner(self, label: str) -> None:
        if not self._spinner:
            return
        self._spin_label, self._spin_since = label, time.monotonic()
        if self._spin_task is None:
            self._spin_task = asyncio.get_running_loop().create_task(self._spin())

    def _stop_spinner(self) -> None:
        if self._spin_task is not None:
            self._spin_task.cancel()
            self._spin_task = None
        if self._spin_shown:
            # Erase the indicator: back to the line's start, clear to its end.
            self._out.write("\r\x1b[K")
            self._out.flush()
            self._spin_shown = False

    async def _spin(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            frame = 0
            while True:
                # A short grace period: a fast stream of deltas shows no indicator at all.
                await asyncio.sleep(0.3 if not self._spin_shown else 0.1)
                if self._mid_line:
                    continue  # never draw over streamed text
                elapsed = time.monotonic() - self._spin_since
                self._out.write(
                    f"\r\x1b[2m{SPINNER[frame % len(SPINNER)]} {self._spin_label}… {elapsed:.1f}s\x1b[0m"
                )
                self._out.flush()
                self._spin_shown = True
                frame += 1


def clip_lines(text: str, limit: int) -> list[str]:
    """The first `limit` lines of `text` (each at most 160 characters), and how many were left out."""
    lines = text.rstrip("\n").splitlines()
    shown = [line if len(line) <= 160 else line[:159] + "…" for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"… {len(lines) - limit} more lines")
    return shown
