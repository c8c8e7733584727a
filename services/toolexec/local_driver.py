"""The local workspace driver: a directory per workspace on this host, processes run here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from typing import Any

from services.agent.processes import ProcessManager, command_environment
from services.agent.tools import exec as exec_tools
from services.agent.tools import files
from services.agent.tools.base import ToolError, ToolResult
from services.agent.tools.exec import ExecContext
from services.common.errors import FailedPrecondition
from services.toolexec.driver import WorkspaceFillError
from services.toolexec.settings import ToolexecSettings
from services.toolexec.templates import DirectoryFill, GitFill, TemplateFill

log = logging.getLogger(__name__)

GIT_TIMEOUT_SECONDS = 600.0
RECORDS_DIRNAME = ".processes"

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


class LocalDriver:
    """Workspaces as directories under ``AGENTPLANE_WORKSPACES_DIR/<id>``."""

    def __init__(self, settings: ToolexecSettings) -> None:
        self._dir = os.path.realpath(settings.workspaces_dir)
        os.makedirs(self._dir, exist_ok=True)
        self.processes = ProcessManager(
            os.path.join(self._dir, RECORDS_DIRNAME),
            settings.limits,
            max_finished_per_workspace=settings.max_finished_processes,
        )

    def path_of(self, workspace_id: str) -> str:
        """The directory of a workspace (ids are validated by the caller: no slashes, no dots)."""
        return os.path.join(self._dir, workspace_id)

    async def start(self) -> None:
        """Kill processes a crashed predecessor left behind."""
        killed = await asyncio.to_thread(self.processes.sweep_leftovers)
        if killed:
            log.warning("killed processes left by a previous run", extra={"killed": killed})

    async def create(self, workspace_id: str, fill: TemplateFill | None) -> None:
        """Create the directory and fill it from the template."""
        path = self.path_of(workspace_id)
        await asyncio.to_thread(os.mkdir, path, 0o755)
        if isinstance(fill, DirectoryFill):
            await asyncio.to_thread(_copy_directory, fill.path, path)
        elif isinstance(fill, GitFill):
            await _git_clone(fill, path)

    async def delete(self, workspace_id: str) -> None:
        """Kill the workspace's processes, then remove its directory."""
        await self.processes.kill_workspace(workspace_id)
        path = self.path_of(workspace_id)
        await asyncio.to_thread(_remove_tree, path)

    async def run_tool(
        self, workspace_id: str, name: str, args: dict[str, Any], max_seconds: float | None
    ) -> ToolResult:
        """Run a validated tool call in the workspace directory."""
        path = self.path_of(workspace_id)
        try:
            root_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise FailedPrecondition(
                f"workspace {workspace_id} has no directory on this host", reason="WORKSPACE_MISSING"
            ) from None
        try:
            root = files.Root(root_fd, path)
            try:
                file_tool = FILE_TOOLS.get(name)
                if file_tool is not None:
                    return await asyncio.to_thread(file_tool, root, args)
                ctx = ExecContext(workspace_id, root, self.processes, max_seconds)
                return await EXEC_TOOLS[name](ctx, args)
            except ToolError as exc:
                return exc.to_result()
            except OSError as exc:
                # An OS refusal the model can react to (permissions, disk full, name too long, ...).
                return ToolError(
                    f"{name} failed: {exc.strerror or exc}. Check the path and arguments and try again.",
                    code="os_error",
                ).to_result()
        finally:
            os.close(root_fd)

    async def close(self) -> None:
        """Kill every process of every workspace."""
        await self.processes.close()


def _copy_directory(source: str, dest: str) -> None:
    if not os.path.isdir(source):
        raise WorkspaceFillError(f"template directory {source!r} does not exist on the toolexec host")
    try:
        # Symlinks are copied as links (never followed), so a template cannot pull in outside files.
        shutil.copytree(source, dest, symlinks=True, dirs_exist_ok=True)
    except (OSError, shutil.Error) as exc:
        raise WorkspaceFillError(f"copying template directory {source!r} failed: {exc}") from None


async def _git_clone(fill: GitFill, dest: str) -> None:
    await _git(["clone", "--quiet", "--", fill.url, dest], cwd=None, what=f"git clone of {fill.url!r}")
    if fill.ref:
        await _git(["checkout", "--quiet", fill.ref, "--"], cwd=dest, what=f"git checkout of {fill.ref!r}")


async def _git(argv: list[str], cwd: str | None, what: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "git",
        *argv,
        cwd=cwd,
        env=command_environment(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), GIT_TIMEOUT_SECONDS)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        await proc.wait()
        raise WorkspaceFillError(f"{what} took longer than {GIT_TIMEOUT_SECONDS:g} s") from None
    if proc.returncode != 0:
        message = out.decode("utf-8", errors="replace").strip()[-2000:]
        raise WorkspaceFillError(f"{what} failed (exit {proc.returncode}): {message}")


def _remove_tree(path: str) -> None:
    def onerror(func: Any, p: str, exc: Any) -> None:
        # A read-only directory inside (e.g. Go's module cache) blocks removal: open it up and retry.
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=onerror)
