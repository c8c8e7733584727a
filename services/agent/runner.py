"""Runs one validated tool call in the workspace root: the agent's dispatch table.

toolexec validates arguments against the schemas before a call reaches the agent; the
agent still turns every failure into an error result the model can act on.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

from services.agent.processes import ProcessManager
from services.agent.tools import exec as exec_tools
from services.agent.tools import files
from services.agent.tools.base import ToolError, ToolResult
from services.agent.tools.exec import ExecContext

log = logging.getLogger(__name__)

FileTool = Callable[[files.Root, dict[str, Any]], ToolResult]
ExecTool = Callable[[ExecContext, dict[str, Any]], Awaitable[ToolResult]]
FILE_TOOLS: dict[str, FileTool] = {
    "read_file": files.read_file,
    "write_file": files.write_file,
    "edit_files": files.edit_files,
}
EXEC_TOOLS: dict[str, ExecTool] = {
    "execute": exec_tools.execute,
    "process_output": exec_tools.process_output,
    "process_list": exec_tools.process_list,
    "process_signal": exec_tools.process_signal,
}
TOOL_NAMES = frozenset(FILE_TOOLS) | frozenset(EXEC_TOOLS)
# File tools carrying at most this much text run on the event loop, larger ones in a thread.
INLINE_PAYLOAD_BYTES = 64 * 1024


class ToolRunner:
    """The workspace's tools over one root directory and one process manager."""

    def __init__(self, root: str, processes: ProcessManager, workspace_id: str = "") -> None:
        self.root = os.path.normpath(root)
        self.processes = processes
        self.workspace_id = workspace_id

    async def run(
        self,
        name: str,
        args: dict[str, Any],
        max_seconds: float | None = None,
        on_output: Callable[[str], None] | None = None,
    ) -> ToolResult:
        """Run `name(args)`; every failure comes back as an error result, never an exception."""
        try:
            root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            return _root_error(self.root, exc).to_result()
        try:
            root = files.Root(root_fd, self.root)
            file_tool = FILE_TOOLS.get(name)
            if file_tool is not None:
                if name == "read_file" or _payload_bytes(args) <= INLINE_PAYLOAD_BYTES:
                    # Small file work runs on the loop: a thread hand-off costs more than it saves.
                    return file_tool(root, args)
                return await asyncio.to_thread(file_tool, root, args)
            exec_tool = EXEC_TOOLS.get(name)
            if exec_tool is None:
                return ToolError(
                    f"unknown tool {name!r}; the workspace agent runs {', '.join(sorted(TOOL_NAMES))}",
                    code="unknown_tool",
                ).to_result()
            ctx = ExecContext(self.workspace_id, root, self.processes, max_seconds, on_output)
            return await exec_tool(ctx, args)
        except ToolError as exc:
            return exc.to_result()
        except OSError as exc:
            # An OS refusal the model can react to (permissions, disk full, name too long, ...).
            return ToolError(
                f"{name} failed: {exc.strerror or exc}. Check the path and arguments and try again.",
                code="os_error",
            ).to_result()
        except Exception:
            log.exception("tool %s failed unexpectedly", name)
            return ToolError(
                f"{name} failed with an internal error in the workspace agent; it may have partly run. "
                "Check the workspace before retrying.",
                code="internal_error",
            ).to_result()
        finally:
            os.close(root_fd)


def _payload_bytes(args: dict[str, Any]) -> int:
    """About how much text a write or edit carries."""
    total = len(args.get("content", ""))
    for edit in args.get("edits", ()):
        if isinstance(edit, dict):
            total += len(edit.get("old_text", "")) + len(edit.get("new_text", ""))
    return total


def _root_error(root: str, exc: OSError) -> ToolError:
    if exc.errno == errno.ENOENT:
        return ToolError(
            f"the workspace directory {root} is gone; the workspace cannot run tools until it is recreated",
            code="workspace_missing",
        )
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        return ToolError(
            f"the workspace directory {root} was replaced by a symbolic link or a file; tools refuse to "
            "follow it. Restore it as a directory (or recreate the workspace).",
            code="workspace_root_replaced",
        )
    return ToolError(
        f"the workspace directory {root} cannot be opened: {exc.strerror or exc}", code="workspace_unusable"
    )
