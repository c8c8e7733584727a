"""Sandboxes for workspace agents on a toolexec host (the local driver).

Modes (``AGENTPLANE_WORKSPACE_SANDBOX``):

- ``bwrap`` — bubblewrap: own PID, mount, IPC, UTS (and, unless the template asks for it,
  network) namespaces; system directories read-only; the workspace writable at /workspace;
  its own /proc, /dev and /tmp; nothing else of the host (no data directory, no sockets but
  the agent socket, no control-plane process). As root, bwrap sets the sandbox up and the
  agent then runs as the unprivileged workspace user with no capabilities and no_new_privs;
  as any other user, bwrap runs unprivileged in a user namespace.
- ``user`` — no bubblewrap, toolexec is root: the agent runs as the workspace user. Files the
  control plane keeps readable by others are readable; processes share the host's namespaces.
- ``none`` — no isolation at all (an explicit choice: a trial on one's own machine).
- ``auto`` (default) — ``bwrap`` when it works here, else ``user`` as root, else unavailable:
  `agentplane serve toolexec` refuses to start, `agentplane up` warns and runs with ``none``.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

WORKSPACE_MOUNT = "/workspace"
STATE_MOUNT = "/run/agentplane/state"
SOCKET_MOUNT = "/run/agentplane/sock"
TEMPLATE_MOUNT = "/run/agentplane/template"
SOCKET_NAME = "agent.sock"
DEFAULT_WORKSPACE_UID = 65534
# Workspace uids (as root, `user` and `bwrap` modes): [base, base + span), one per workspace.
USER_MODE_UID_BASE = 1_000_000
USER_MODE_UID_SPAN = 1_000_000_000
MODES = ("auto", "bwrap", "user", "none")
INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: apt-get install bubblewrap; Fedora: dnf install bubblewrap) "
    "so each workspace runs in its own sandbox"
)
NOT_ISOLATED = (
    "workspace commands run WITHOUT a sandbox: they can read every file and process environment "
    "this user can, including the control plane's data directory"
)
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/local/sbin:/usr/sbin:/sbin"


class SandboxUnavailable(Exception):
    """No sandbox can be made here and `none` was not chosen explicitly."""


@dataclass(frozen=True)
class Sandbox:
    """How agents are confined on this host."""

    mode: str
    uid: int
    gid: int
    # True when AGENTPLANE_WORKSPACE_UID chose one uid for every workspace (bwrap mode).
    shared_uid: bool = False

    @property
    def isolated(self) -> bool:
        """True when workspaces are kept from the host (bwrap)."""
        return self.mode == "bwrap"

    def drops_privileges(self) -> bool:
        """True when toolexec is root and the agent must run as the workspace user."""
        return os.geteuid() == 0 and self.uid != 0

    def ids_for(self, workspace_id: str) -> tuple[int, int]:
        """The uid and gid a workspace runs as.

        Whenever we choose (toolexec is root and drops privileges), each workspace gets its own
        uid, derived from its id. In `user` mode (no namespaces) that is what keeps one workspace
        from reading, writing or signalling another's files and processes. In `bwrap` mode the
        namespaces already keep them apart, but per-user limits do not follow namespaces: the
        agent's RLIMIT_NPROC counts every process of the uid on the host, so with one shared uid a
        workspace that starts hundreds of processes would leave every other workspace unable to
        fork. Not as root, every workspace runs as toolexec's own user; with
        ``AGENTPLANE_WORKSPACE_UID`` set, every bwrap workspace runs as that one uid.
        """
        if self.mode not in ("user", "bwrap") or self.shared_uid or not self.drops_privileges():
            return self.uid, self.gid
        n = USER_MODE_UID_BASE + int(workspace_id.removeprefix("ws_")[:8], 16) % USER_MODE_UID_SPAN
        return n, n


@functools.cache
def bwrap_works() -> bool:
    """True when bubblewrap is installed and can create namespaces here."""
    path = shutil.which("bwrap")
    if path is None:
        return False
    try:
        done = subprocess.run(
            [path, "--ro-bind", "/", "/", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "true"],
            capture_output=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def choose(requested: str, uid: int | None = None, gid: int | None = None) -> Sandbox:
    """The sandbox for `requested` mode; raises SandboxUnavailable (with what to do) when none works."""
    mode = (requested or "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"AGENTPLANE_WORKSPACE_SANDBOX must be one of {', '.join(MODES)}, got {requested!r}")
    root = os.geteuid() == 0
    wuid = uid if uid is not None else (DEFAULT_WORKSPACE_UID if root else os.geteuid())
    wgid = gid if gid is not None else (DEFAULT_WORKSPACE_UID if root else os.getegid())
    if mode == "auto":
        if bwrap_works():
            mode = "bwrap"
        elif root:
            mode = "user"
        else:
            raise SandboxUnavailable(
                f"bubblewrap is not available, so workspaces cannot be sandboxed: {INSTALL_HINT}, or set "
                f"AGENTPLANE_WORKSPACE_SANDBOX=none to accept that {NOT_ISOLATED}"
            )
    if mode == "bwrap" and not bwrap_works():
        raise SandboxUnavailable(
            f"AGENTPLANE_WORKSPACE_SANDBOX=bwrap, but bubblewrap does not work here: {INSTALL_HINT}"
        )
    if mode == "user" and not root:
        raise SandboxUnavailable("AGENTPLANE_WORKSPACE_SANDBOX=user needs toolexec to run as root")
    if mode == "none":
        wuid, wgid = os.geteuid(), os.getegid()
    return Sandbox(mode, wuid, wgid, shared_uid=uid is not None and mode == "bwrap")


def python_binds() -> list[str]:
    """What the agent's Python needs: the interpreter, the venv and the project's packages."""
    import agentplane

    import services

    paths = {sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(services.__file__))}
    paths.update(os.path.realpath(p) for p in agentplane.__path__)
    real = os.path.realpath(sys.executable)
    paths.add(os.path.dirname(os.path.dirname(real)))
    return sorted(p for p in paths if os.path.isdir(p))


def _system_binds() -> list[str]:
    args: list[str] = []
    for top in ("/usr", "/etc"):
        args += ["--ro-bind", top, top]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    return args


def _parent_dirs(paths: Sequence[str]) -> list[str]:
    """``--perms 0755 --dir D`` for every ancestor of `paths` that bwrap would otherwise make 0700."""
    seen: set[str] = set()
    args: list[str] = []
    for path in paths:
        parts = path.strip("/").split("/")[:-1]
        for i in range(1, len(parts) + 1):
            parent = "/" + "/".join(parts[:i])
            if parent in seen or parent in ("/usr", "/etc", "/run", "/tmp"):
                continue
            if any(parent == b or parent.startswith(b + "/") for b in ("/usr", "/etc")):
                continue
            seen.add(parent)
            args += ["--perms", "0755", "--dir", parent]
    return args


def environment(home: str = WORKSPACE_MOUNT) -> dict[str, str]:
    """The whole environment an agent (and so every command) starts with."""
    return {
        "PATH": SANDBOX_PATH,
        "HOME": home,
        "LANG": "C.UTF-8",
        "TMPDIR": "/tmp",
        "USER": "workspace",
        "LOGNAME": "workspace",
    }


def privilege_drop(sandbox: Sandbox, workspace_id: str) -> list[str]:
    """The setpriv prefix that makes the rest run as the workspace's user with no capabilities."""
    if not sandbox.drops_privileges():
        return []
    uid, gid = sandbox.ids_for(workspace_id)
    return [
        "setpriv",
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ]


