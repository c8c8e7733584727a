"""The local driver: each workspace's agent in a sandbox on this toolexec host.

Layout under ``AGENTPLANE_WORKSPACES_DIR``:

- ``<id>/`` — the workspace root (the sandbox's /workspace), owned by the workspace user;
- ``.agents/<id>/state/`` — the agent's record of recent calls (outside the root);
- ``.agents/<id>/agent.json`` — the agent's pid and start time, and whether it has network;
- ``.agents/<id>/agent.log`` — what the agent logs;
- ``.sock/agent.sock`` — the Unix socket agents dial (the only thing of toolexec a sandbox sees).

Agents are started detached: they outlive a toolexec restart, and so do their background
processes. A workspace whose agent is gone (host reboot, crash) gets a new agent, with a new
token, the next time a call needs it. Template filling runs in a one-shot sandbox too.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shlex
import shutil
import signal
import sys
from typing import Any

from services.agent import reaper
from services.agent.processes import ProcessLimits
from services.toolexec import netns
from services.toolexec.driver import TokenIssuer, WorkspaceFillError
from services.toolexec.sandbox import (
    SOCKET_MOUNT,
    SOCKET_NAME,
    STATE_MOUNT,
    TEMPLATE_MOUNT,
    WORKSPACE_MOUNT,
    Sandbox,
    bwrap_argv,
    environment,
    privilege_drop,
)
from services.toolexec.templates import DirectoryFill, GitFill, PodSettings, TemplateFill

log = logging.getLogger(__name__)

FILL_TIMEOUT_SECONDS = 600.0
AGENTS_DIRNAME = ".agents"
SOCKET_DIRNAME = ".sock"
_REMOTE_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://|^[^/]+@[^/]+:|^[^/:]+:[^/]")


class LocalDriver:
    """Agents in sandboxes on this host, started and stopped by toolexec."""

    name = "local"

    def __init__(self, workspaces_dir: str, sandbox: Sandbox, limits: ProcessLimits | None = None) -> None:
        self._dir = os.path.realpath(workspaces_dir)
        self.sandbox = sandbox
        os.makedirs(self._dir, exist_ok=True)
        os.makedirs(os.path.join(self._dir, AGENTS_DIRNAME), mode=0o711, exist_ok=True)
        self.socket_dir = os.path.join(self._dir, SOCKET_DIRNAME)
        os.makedirs(self.socket_dir, mode=0o755, exist_ok=True)
        os.chmod(self.socket_dir, 0o755)
        self._issue_token: TokenIssuer | None = None
        lim = limits or ProcessLimits()
        self._limits = f"{lim.cpu_seconds}:{lim.file_size_bytes}:{lim.open_files}:{lim.processes}"
        self._children: dict[str, asyncio.subprocess.Process] = {}
        self._starting: dict[str, asyncio.Lock] = {}
        self._reapers: set[asyncio.Task[None]] = set()

    @property
    def socket_path(self) -> str:
        """The Unix socket toolexec listens on for this host's agents."""
        return os.path.join(self.socket_dir, SOCKET_NAME)

    def set_token_issuer(self, issue: TokenIssuer) -> None:
        """How the driver gets a fresh token when it must start an agent again."""
        self._issue_token = issue

    def path_of(self, workspace_id: str) -> str:
        """The workspace root on this host (ids are validated by the caller: no slashes, no dots)."""
        return os.path.join(self._dir, workspace_id)

    def agent_dir(self, workspace_id: str) -> str:
        """Where the agent's state, pid and log live on this host."""
        return os.path.join(self._dir, AGENTS_DIRNAME, workspace_id)

    async def start(self) -> None:
        """Nothing to sweep: agents of earlier runs keep running and reconnect by themselves."""

    async def create(
        self,
        workspace_id: str,
        fill: TemplateFill | None,
        token: str,
        network: bool,
        *,
        pod: PodSettings | None = None,
    ) -> None:
        """Make the directories, fill the root in a sandbox, start the agent (`pod` is not ours)."""
        await asyncio.to_thread(self._make_dirs, workspace_id, network)
        if fill is not None:
            await self._fill(workspace_id, fill)
        await self._start_agent(workspace_id, token)

    def _make_dirs(self, workspace_id: str, network: bool) -> None:
        root = self.path_of(workspace_id)
        agent_dir = self.agent_dir(workspace_id)
        # Without namespaces (`user` mode) only the workspace's own uid may enter its directory.
        os.mkdir(root, 0o700 if self.sandbox.mode == "user" else 0o755)
        os.makedirs(os.path.join(agent_dir, "state"), mode=0o700, exist_ok=True)
        if self.sandbox.drops_privileges():
            uid, gid = self.sandbox.ids_for(workspace_id)
            for path in (root, os.path.join(agent_dir, "state")):
                os.chown(path, uid, gid)
        self._write_info(workspace_id, {"network": network})

    def _adopt_files(self, workspace_id: str) -> None:
        """Give the workspace's files to its uid when they belong to another one: workspaces made
        before each had its own uid (all ran as 65534) keep working after an upgrade."""
        if not self.sandbox.drops_privileges():
            return
        uid, gid = self.sandbox.ids_for(workspace_id)
        root = self.path_of(workspace_id)
        state = os.path.join(self.agent_dir(workspace_id), "state")
        if os.stat(root).st_uid == uid:
            return
        # Called right after kill_agent: nothing of the workspace runs (its agent was the sandbox's
        # pid 1), so no directory can be swapped for a symlink under the walk; lchown never follows.
        log.info(
            "giving a workspace's files to its own uid", extra={"workspace_id": workspace_id, "uid": uid}
        )
        for top in (root, state):
            if not os.path.isdir(top):
                continue
            os.lchown(top, uid, gid)
            for dirpath, dirnames, filenames in os.walk(top):
                for name in dirnames + filenames:
                    os.lchown(os.path.join(dirpath, name), uid, gid)

    def _info_path(self, workspace_id: str) -> str:
        return os.path.join(self.agent_dir(workspace_id), "agent.json")

    def _read_info(self, workspace_id: str) -> dict[str, Any]:
        try:
            with open(self._info_path(workspace_id)) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_info(self, workspace_id: str, info: dict[str, Any]) -> None:
        path = self._info_path(workspace_id)
        with open(path + ".tmp", "w") as f:
            json.dump(info, f)
        os.replace(path + ".tmp", path)

    def agent_pid(self, workspace_id: str) -> int | None:
        """The pid of the workspace's running agent (its sandbox), or None."""
        info = self._read_info(workspace_id)
        pid, started = info.get("pid"), info.get("start_time")
        if not isinstance(pid, int) or not isinstance(started, int):
            return None
        return pid if _start_time(pid) == started else None

    async def ensure_agent(self, workspace_id: str) -> None:
        """Start the agent if its process is gone (it reconnects by itself otherwise)."""
        if not os.path.isdir(self.path_of(workspace_id)):  # noqa: ASYNC240 (one stat)
            return
        lock = self._starting.setdefault(workspace_id, asyncio.Lock())
        async with lock:
            if self.agent_pid(workspace_id) is not None or self._issue_token is None:
                return
            log.info("starting the workspace agent again", extra={"workspace_id": workspace_id})
            await self._start_agent(workspace_id, await self._issue_token(workspace_id))

    def _wants_network(self, workspace_id: str) -> bool:
        """Whether the workspace's sandbox gets (slirp4netns) network: bwrap mode and the template asks."""
        return self.sandbox.mode == "bwrap" and bool(self._read_info(workspace_id).get("network"))

    def _resolv_conf(self, workspace_id: str) -> str:
        path = os.path.join(self.agent_dir(workspace_id), "resolv.conf")
        with open(path, "w") as f:
            f.write(netns.RESOLV_CONF)
        os.chmod(path, 0o644)
        return path

    def agent_argv(self, workspace_id: str, info_fd: int | None = None) -> list[str]:
        """The full command that starts the workspace's agent in its sandbox."""
        network = self._wants_network(workspace_id)
        python = [sys.executable, "-I", "-m", "services.agent"]
        if self.sandbox.mode == "bwrap":
            prefix = bwrap_argv(
                self.sandbox,
                workspace=self.path_of(workspace_id),
                network=network,
                state=os.path.join(self.agent_dir(workspace_id), "state"),
                socket_dir=self.socket_dir,
                env={**environment(), "AGENTPLANE_AGENT_RLIMITS": self._limits},
                info_fd=info_fd,
                resolv_conf=self._resolv_conf(workspace_id) if network else None,
            )
            url, root, state = f"unix://{SOCKET_MOUNT}/{SOCKET_NAME}", WORKSPACE_MOUNT, STATE_MOUNT
        else:
            prefix = []
            url = f"unix://{self.socket_path}"
            root, state = self.path_of(workspace_id), os.path.join(self.agent_dir(workspace_id), "state")
        args = [
            "--url",
            url,
            "--workspace",
            workspace_id,
            "--root",
            root,
            "--state-dir",
            state,
            "--token-stdin",
        ]
        return [*prefix, *privilege_drop(self.sandbox, workspace_id), *python, *args]

    async def _start_agent(self, workspace_id: str, token: str) -> None:
        network = self._wants_network(workspace_id)
        if network:
            netns.require()
        # A sandbox left by an earlier agent (and its network) goes before a new one starts.
        await asyncio.to_thread(self.kill_agent, workspace_id)
        await asyncio.to_thread(self._adopt_files, workspace_id)
        info_read, info_write = os.pipe() if network else (-1, -1)
        argv = self.agent_argv(workspace_id, info_write if network else None)
        log_path = os.path.join(self.agent_dir(workspace_id), "agent.log")
        env = environment(WORKSPACE_MOUNT if self.sandbox.mode == "bwrap" else self.path_of(workspace_id))
        env["AGENTPLANE_AGENT_RLIMITS"] = self._limits  # the agent takes it out of its environment
        try:
            with open(log_path, "ab") as log_file:  # noqa: ASYNC230 (open for append: no wait)
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.PIPE,
                    stdout=log_file,
                    stderr=log_file,
                    env=env,
                    cwd=self.path_of(workspace_id),
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=(info_write,) if network else (),
                )
        finally:
            if network:
                os.close(info_write)
        info = self._read_info(workspace_id)
        info.update(pid=proc.pid, start_time=_start_time(proc.pid), net_pid=None, net_start_time=None)
        await asyncio.to_thread(self._write_info, workspace_id, info)
        self._children[workspace_id] = proc
        task = asyncio.create_task(self._reap(workspace_id, proc))
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)
        if network:
            slirp = await netns.connect(await netns.read_child_pid(info_read), log_path)
            info.update(net_pid=slirp.pid, net_start_time=_start_time(slirp.pid))
            await asyncio.to_thread(self._write_info, workspace_id, info)
        assert proc.stdin is not None
        proc.stdin.write(token.encode() + b"\n")
        with contextlib.suppress(ConnectionError):
            await proc.stdin.drain()
        proc.stdin.close()
        self._children[workspace_id] = proc
        task = asyncio.create_task(self._reap(workspace_id, proc))
        self._reapers.add(task)
        task.add_done_callback(self._reapers.discard)

    async def _reap(self, workspace_id: str, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if self._children.get(workspace_id) is proc:
            del self._children[workspace_id]
        log.info("workspace agent exited", extra={"workspace_id": workspace_id, "exit_code": code})

    async def _fill(self, workspace_id: str, fill: TemplateFill) -> None:
        # HOME on the sandbox's own /tmp: git's global config (below) lives and dies with it.
        env = {**environment(), "HOME": "/tmp"}
        template: str | None = None
        extra_ro: list[str] = []
        network = False
        if isinstance(fill, DirectoryFill):
            if not os.path.isdir(fill.path):  # noqa: ASYNC240 (one stat)
                raise WorkspaceFillError(
                    f"template directory {fill.path!r} does not exist on the toolexec host"
                )
            template = os.path.realpath(fill.path)  # noqa: ASYNC240
            copy = ["cp", "-a", "--no-preserve=ownership", f"{TEMPLATE_MOUNT}/.", f"{WORKSPACE_MOUNT}/"]
            commands = [copy]
            what = f"copying template directory {fill.path!r}"
        else:
            assert isinstance(fill, GitFill)
            if _REMOTE_URL.match(fill.url):
                network = True
            elif os.path.exists(fill.url):  # noqa: ASYNC240
                extra_ro.append(self._local_repository(fill))
            # The workspace user reads a local template repository owned by someone else; git's
            # local transport drops GIT_CONFIG_* from the environment, so a global config it is.
            commands = [
                ["git", "config", "--global", "safe.directory", "*"],
                ["git", "clone", "--quiet", "--", fill.url, WORKSPACE_MOUNT],
            ]
            if fill.ref:
                commands.append(["git", "-C", WORKSPACE_MOUNT, "checkout", "--quiet", fill.ref, "--"])
            what = f"git clone of {fill.url!r}" + (f" at {fill.ref!r}" if fill.ref else "")
        script = " && ".join(shlex.join(command) for command in commands)
        await self._run_sandboxed(workspace_id, ["sh", "-c", script], env, template, extra_ro, network, what)

    def _local_repository(self, fill: GitFill) -> str:
        """The real path of a local template repository, which must not reach what it may not."""
        real = os.path.realpath(fill.url)
        if fill.local_root and not _inside(real, os.path.realpath(fill.local_root)):
            raise WorkspaceFillError(
                f"the template's parameters lead its git path outside {fill.local_root!r}; "
                "give a repository name inside it"
            )
        if _inside(real, self._dir):
            raise WorkspaceFillError("a template cannot clone from the workspaces directory")
        return real

    async def _run_sandboxed(
        self,
        workspace_id: str,
        command: list[str],
        env: dict[str, str],
        template: str | None,
        extra_ro: list[str],
        network: bool,
        what: str,
    ) -> None:
        root = self.path_of(workspace_id)
        network = network and self.sandbox.mode == "bwrap"
        if network:
            try:
                netns.require()
            except netns.NetworkUnavailable as exc:
                raise WorkspaceFillError(f"{what} needs the network: {exc}") from None
        info_read, info_write = os.pipe() if network else (-1, -1)
        if self.sandbox.mode == "bwrap":
            prefix = bwrap_argv(
                self.sandbox,
                workspace=root,
                network=network,
                template=template,
                extra_ro=extra_ro,
                env=env,
                info_fd=info_write if network else None,
                resolv_conf=self._resolv_conf(workspace_id) if network else None,
            )
        else:
            prefix = []
            mapping = {WORKSPACE_MOUNT: root, TEMPLATE_MOUNT: template or TEMPLATE_MOUNT}
            command = [_unmount(arg, mapping) for arg in command]
        if network:
            # The command starts once its network is up (a line on stdin says so).
            command = ["sh", "-c", 'read _up && exec "$@"', "fill", *command]
        try:
            proc = await asyncio.create_subprocess_exec(
                *prefix,
                *privilege_drop(self.sandbox, workspace_id),
                *command,
                cwd=root,
                env=env,
                stdin=asyncio.subprocess.PIPE if network else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                pass_fds=(info_write,) if network else (),
            )
        finally:
            if network:
                os.close(info_write)
        slirp = None
        if network:
            log_path = os.path.join(self.agent_dir(workspace_id), "agent.log")
            try:
                slirp = await netns.connect(await netns.read_child_pid(info_read), log_path)
            except netns.NetworkUnavailable as exc:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
                raise WorkspaceFillError(f"{what} failed: {exc}") from None
            assert proc.stdin is not None
            proc.stdin.write(b"up\n")
            proc.stdin.close()
        try:
            return await self._finish_fill(proc, what)
        finally:
            if slirp is not None:
                with contextlib.suppress(ProcessLookupError):
                    slirp.kill()
                await slirp.wait()

    async def _finish_fill(self, proc: asyncio.subprocess.Process, what: str) -> None:
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), FILL_TIMEOUT_SECONDS)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise WorkspaceFillError(f"{what} took longer than {FILL_TIMEOUT_SECONDS:g} s") from None
        if proc.returncode != 0:
            message = out.decode("utf-8", errors="replace").strip()[-2000:]
            raise WorkspaceFillError(f"{what} failed (exit {proc.returncode}): {message}")

    async def delete(self, workspace_id: str) -> None:
        """Kill the sandbox with everything in it (detached, double-forked processes too), remove it."""
        await asyncio.to_thread(self.kill_agent, workspace_id)
        proc = self._children.pop(workspace_id, None)
        if proc is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 10)
        await asyncio.to_thread(_remove_tree, self.path_of(workspace_id))
        await asyncio.to_thread(_remove_tree, self.agent_dir(workspace_id))

    def kill_agent(self, workspace_id: str) -> int:
        """SIGKILL the agent and every descendant (all of the sandbox) and its network; returns how many."""
        return _kill_recorded(self._read_info(workspace_id))

    def kill_all_agents(self) -> int:
        """Kill every agent of this workspaces directory."""
        return kill_agents(self._dir)

    async def close(self) -> None:
        """Agents keep running (they reconnect to the next toolexec); nothing to release."""


