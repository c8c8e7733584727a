"""Confinement: resolve a path the model gave to a file inside the workspace root, race-free.

Paths are resolved one component at a time relative to open directory descriptors
(``os.open(..., dir_fd=...)`` with ``O_NOFOLLOW``), never by re-walking a path string, so a
directory swapped for a symlink between a check and an open cannot redirect us: the open
itself refuses to follow it. Symlinks inside the workspace are followed by reading them
(``readlink`` relative to their directory) and splicing their target into the walk, which
keeps the walk inside the root; a link (or ``..``) that would leave the root is refused, as
are device files, FIFOs and sockets.
"""

from __future__ import annotations

import errno
import os
import stat
from collections import deque
from dataclasses import dataclass

from services.agent.tools.base import ToolError

MAX_SYMLINK_HOPS = 40
MAX_PATH_LENGTH = 4096
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class PathRefused(ToolError):
    """The path escapes the workspace, or names something tools may not touch."""

    def __init__(self, path: str, why: str, *, code: str = "path_refused") -> None:
        super().__init__(
            f"path {path!r} refused: {why}. Use a path relative to the workspace root "
            "(for example 'src/main.py') that stays inside the workspace.",
            code=code,
            path=printable(path),
        )


class PathNotFound(ToolError):
    """A component of the path does not exist."""

    def __init__(self, path: str, missing: str) -> None:
        super().__init__(
            f"{path!r} does not exist ({missing!r} is missing). Check the path, for example with "
            "execute('ls').",
            code="not_found",
            path=printable(path),
        )


def printable(text: str) -> str:
    """`text` with any lone surrogate written as a backslash escape: always valid UTF-8."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _refuse_not_utf8(path: str, text: str, what: str) -> None:
    """Refuse `path` when `text` (the path, or a link target on its way) has a lone surrogate."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PathRefused(
            path,
            f"{what} is not valid UTF-8 (character {exc.start + 1} is an unpaired surrogate, "
            f"{text[exc.start]!r}); file names must be valid UTF-8 text",
            code="path_not_utf8",
        ) from None


@dataclass
class Resolved:
    """A resolved path: an open descriptor of the containing directory and the final name.

    `name` is empty when the path is the workspace root itself; `exists` says whether the
    final entry existed when it was resolved; `relpath` is the normalised path inside the root.
    Close with `close()` (or use as a context manager).
    """

    parent_fd: int
    name: str
    relpath: str
    exists: bool
    mode: int = 0

    def close(self) -> None:
        """Close the parent descriptor."""
        if self.parent_fd >= 0:
            os.close(self.parent_fd)
            self.parent_fd = -1

    def __enter__(self) -> Resolved:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_root(root_path: str) -> int:
    """Open the workspace root directory; the descriptor every resolution starts from."""
    return os.open(root_path, _DIR_FLAGS)


def _components(root_path: str, path: str) -> list[str]:
    if not isinstance(path, str) or not path.strip():
        raise PathRefused(str(path), "the path is empty")
    if "\x00" in path:
        raise PathRefused(path, "the path contains a NUL byte")
    if len(path) > MAX_PATH_LENGTH:
        raise PathRefused(path[:80] + "...", f"the path is longer than {MAX_PATH_LENGTH} characters")
    # A JSON string can carry a lone surrogate; the file-system encoding would either fail on it
    # or silently turn it into a byte that is not UTF-8 (and the name could not be sent back).
    _refuse_not_utf8(path, path, "the path")
    if path.startswith("/"):
        # An absolute path is accepted only when it names something under the root.
        root = root_path.rstrip("/")
        if path != root and not path.startswith(root + "/"):
            raise PathRefused(path, "absolute paths outside the workspace are not allowed")
        path = path[len(root) :]
    return path.split("/")


