"""Processes started by tools: each in its own session, bounded, tracked per workspace, killable.

Every command runs as ``sh -c`` in a new session (so its process group is its own and a
signal reaches every descendant), with rlimits set by a tiny shell prologue (``ulimit``) so
the spawn keeps the fast vfork path (a Python ``preexec_fn`` would force a full fork of the
service). Each live process group is recorded as a file under ``<workspaces>/.processes``;
a service restarted after a crash kills whatever those records still name, so no process
outlives the service that started it for longer than a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from services.agent.output import OUTPUT_LIMIT_BYTES, CappedOutput, RenderedOutput

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessLimits:
    """rlimits applied to every process a tool starts (0 means: leave the inherited limit)."""

    cpu_seconds: int = 3600
    file_size_bytes: int = 1024 * 1024 * 1024
    open_files: int = 1024
    processes: int = 512


READ_CHUNK = 64 * 1024
# Environment variables passed through to commands; everything else (the service's own
# secrets, database URLs, provider keys) is dropped.
PASSTHROUGH_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "USER", "LOGNAME", "TMPDIR")
NON_INTERACTIVE_ENV = {
    "PAGER": "cat",
    "GIT_PAGER": "cat",
    "GIT_TERMINAL_PROMPT": "0",
    "TERM": "dumb",
    "NO_COLOR": "1",
    "CI": "1",
    "DEBIAN_FRONTEND": "noninteractive",
}


def command_environment(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of every command: a few harmless variables plus non-interactive settings."""
    env = os.environ if base is None else base
    out = {k: env[k] for k in PASSTHROUGH_ENV if k in env}
    out.setdefault("PATH", "/usr/local/bin:/usr/bin:/bin")
    out.update(NON_INTERACTIVE_ENV)
    return out


