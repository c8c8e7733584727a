"""One `agentplane up` per data directory: an flock on ``<data dir>/up.lock``, held for the life of `up`.

The file holds the pid of the `up` that holds the lock, so a second one can say who it is. The
lock is the flock, not the file: a file left by a process that died (even by SIGKILL) holds no
lock, and the next `up` takes it over. The descriptor is not inherited by child processes, so
the services `up` starts do not keep the directory locked after `up` itself is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path

LOCK_FILENAME = "up.lock"


class DataDirInUse(Exception):
    """Another process holds the data directory's lock."""

    def __init__(self, data_dir: Path, pid: int | None) -> None:
        self.data_dir = data_dir
        self.pid = pid
        holder = f"process {pid}" if pid else "pid unknown"
        how = f"Ctrl-C in its terminal, or `kill {pid}`" if pid else "Ctrl-C in its terminal"
        super().__init__(
            f"{data_dir} is in use by another `agentplane up` ({holder}); stop it first ({how}), "
            "or point AGENTPLANE_DATA_DIR at another directory"
        )


@dataclass
class DataDirLock:
    """A held lock; `release()` (or process exit) lets the next `up` have the directory."""

    path: Path
    _fd: int | None

    def release(self) -> None:
        """Give the directory up (idempotent). The file stays: it holds no lock by itself."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


def acquire(data_dir: Path) -> DataDirLock:
    """Take `data_dir`'s lock without waiting and record our pid in it; raise `DataDirInUse` (with
    the holder's pid) when another process holds it. `data_dir` must exist."""
    path = data_dir / LOCK_FILENAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _read_pid(fd)
        os.close(fd)
        raise DataDirInUse(data_dir, pid) from None
    except BaseException:
        os.close(fd)
        raise
    # Overwrite from the start, then cut: a reader never sees a first line but ours or the old one.
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    os.ftruncate(fd, len(f"{os.getpid()}\n"))
    return DataDirLock(path, fd)


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        first = os.pread(fd, 64, 0).decode().split("\n", 1)[0].strip()
        return int(first) if first else None
    return None