def resolve(
    root_fd: int,
    root_path: str,
    path: str,
    *,
    create_parents: bool = False,
) -> Resolved:
    """Resolve `path` inside the root open at `root_fd` (whose real path is `root_path`).

    Intermediate directories are opened with ``O_NOFOLLOW``; symlinks are resolved within
    the root; ``..`` may not climb above the root. A missing final component is fine (the
    caller may create it); missing directories are created when `create_parents` is set,
    otherwise they raise `PathNotFound`. The final component, if it exists, is neither a
    symlink (it was resolved) nor checked for type here: callers check with `mode`.
    """
    stack: list[int] = [os.dup(root_fd)]
    names: list[str] = []
    queue: deque[str] = deque(_components(root_path, path))
    hops = 0
    try:
        while queue:
            comp = queue.popleft()
            if comp in ("", "."):
                continue
            if comp == "..":
                if len(stack) == 1:
                    raise PathRefused(path, "'..' leads outside the workspace")
                os.close(stack.pop())
                names.pop()
                continue
            last = not any(c not in ("", ".") for c in queue)
            try:
                st = os.stat(comp, dir_fd=stack[-1], follow_symlinks=False)
            except FileNotFoundError:
                if last:
                    parent = stack.pop()
                    return Resolved(parent, comp, "/".join([*names, comp]), exists=False)
                if not create_parents:
                    raise PathNotFound(path, "/".join([*names, comp])) from None
                try:
                    os.mkdir(comp, 0o777, dir_fd=stack[-1])
                except FileExistsError:
                    pass  # created concurrently; the open below checks what it is
                st = os.stat(comp, dir_fd=stack[-1], follow_symlinks=False)
            except NotADirectoryError:
                raise PathRefused(path, f"{'/'.join(names)!r} is not a directory") from None
            if stat.S_ISLNK(st.st_mode):
                hops += 1
                if hops > MAX_SYMLINK_HOPS:
                    raise PathRefused(path, "too many levels of symbolic links")
                target = os.readlink(comp, dir_fd=stack[-1])
                _refuse_not_utf8(path, target, f"the target of symlink {'/'.join([*names, comp])!r}")
                if target.startswith("/"):
                    root = root_path.rstrip("/")
                    if target != root and not target.startswith(root + "/"):
                        raise PathRefused(path, f"symlink {'/'.join([*names, comp])!r} leads outside")
                    # Restart from the root: the link names an absolute place inside it.
                    while len(stack) > 1:
                        os.close(stack.pop())
                    names.clear()
                    target = target[len(root) :]
                queue.extendleft(reversed(target.split("/")))
                continue
            if last:
                parent = stack.pop()
                return Resolved(parent, comp, "/".join([*names, comp]), exists=True, mode=st.st_mode)
            if not stat.S_ISDIR(st.st_mode):
                raise PathRefused(path, f"{'/'.join([*names, comp])!r} is not a directory")
            try:
                fd = os.open(comp, _DIR_FLAGS, dir_fd=stack[-1])
            except OSError as exc:
                # ELOOP/ENOTDIR: the entry was replaced (by a symlink) after we looked at it.
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise PathRefused(path, "the path changed while it was being resolved") from None
                raise
            stack.append(fd)
            names.append(comp)
        # The path is the root itself (or resolves to a directory via '..').
        return Resolved(stack.pop(), "", "/".join(names) or ".", exists=True, mode=stat.S_IFDIR)
    finally:
        for fd in stack:
            os.close(fd)


def open_regular_file(resolved: Resolved, path: str) -> int:
    """Open the resolved final entry read-only; it must be a regular file (not a device, FIFO, ...)."""
    if not resolved.exists:
        raise PathNotFound(path, resolved.relpath)
    if not resolved.name or stat.S_ISDIR(resolved.mode):
        raise ToolError(
            f"{path!r} is a directory; to list it call execute with command 'ls -la {resolved.relpath}'.",
            code="is_directory",
            path=path,
        )
    _refuse_special(resolved.mode, path)
    try:
        # O_NONBLOCK: opening a FIFO swapped in after the check must not hang the service.
        fd = os.open(
            resolved.name,
            os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
            dir_fd=resolved.parent_fd,
        )
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOENT):
            raise PathRefused(path, "the file changed while it was being opened") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        _refuse_special(st.st_mode, path)
        raise PathRefused(path, "it is not a regular file")
    os.set_blocking(fd, True)
    return fd


def _refuse_special(mode: int, path: str) -> None:
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        raise PathRefused(path, "device files are not allowed")
    if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode):
        raise PathRefused(path, "FIFOs and sockets are not allowed")
