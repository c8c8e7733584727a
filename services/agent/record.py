"""The agent's record of recent tool calls, by tool_call_id, in a state directory on disk.

Together with toolexec's ledger it makes each side effect happen once: a call re-sent after a
reconnect (or after toolexec or the agent restarted) is answered from here instead of running
again. The record is a journal, ``calls.jsonl``, one JSON line per event appended with a single
``write`` (no temp file, no rename: a call costs two small appends): ``started`` before the tool
runs, ``done`` with the result after. The last line of an id wins. A call found ``started`` with
no run in memory was cut off by an agent restart: it is answered as "may have run", never re-run.
The record keeps the newest `max_entries` calls; when the journal holds twice that many lines it
is rewritten (temp file + rename) with only those. A line cut short by a crash is skipped.

Lines are not fsynced: a crash of the agent process loses nothing (the page cache survives it);
only a crash of the host can lose the last entries, and then the workspace's processes are gone too.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from services.agent.tools.base import ToolResult

log = logging.getLogger(__name__)

DEFAULT_MAX_ENTRIES = 5000
STARTED = "started"
DONE = "done"
JOURNAL = "calls.jsonl"


@dataclass(frozen=True)
class Entry:
    """One recorded call."""

    tool_call_id: str
    arguments_sha256: str
    state: str
    result: ToolResult | None = None
    duration_seconds: float = 0.0


class ResultRecord:
    """Recent calls by tool_call_id, persisted as a journal under `directory`."""

    def __init__(self, directory: str, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._dir = directory
        self._path = os.path.join(directory, JOURNAL)
        self._max = max_entries
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lines = 0
        self._load()
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def _load(self) -> None:
        try:
            with open(self._path, "rb") as f:
                raw_lines = f.read().split(b"\n")
        except FileNotFoundError:
            return
        for raw in raw_lines:
            if not raw.strip():
                continue
            try:
                entry = _entry_from_json(json.loads(raw))
            except (ValueError, KeyError, TypeError):
                log.warning("skipping an unreadable line of the call record")
                continue
            self._lines += 1
            self._entries.pop(entry.tool_call_id, None)
            self._entries[entry.tool_call_id] = entry
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    def get(self, tool_call_id: str) -> Entry | None:
        """The recorded call, or None."""
        return self._entries.get(tool_call_id)

    def __len__(self) -> int:
        return len(self._entries)

    def started(self, tool_call_id: str, arguments_sha256: str) -> None:
        """Note that the call is about to run."""
        self._append(Entry(tool_call_id, arguments_sha256, STARTED))

    def done(
        self, tool_call_id: str, arguments_sha256: str, result: ToolResult, duration_seconds: float
    ) -> Entry:
        """Record the call's result."""
        entry = Entry(tool_call_id, arguments_sha256, DONE, result, duration_seconds)
        self._append(entry)
        return entry

    def clear(self) -> None:
        """Forget everything (the workspace is being deleted)."""
        self._entries.clear()
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        self._lines = 0

    def close(self) -> None:
        """Close the journal."""
        with contextlib.suppress(OSError):
            os.close(self._fd)

    def _append(self, entry: Entry) -> None:
        line = json.dumps(_entry_to_json(entry), separators=(",", ":")).encode() + b"\n"
        try:
            # One write of a whole line: O_APPEND keeps it in one piece next to any other.
            os.write(self._fd, line)
            self._lines += 1
        except OSError:
            # The record is a safety net: a full disk must not fail the call itself.
            log.warning("could not record call %s", entry.tool_call_id, exc_info=True)
        self._entries.pop(entry.tool_call_id, None)
        self._entries[entry.tool_call_id] = entry
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
        if self._lines > 2 * self._max:
            self._compact()

    def _compact(self) -> None:
        tmp = f"{self._path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "wb") as f:
                for entry in self._entries.values():
                    f.write(json.dumps(_entry_to_json(entry), separators=(",", ":")).encode() + b"\n")
            os.replace(tmp, self._path)
        except OSError:
            log.warning("could not compact the call record", exc_info=True)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return
        os.close(self._fd)
        self._fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._lines = len(self._entries)


def _entry_to_json(entry: Entry) -> dict[str, Any]:
    data: dict[str, Any] = {"id": entry.tool_call_id, "sha": entry.arguments_sha256, "state": entry.state}
    if entry.result is not None:
        data["result"] = {
            "content": entry.result.content,
            "structured": entry.result.structured,
            "is_error": entry.result.is_error,
        }
        data["duration"] = entry.duration_seconds
    return data


def _entry_from_json(data: dict[str, Any]) -> Entry:
    raw = data.get("result")
    result = None
    if raw is not None:
        result = ToolResult(
            content=str(raw["content"]), structured=dict(raw["structured"]), is_error=bool(raw["is_error"])
        )
    state = str(data["state"])
    if state not in (STARTED, DONE):
        raise ValueError(state)
    return Entry(str(data["id"]), str(data["sha"]), state, result, float(data.get("duration", 0.0)))
