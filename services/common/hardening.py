"""Process hardening applied at start-up by every control-plane process (and the workspace agent).

Standard library only: the workspace agent imports this module and must stay light.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None


def make_undumpable() -> bool:
    """Set PR_SET_DUMPABLE to 0 for this process; True when it took effect.

    An undumpable process cannot be ptraced by another process of the same uid, its
    ``/proc/PID/environ``, ``mem``, ``fd`` and the like become owned by root and unreadable
    to them, and it leaves no core dump. Linux only; returns False elsewhere or on failure.
    The flag is reset by ``execve``, so each spawned program decides for itself.
    """
    libc = _libc()
    if libc is None:
        return False
    try:
        return int(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)) == 0
    except (AttributeError, OSError):
        return False


def is_dumpable() -> bool | None:
    """PR_GET_DUMPABLE for this process: True/False, or None when it cannot be read (non-Linux)."""
    libc = _libc()
    if libc is None:
        return None
    try:
        value = int(libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))
    except (AttributeError, OSError):
        return None
    return None if value < 0 else value != 0