def kill_agents(workspaces_dir: str) -> int:
    """Kill every agent (and all it runs) of a workspaces directory: `agentplane up` on its way out,
    benchmarks and tests. Returns how many processes were killed."""
    base = os.path.join(workspaces_dir, AGENTS_DIRNAME)
    killed = 0
    for workspace_id in os.listdir(base) if os.path.isdir(base) else []:
        try:
            with open(os.path.join(base, workspace_id, "agent.json")) as f:
                info = json.load(f)
        except (OSError, ValueError):
            continue
        killed += _kill_recorded(info)
    return killed


def _kill_recorded(info: dict[str, Any]) -> int:
    """Kill the sandbox and the slirp4netns an agent.json names (checked against their start times)."""
    killed = 0
    for pid_key, start_key in (("pid", "start_time"), ("net_pid", "net_start_time")):
        pid, started = info.get(pid_key), info.get(start_key)
        if isinstance(pid, int) and isinstance(started, int) and _start_time(pid) == started:
            killed += _kill_tree(pid)
    return killed


def _kill_tree(pid: int | None) -> int:
    if pid is None:
        return 0
    # Stop the agent first so it starts nothing new, then everything below it (in a sandbox the
    # PID namespace dies with its first process anyway).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGSTOP)
    killed = reaper.kill_descendants(pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
        killed += 1
    return killed


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _unmount(arg: str, mapping: dict[str, str]) -> str:
    for inside, outside in mapping.items():
        if arg == inside or arg.startswith(inside + "/"):
            return outside + arg[len(inside) :]
    return arg


def _start_time(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            raw = f.read()
    except OSError:
        return -1
    return int(raw[raw.rfind(")") + 2 :].split()[19])


def _remove_tree(path: str) -> None:
    def onerror(func: Any, p: str, exc: Any) -> None:
        # A read-only directory inside (e.g. Go's module cache) blocks removal: open it up and retry.
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)

    if os.path.lexists(path):
        shutil.rmtree(path, onerror=onerror)