def _processes_flag() -> str:
    """The `ulimit` flag for the process-count limit: dash calls it -p, bash and others -u."""
    try:
        done = subprocess.run(["sh", "-c", "ulimit -p"], capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "-u"
    return "-p" if done.returncode == 0 and done.stdout.strip() else "-u"


def limits_prologue(limits: ProcessLimits, processes_flag: str) -> str:
    """Shell text that applies `limits` (soft and hard) and then runs "$1" in a fresh sh."""
    parts = []
    if limits.cpu_seconds:
        parts.append(f"ulimit -t {limits.cpu_seconds}")
    if limits.file_size_bytes:
        # sh counts file size in 512-byte blocks.
        parts.append(f"ulimit -f {max(1, limits.file_size_bytes // 512)}")
    if limits.open_files:
        parts.append(f"ulimit -n {limits.open_files}")
    if limits.processes:
        parts.append(f"ulimit {processes_flag} {limits.processes}")
    setup = " && ".join(parts)
    failure = "{ echo 'workspace agent: could not apply resource limits' >&2; exit 126; }"
    return (f"{setup} || {failure}; " if setup else "") + 'exec sh -c "$1"'


@dataclass
class ManagedProcess:
    """A command started by `execute`, with its bounded output."""

    id: str
    workspace_id: str
    command: str
    workdir: str
    proc: asyncio.subprocess.Process
    started_at: float
    started_monotonic: float
    output: CappedOutput = field(default_factory=CappedOutput)
    exit_code: int | None = None
    ended_monotonic: float | None = None
    background: bool = False
    eof: asyncio.Event = field(default_factory=asyncio.Event)
    exited: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    record_path: str | None = None
    # Output bytes already shown in a result: process_output waits for more than this.
    seen_bytes: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # Called with each chunk of output as it arrives (execute streams its output to toolexec).
    listeners: list[Callable[[bytes], None]] = field(default_factory=list)

    @property
    def pid(self) -> int:
        """The pid of the `sh` leading the process group (also the group and session id)."""
        return self.proc.pid

    @property
    def running(self) -> bool:
        """True until the leading `sh` has exited."""
        return self.exit_code is None

    def duration(self) -> float:
        """Seconds from start to exit (or to now, while running)."""
        end = self.ended_monotonic if self.ended_monotonic is not None else time.monotonic()
        return end - self.started_monotonic

    def render(self) -> RenderedOutput:
        """The output so far, capped."""
        return self.output.render()


class ProcessManager:
    """Starts, tracks, signals and reaps the processes of every workspace on this host."""

    def __init__(
        self,
        records_dir: str,
        limits: ProcessLimits,
        *,
        max_finished_per_workspace: int = 100,
        output_limit: int = OUTPUT_LIMIT_BYTES,
    ) -> None:
        self._records_dir = records_dir
        os.makedirs(records_dir, exist_ok=True)
        self._prologue = limits_prologue(limits, _processes_flag())
        self._env = command_environment()
        self._max_finished = max_finished_per_workspace
        self._output_limit = output_limit
        self._by_workspace: dict[str, dict[str, ManagedProcess]] = {}
        self._counter = itertools.count(1)

    async def start(self, workspace_id: str, command: str, cwd: str, workdir: str) -> ManagedProcess:
        """Start `command` with ``sh -c`` in `cwd`, in a new session, reading its output."""
        proc = await asyncio.create_subprocess_exec(
            "sh",
            "-c",
            self._prologue,
            "sh",
            command,
            cwd=cwd,
            env={**self._env, "PWD": cwd},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            close_fds=True,
        )
        process_id = f"p{next(self._counter)}-{secrets.token_hex(3)}"
        managed = ManagedProcess(
            id=process_id,
            workspace_id=workspace_id,
            command=command,
            workdir=workdir,
            proc=proc,
            started_at=time.time(),
            started_monotonic=time.monotonic(),
            output=CappedOutput(self._output_limit),
        )
        managed.record_path = self._write_record(managed)
        self._by_workspace.setdefault(workspace_id, {})[process_id] = managed
        managed.tasks.append(asyncio.create_task(self._read(managed)))
        managed.tasks.append(asyncio.create_task(self._wait(managed)))
        return managed

    async def _read(self, managed: ManagedProcess) -> None:
        stream = managed.proc.stdout
        assert stream is not None
        try:
            while True:
                chunk = await stream.read(READ_CHUNK)
                if not chunk:
                    break
                managed.output.append(chunk)
                managed.changed.set()
                for listener in list(managed.listeners):
                    listener(chunk)
        finally:
            managed.eof.set()
            managed.changed.set()
            self._maybe_forget_record(managed)

    async def _wait(self, managed: ManagedProcess) -> None:
        code = await managed.proc.wait()
        managed.exit_code = code
        managed.ended_monotonic = time.monotonic()
        managed.exited.set()
        managed.changed.set()
        self._maybe_forget_record(managed)

    def _write_record(self, managed: ManagedProcess) -> str | None:
        start = _start_time(managed.pid)
        path = os.path.join(self._records_dir, str(managed.pid))
        try:
            with open(path, "w") as f:
                f.write(f"{managed.workspace_id} {start}\n")
        except OSError:
            log.warning("could not record process group %s", managed.pid, exc_info=True)
            return None
        return path

    def _maybe_forget_record(self, managed: ManagedProcess) -> None:
        # The group may outlive its leader (background children keep the pipe open): the
        # record goes only when the leader has exited and nobody holds the output pipe.
        if managed.exited.is_set() and managed.eof.is_set() and managed.record_path:
            with contextlib.suppress(OSError):
                os.unlink(managed.record_path)
            managed.record_path = None

    def pids(self) -> set[int]:
        """The pids of the commands this manager started and waits for."""
        return {p.pid for ws in self._by_workspace.values() for p in ws.values()}

    def get(self, workspace_id: str, process_id: str) -> ManagedProcess | None:
        """The process `process_id` of `workspace_id`, or None."""
        return self._by_workspace.get(workspace_id, {}).get(process_id)

    def list_background(self, workspace_id: str) -> list[ManagedProcess]:
        """The workspace's background processes (running, and recently finished), oldest first."""
        return [p for p in self._by_workspace.get(workspace_id, {}).values() if p.background]

    def mark_background(self, managed: ManagedProcess) -> None:
        """Keep a process listed after its call returned (timeout or run_in_background)."""
        managed.background = True
        self._evict_finished(managed.workspace_id)

    def forget(self, managed: ManagedProcess) -> None:
        """Drop a foreground process whose call has returned with its full result."""
        self._by_workspace.get(managed.workspace_id, {}).pop(managed.id, None)
        if not managed.eof.is_set() or not managed.exited.is_set():
            # Still alive or still holding the pipe: keep it listed so it can be killed.
            managed.background = True
            self._by_workspace.setdefault(managed.workspace_id, {})[managed.id] = managed

    def _evict_finished(self, workspace_id: str) -> None:
        procs = self._by_workspace.get(workspace_id, {})
        finished = [p for p in procs.values() if not p.running and p.eof.is_set()]
        for p in finished[: max(0, len(finished) - self._max_finished)]:
            procs.pop(p.id, None)

    def signal(self, managed: ManagedProcess, sig: signal.Signals) -> bool:
        """Send `sig` to the whole process group; False when the group is already gone."""
        try:
            os.killpg(managed.pid, sig)
        except ProcessLookupError:
            return False
        except PermissionError:
            return False
        return True

    async def kill_workspace(self, workspace_id: str) -> None:
        """SIGKILL every process group of the workspace and wait (bounded) for them to go."""
        procs = list(self._by_workspace.pop(workspace_id, {}).values())
        await self._kill(procs)

    async def close(self) -> None:
        """SIGKILL every process of every workspace (service shutdown)."""
        procs = [p for ws in self._by_workspace.values() for p in ws.values()]
        self._by_workspace.clear()
        await self._kill(procs)

    async def _kill(self, procs: list[ManagedProcess]) -> None:
        for p in procs:
            self.signal(p, signal.SIGKILL)
        for p in procs:
            # The pipe closes when the last process of the group has died.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(p.exited.wait(), p.eof.wait()), timeout=5)
            for task in p.tasks:
                task.cancel()
            self._maybe_forget_record(p)

    def sweep_leftovers(self) -> int:
        """Kill process groups recorded by a previous run of the service that crashed; returns how many."""
        killed = 0
        try:
            names = os.listdir(self._records_dir)
        except FileNotFoundError:
            return 0
        for name in names:
            path = os.path.join(self._records_dir, name)
            try:
                with open(path) as f:
                    _ws, start = f.read().split()
                sid = int(name)
                recorded_start = int(start)
            except (OSError, ValueError):
                with contextlib.suppress(OSError):
                    os.unlink(path)
                continue
            for pid in _session_members(sid, recorded_start):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
            with contextlib.suppress(OSError):
                os.unlink(path)
        return killed


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return None
    # Fields after the command name, which is in parentheses and may contain spaces.
    return raw[raw.rfind(")") + 2 :].split()


def _start_time(pid: int) -> int:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else 0


def _session_members(sid: int, recorded_start: int) -> list[int]:
    """Pids in session `sid` started no earlier than the recorded leader (so not a reused id)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        # fields[3] is the session id, fields[19] the start time in clock ticks since boot.
        if fields and int(fields[3]) == sid and int(fields[19]) >= recorded_start:
            members.append(int(entry))
    return members