def bwrap_argv(
    sandbox: Sandbox,
    *,
    workspace: str,
    network: bool,
    state: str | None = None,
    socket_dir: str | None = None,
    template: str | None = None,
    extra_ro: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    info_fd: int | None = None,
    resolv_conf: str | None = None,
) -> list[str]:
    """The bwrap command line (up to and including ``--``) for one sandbox.

    The sandbox always has its own network namespace: with `network`, the caller connects it to
    the outside through slirp4netns (`services.toolexec.netns`) once bwrap has written the
    sandbox's pid to `info_fd`, and `resolv_conf` replaces /etc/resolv.conf. The command runs as
    the namespace's pid 1: when it exits, everything it started dies with the namespace.
    """
    argv = ["bwrap", "--unshare-pid", "--as-pid-1", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if os.geteuid() != 0:
        argv.append("--unshare-user")
    argv.append("--unshare-net")
    if network and info_fd is not None:
        argv += ["--info-fd", str(info_fd)]
    argv += ["--hostname", "workspace", "--new-session", "--clearenv"]
    for key, value in (env or environment()).items():
        argv += ["--setenv", key, value]
    argv += _system_binds()
    if network and resolv_conf is not None:
        argv += ["--ro-bind", resolv_conf, "/etc/resolv.conf"]
    binds = [*python_binds(), *extra_ro]
    # bwrap makes missing parent directories 0700 (as root): the workspace user could not reach
    # what is bound below them, so they are made 0755 first.
    # Fresh /proc, /dev and temporary directories first, so nothing bound below them is covered.
    argv += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--tmpfs", "/tmp"]
    argv += ["--perms", "1777", "--tmpfs", "/var/tmp", "--perms", "0755", "--tmpfs", "/run"]
    argv += _parent_dirs([*binds, STATE_MOUNT, SOCKET_MOUNT, TEMPLATE_MOUNT])
    for path in binds:
        argv += ["--ro-bind", path, path]
    argv += ["--bind", workspace, WORKSPACE_MOUNT]
    if state is not None:
        argv += ["--bind", state, STATE_MOUNT]
    if socket_dir is not None:
        argv += ["--ro-bind", socket_dir, SOCKET_MOUNT]
    if template is not None:
        argv += ["--ro-bind", template, TEMPLATE_MOUNT]
    if os.geteuid() != 0:
        argv += ["--cap-drop", "ALL"]
    argv += ["--chdir", WORKSPACE_MOUNT, "--"]
    return argv
