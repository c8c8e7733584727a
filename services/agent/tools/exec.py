"""The process tools: execute, process_output, process_list, process_signal."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import signal
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from services.agent.confine import PathNotFound, resolve
from services.agent.processes import ManagedProcess, ProcessManager
from services.agent.tools.base import ToolError, ToolResult
from services.agent.tools.files import Root

DEFAULT_TIMEOUT_SECONDS = 10.0
MAX_TIMEOUT_SECONDS = 4 * 3600.0
MAX_WAIT_SECONDS = 600.0
# After the command's shell exits, how long to wait for the rest of its output: children it left
# in the background may hold the pipe open forever, so this is short.
DRAIN_SECONDS = 0.2


@dataclass(frozen=True)
class ExecContext:
    """What the process tools need: the workspace, its root, the process manager, a time cap."""

    workspace_id: str
    root: Root
    processes: ProcessManager
    max_seconds: float | None = None  # the CallTool request's timeout, when set
    # Receives execute's output as it comes, while the call waits for the command.
    on_output: Callable[[str], None] | None = None


def _cap(ctx: ExecContext, seconds: float) -> float:
    return min(seconds, ctx.max_seconds) if ctx.max_seconds is not None else seconds


async def execute(ctx: ExecContext, args: dict[str, Any]) -> ToolResult:
    """Run ``sh -c command``; on timeout the process keeps running in the background."""
    command: str = args["command"]
    try:
        command.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ToolError(
            f"the command is not valid UTF-8 (character {exc.start + 1} is an unpaired surrogate); "
            "write it as plain text.",
            code="command_not_utf8",
        ) from None
    timeout = _cap(ctx, float(args.get("timeout_seconds", DEFAULT_TIMEOUT_SECONDS)))
    workdir_arg: str = args.get("workdir") or "."
    cwd, workdir = await asyncio.to_thread(_resolve_workdir, ctx.root, workdir_arg)
    managed = await ctx.processes.start(ctx.workspace_id, command, cwd, workdir)
    if args.get("run_in_background", False):
        ctx.processes.mark_background(managed)
        return ToolResult(
            content=(
                f"started in the background as process {managed.id} (pid {managed.pid}). "
                f"Call process_output with process_id={managed.id!r} to see its output."
            ),
            structured={"process_id": managed.id, "pid": managed.pid, "running": True, "background": True},
        )
    listener = _output_listener(ctx.on_output) if ctx.on_output is not None else None
    if listener is not None:
        managed.listeners.append(listener)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(managed.exited.wait(), timeout)
    finally:
        if listener is not None:
            managed.listeners.remove(listener)
    if managed.running:
        ctx.processes.mark_background(managed)
        out = managed.render()
        managed.seen_bytes = out.total_bytes
        return ToolResult(
            content=(
                f"still running after {timeout:g} s, so it continues in the background as process "
                f"{managed.id}. Call process_output with process_id={managed.id!r} to wait for it, or "
                f"process_signal to stop it.\n{_output_block(out.text, out.truncated)}"
            ),
            structured={
                "process_id": managed.id,
                "pid": managed.pid,
                "running": True,
                "timed_out": True,
                "output": out.text,
                "truncated": out.truncated,
                "total_bytes": out.total_bytes,
            },
        )
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(managed.eof.wait(), DRAIN_SECONDS)
    ctx.processes.forget(managed)
    out = managed.render()
    code = managed.exit_code
    return ToolResult(
        content=f"exit code {code} in {managed.duration():.2f} s\n{_output_block(out.text, out.truncated)}",
        structured={
            "exit_code": code,
            "duration_seconds": round(managed.duration(), 4),
            "output": out.text,
            "truncated": out.truncated,
            "total_bytes": out.total_bytes,
            "running": False,
        },
        is_error=False,
    )


def _output_listener(send: Callable[[str], None]) -> Callable[[bytes], None]:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def listen(chunk: bytes) -> None:
        text = decoder.decode(chunk)
        if text:
            send(text)

    return listen


def _resolve_workdir(root: Root, workdir: str) -> tuple[str, str]:
    with resolve(root.fd, root.path, workdir) as res:
        if not res.exists:
            raise PathNotFound(workdir, res.relpath)
        if not stat.S_ISDIR(res.mode):
            raise ToolError(f"workdir {workdir!r} is not a directory; give a directory inside the workspace.")
        rel = res.relpath
    return (root.path if rel == "." else f"{root.path}/{rel}"), rel


def _output_block(text: str, truncated: bool) -> str:
    note = " (truncated: the middle was omitted)" if truncated else ""
    return f"output{note}:\n{text}" if text else "no output"


def _find(ctx: ExecContext, process_id: str) -> ManagedProcess:
    managed = ctx.processes.get(ctx.workspace_id, process_id)
    if managed is None:
        known = ", ".join(p.id for p in ctx.processes.list_background(ctx.workspace_id)) or "none"
        raise ToolError(
            f"no process {process_id!r} in this workspace (known: {known}). Process ids come from execute "
            "results; call process_list to see them.",
            code="process_not_found",
        )
    return managed


def _describe(managed: ManagedProcess) -> dict[str, Any]:
    return {
        "process_id": managed.id,
        "pid": managed.pid,
        "command": managed.command,
        "workdir": managed.workdir,
        "running": managed.running,
        "exit_code": managed.exit_code,
        "duration_seconds": round(managed.duration(), 3),
    }


async def process_output(ctx: ExecContext, args: dict[str, Any]) -> ToolResult:
    """Wait up to `wait_seconds` for the process to exit or print more, then return its output so far.

    "More" means output not shown in an earlier result, so a poll right after the output
    appeared returns at once instead of waiting for the next line.
    """
    managed = _find(ctx, args["process_id"])
    wait = _cap(ctx, float(args.get("wait_seconds", 0)))
    if wait > 0 and managed.running:
        seen = managed.seen_bytes
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while managed.running and managed.output.total_bytes == seen:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            managed.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(managed.changed.wait(), remaining)
    if not managed.running:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(managed.eof.wait(), DRAIN_SECONDS)
    out = managed.render()
    managed.seen_bytes = out.total_bytes
    state = "running" if managed.running else f"exited with code {managed.exit_code}"
    return ToolResult(
        content=f"process {managed.id} {state}\n{_output_block(out.text, out.truncated)}",
        structured={
            **_describe(managed),
            "output": out.text,
            "truncated": out.truncated,
            "total_bytes": out.total_bytes,
        },
    )


async def process_list(ctx: ExecContext, args: dict[str, Any]) -> ToolResult:
    """The workspace's background processes, running and recently finished."""
    procs = [_describe(p) for p in ctx.processes.list_background(ctx.workspace_id)]
    if not procs:
        return ToolResult(content="no background processes", structured={"processes": []})
    lines = [
        f"{p['process_id']}\t{'running' if p['running'] else 'exit ' + str(p['exit_code'])}\t{p['command']}"
        for p in procs
    ]
    return ToolResult(content="\n".join(lines), structured={"processes": procs})


async def process_signal(ctx: ExecContext, args: dict[str, Any]) -> ToolResult:
    """Send TERMINATE (SIGTERM) or KILL (SIGKILL) to the process's whole process group."""
    managed = _find(ctx, args["process_id"])
    sig = signal.SIGKILL if args["signal"] == "KILL" else signal.SIGTERM
    delivered = ctx.processes.signal(managed, sig)
    if delivered:
        # Give it a moment to go, so the result can say whether it did.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(managed.exited.wait(), 1.0)
    state = "running" if managed.running else f"exited with code {managed.exit_code}"
    what = f"sent {sig.name} to process group {managed.pid}" if delivered else "the process group was gone"
    return ToolResult(
        content=f"{what}; process {managed.id} is {state}",
        structured={**_describe(managed), "signal": args["signal"], "delivered": delivered},
    )
