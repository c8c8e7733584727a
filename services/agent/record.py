"""The agent's record of recent tool calls, by tool_call_id, in a state directory on disk.

Together with toolexec's ledger it makes each side effect happen once: a call re-sent after a
reconnect (or after toolexec or the agent restarted) is answered from here instead of running
again. Each call is a small JSON file, written atomically (temp file + rename): `started` before
the tool runs, `done` with the result after. A call found `started` with no run in memory was cut
off by an agent restart: it is answered as "may have run", never re-run. The record is bounded
(the oldest entries go first) and lives outside the workspace root.

Files are not fsynced: a crash of the agent process loses nothing (the page cache survives it);
only a crash of the host can lose the last entries, and then the workspace's processes are gone too.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from services.agent.tools.base import ToolResult

log = logging.getLogger(__name__)

DEFAULT_MAX_ENTRIES = 2000
STARTED = "started"
DONE = "done"


@dataclass(frozen=True)
class Entry:
    """One recorded call."""

    tool_call_id: str
    arguments_sha256: str
    state: str
    result: ToolResult | None = None
    duration_seconds: float = 0.0


class ResultRecord:
    """Recent calls by tool_call_id, persisted under `directory`."""

    def __init__(self, directory: str, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self._dir = directory
        self._max = max_entries
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._load()

    def _path(self, tool_call_id: str) -> str:
        return os.path.join(self._dir, hashlib.sha256(tool_call_id.encode()).hexdigest()[:40] + ".json")

    def _load(self) -> None:
        found: list[tuple[float, Entry]] = []
        for name in os.listdir(self._dir):
            path = os.path.join(self._dir, name)
            if not name.endswith(".json"):
                with contextlib.suppress(OSError):
                    os.unlink(path)  # a temp file of an interrupted write
                continue
            try:
                with open(path, encoding="utf-8") as f:
                    data = json.load(f)
                found.append((os.stat(path).st_mtime, _entry_from_json(data)))
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("dropping an unreadable call record %s", name)
                with contextlib.suppress(OSError):
                    os.unlink(path)
        for _, entry in sorted(found, key=lambda item: item[0]):
            self._entries[entry.tool_call_id] = entry

    def get(self, tool_call_id: str) -> Entry | None:
        """The recorded call, or None."""
        return self._entries.get(tool_call_id)

    def __len__(self) -> int:
        return len(self._entries)

    def started(self, tool_call_id: str, arguments_sha256: str) -> None:
        """Note that the call is about to run."""
        self._write(Entry(tool_call_id, arguments_sha256, STARTED))

    def done(
        self, tool_call_id: str, arguments_sha256: str, result: ToolResult, duration_seconds: float
    ) -> Entry:
        """Record the call's result."""
        entry = Entry(tool_call_id, arguments_sha256, DONE, result, duration_seconds)
        self._write(entry)
        return entry

    def clear(self) -> None:
        """Forget everything (the workspace is being deleted)."""
        for tool_call_id in list(self._entries):
            with contextlib.suppress(OSError):
                os.unlink(self._path(tool_call_id))
        self._entries.clear()

    def _write(self, entry: Entry) -> None:
        path = self._path(entry.tool_call_id)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(_entry_to_json(entry), f, separators=(",", ":"))
            os.replace(tmp, path)
        except OSError:
            # The record is a safety net: a full disk must not fail the call itself.
            log.warning("could not record call %s", entry.tool_call_id, exc_info=True)
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._entries.pop(entry.tool_call_id, None)
        self._entries[entry.tool_call_id] = entry
        while len(self._entries) > self._max:
            old_id, _ = self._entries.popitem(last=False)
            with contextlib.suppress(OSError):
                os.unlink(self._path(old_id))


def _entry_to_json(entry: Entry) -> dict[str, Any]:
    data: dict[str, Any] = {
        "id": entry.tool_call_id,
        "sha": entry.arguments_sha256,
        "state": entry.state,
        "t": time.time(),
    }
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
