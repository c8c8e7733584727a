"""Every process the workspace ran, found and killed: the agent is their subreaper.

With PR_SET_CHILD_SUBREAPER, a process that double-forks or calls setsid still ends up a
descendant of the agent when its parent exits, so the agent can kill all of them when the
workspace is deleted, and reaps the orphans nobody else waits for.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process (Linux); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _parents() -> dict[int, int]:
    out: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                raw = f.read()
        except OSError:
            continue
        fields = raw[raw.rfind(")") + 2 :].split()
        out[int(entry)] = int(fields[1])
    return out


def descendants(pid: int) -> list[int]:
    """Every live descendant of `pid` (from /proc)."""
    parents = _parents()
    children: dict[int, list[int]] = {}
    for child, parent in parents.items():
        children.setdefault(parent, []).append(child)
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def kill_descendants(pid: int | None = None, rounds: int = 50) -> int:
    """SIGKILL every descendant of `pid` (default: this process) until none is left; returns how many."""
    me = os.getpid() if pid is None else pid
    killed = 0
    for _ in range(rounds):
        found = descendants(me)
        if not found:
            break
        for child in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(child, signal.SIGKILL)
                killed += 1
        reap_orphans(set())
    return killed


def _children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
    except OSError:
        return [c for c, p in _parents().items() if p == pid]
    return out


def reap_orphans(known: set[int]) -> int:
    """Reap exited children that are not ours to wait for (`known` are waited for elsewhere)."""
    reaped = 0
    for child in _children(os.getpid()):
        if child in known:
            continue
        with contextlib.suppress(ChildProcessError, OSError):
            done, _ = os.waitpid(child, os.WNOHANG)
            if done:
                reaped += 1
    return reaped
