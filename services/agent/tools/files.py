"""The file tools: read_file, write_file, edit_files. Synchronous; run them in a worker thread.

Every path goes through `confine.resolve`, and every open is relative to the directory
descriptor it returned, so nothing outside the workspace root is ever read or written.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import secrets
import stat
from dataclasses import dataclass
from typing import Any

from services.agent.confine import PathNotFound, PathRefused, Resolved, open_regular_file, resolve
from services.agent.tools.base import ToolError, ToolResult

DEFAULT_READ_LINES = 2000
MAX_READ_LINES = 10_000
READ_BYTE_CAP = 64 * 1024  # content returned to the model
MAX_LINE_CHARS = 2000
MAX_FILE_BYTES = 10 * 1024 * 1024  # edit_files refuses larger files, and results that would be larger
MAX_READ_FILE_BYTES = 20 * 1024 * 1024
BINARY_SNIFF_BYTES = 8192
MAX_DIFF_CHARS = 16 * 1024


@dataclass(frozen=True)
class Root:
    """A workspace root: its open directory descriptor and its real path."""

    fd: int
    path: str


def read_file(root: Root, args: dict[str, Any]) -> ToolResult:
    """Line-numbered content of a text file, from a 1-based line `offset`, at most `limit` lines."""
    path: str = args["path"]
    offset: int = args.get("offset", 1)
    limit: int = args.get("limit", DEFAULT_READ_LINES)
    with resolve(root.fd, root.path, path) as res:
        fd = open_regular_file(res, path)
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_READ_FILE_BYTES:
            raise ToolError(
                f"{path!r} is {size} bytes, too large to read (limit {MAX_READ_FILE_BYTES} bytes). "
                "Use execute with 'head', 'tail' or 'grep' to look at parts of it.",
                code="file_too_large",
            )
        data = f.read()
    if b"\x00" in data[:BINARY_SNIFF_BYTES] or not _is_utf8(data[:BINARY_SNIFF_BYTES]):
        raise ToolError(
            f"{path!r} looks like a binary file ({size} bytes); read_file only reads text. "
            f"Use execute (for example 'file {res.relpath}' or 'xxd {res.relpath} | head') instead.",
            code="binary_file",
        )
    text = data.decode("utf-8", errors="replace")
    lines = text.splitlines()
    total = len(lines)
    if offset > max(total, 1):
        raise ToolError(
            f"offset {offset} is past the end of {path!r}, which has {total} lines. "
            f"Call read_file with an offset between 1 and {max(total, 1)}.",
            code="offset_out_of_range",
            total_lines=total,
        )
    out: list[str] = []
    used = 0
    end = min(total, offset - 1 + limit)
    truncated = end < total
    last = offset - 1
    for n in range(offset - 1, end):
        line = lines[n]
        if len(line) > MAX_LINE_CHARS:
            line = line[:MAX_LINE_CHARS] + f"... [line cut at {MAX_LINE_CHARS} characters]"
        rendered = f"{n + 1:>6}\t{line}"
        if used + len(rendered) + 1 > READ_BYTE_CAP and out:
            truncated = True
            break
        out.append(rendered)
        used += len(rendered) + 1
        last = n + 1
    content = "\n".join(out)
    if truncated:
        content += (
            f"\n[showing lines {offset}-{last} of {total}; "
            f"call read_file with offset={last + 1} to read more]"
        )
    elif total == 0:
        content = f"[{path!r} is empty]"
    return ToolResult(
        content=content,
        structured={
            "path": res.relpath,
            "offset": offset,
            "lines_returned": max(0, last - offset + 1),
            "total_lines": total,
            "truncated": truncated,
            "next_offset": last + 1 if truncated else None,
        },
    )


def write_file(root: Root, args: dict[str, Any]) -> ToolResult:
    """Write `content` atomically (temp file, fsync, rename), creating parent directories."""
    path: str = args["path"]
    content: str = args["content"]
    data = _encode(content, "content")
    with resolve(root.fd, root.path, path, create_parents=True) as res:
        mode = _writable_mode(res, path)
        _atomic_write(res, data, mode)
        created = not res.exists
    verb = "created" if created else "overwrote"
    return ToolResult(
        content=f"{verb} {res.relpath} ({len(data)} bytes)",
        structured={"path": res.relpath, "bytes": len(data), "created": created},
    )


@dataclass
class _PlannedFile:
    res: Resolved
    path: str
    original: str
    updated: str
    mode: int
    size: int  # of `updated`, in UTF-8 bytes


def edit_files(root: Root, args: dict[str, Any]) -> ToolResult:
    """Apply exact-text replacements to one or more files: all of them, or none if any edit fails."""
    edits: list[dict[str, Any]] = args["edits"]
    planned: dict[str, _PlannedFile] = {}
    errors: list[str] = []
    too_large: dict[str, Any] | None = None
    try:
        for i, edit in enumerate(edits):
            path = edit["path"]
            old, new = edit["old_text"], edit["new_text"]
            try:
                plan = _plan_for(root, planned, path)
            except ToolError as exc:
                errors.append(f"edits[{i}]: {exc.message}")
                continue
            if old == new:
                errors.append(f"edits[{i}] ({path}): old_text and new_text are identical; nothing to change.")
                continue
            count = plan.updated.count(old)
            if count == 0:
                errors.append(
                    f"edits[{i}] ({path}): old_text was not found. Read the file and copy the text exactly, "
                    "including whitespace and indentation."
                )
                continue
            if count > 1 and not edit.get("replace_all", False):
                where = ", ".join(str(n) for n in _match_lines(plan.updated, old)[:10])
                errors.append(
                    f"edits[{i}] ({path}): old_text matches {count} times (at lines {where}). Include more "
                    "surrounding lines so it matches exactly once, or set replace_all to true."
                )
                continue
            try:
                new_len = len(new.encode("utf-8"))
            except UnicodeEncodeError as exc:
                errors.append(f"edits[{i}] ({path}): new_text {_not_utf8(new, exc)}")
                continue
            # The size of the result, known before it is built: the check bounds memory too.
            size = plan.size + count * (new_len - len(old.encode("utf-8")))
            if size > MAX_FILE_BYTES:
                errors.append(
                    f"edits[{i}] ({path}): replacing {count} match(es) would make {plan.res.relpath} "
                    f"{size} bytes, over edit_files' limit of {MAX_FILE_BYTES} bytes "
                    f"({MAX_FILE_BYTES // (1024 * 1024)} MiB); the edits after it were not checked. "
                    "Make smaller changes, or rewrite large files with execute (for example sed)."
                )
                too_large = {"path": plan.res.relpath, "bytes": size, "max_bytes": MAX_FILE_BYTES}
                break
            plan.updated = plan.updated.replace(old, new)
            plan.size = size
        if errors:
            raise ToolError(
                "No file was changed, because:\n" + "\n".join(errors),
                code="edit_failed" if too_large is None else "result_too_large",
                errors=errors,
                **(too_large or {}),
            )
        _commit(list(planned.values()))
        diffs = []
        files = []
        for plan in planned.values():
            diff = "".join(
                difflib.unified_diff(
                    plan.original.splitlines(keepends=True),
                    plan.updated.splitlines(keepends=True),
                    fromfile=f"a/{plan.res.relpath}",
                    tofile=f"b/{plan.res.relpath}",
                )
            )
            if len(diff) > MAX_DIFF_CHARS:
                diff = diff[:MAX_DIFF_CHARS] + "\n[diff truncated]\n"
            diffs.append(diff)
            files.append({"path": plan.res.relpath, "diff": diff})
        return ToolResult(
            content=f"edited {len(planned)} file(s)\n" + "".join(diffs),
            structured={"files": files},
        )
    finally:
        for plan in planned.values():
            plan.res.close()


def _plan_for(root: Root, planned: dict[str, _PlannedFile], path: str) -> _PlannedFile:
    res = resolve(root.fd, root.path, path)
    key = res.relpath
    if key in planned:
        res.close()
        return planned[key]
    try:
        if not res.exists:
            raise PathNotFound(path, res.relpath)
        fd = open_regular_file(res, path)
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            too_big = ToolError(f"{path!r} is larger than {MAX_FILE_BYTES} bytes; edit it with execute.")
            if st.st_size > MAX_FILE_BYTES:
                raise too_big
            data = f.read(MAX_FILE_BYTES + 1)  # bounded: the file may grow while we read it
            if len(data) > MAX_FILE_BYTES:
                raise too_big
        if b"\x00" in data[:BINARY_SNIFF_BYTES]:
            raise ToolError(f"{path!r} is a binary file; edit_files only edits text files.")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ToolError(f"{path!r} is not valid UTF-8 text; edit_files only edits text files.") from None
    except BaseException:
        res.close()
        raise
    plan = _PlannedFile(res, path, text, text, stat.S_IMODE(st.st_mode), len(data))
    planned[key] = plan
    return plan


def _commit(plans: list[_PlannedFile]) -> None:
    """Write every file: all temp files first, then the renames; undo the renames on failure."""
    temps: list[tuple[_PlannedFile, str]] = []
    done: list[_PlannedFile] = []
    try:
        for plan in plans:
            if plan.updated != plan.original:
                temps.append((plan, _write_temp(plan.res, plan.updated.encode("utf-8"), plan.mode)))
        for plan, tmp in temps:
            os.rename(tmp, plan.res.name, src_dir_fd=plan.res.parent_fd, dst_dir_fd=plan.res.parent_fd)
            done.append(plan)
    except OSError as exc:
        for plan, tmp in temps:
            if plan not in done:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=plan.res.parent_fd)
        for plan in done:
            with contextlib.suppress(OSError):
                _atomic_write(plan.res, plan.original.encode("utf-8"), plan.mode)
        raise ToolError(f"writing the edits failed ({exc.strerror}); no file was changed.") from None


def _writable_mode(res: Resolved, path: str) -> int:
    if not res.name:
        raise ToolError(f"{path!r} is the workspace root directory; give a file path.", code="is_directory")
    if not res.exists:
        return 0o644
    if stat.S_ISDIR(res.mode):
        raise ToolError(f"{path!r} is a directory; give a file path.", code="is_directory")
    if not stat.S_ISREG(res.mode):
        raise PathRefused(path, "it is not a regular file (device, FIFO or socket)")
    return stat.S_IMODE(res.mode)


def _write_temp(res: Resolved, data: bytes, mode: int) -> str:
    tmp = f".{res.name[:100]}.tmp-{secrets.token_hex(6)}"
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=res.parent_fd
    )
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fchmod(fd, mode)  # the umask may have narrowed the mode given to open
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=res.parent_fd)
        raise
    os.close(fd)
    return tmp


def _atomic_write(res: Resolved, data: bytes, mode: int) -> None:
    tmp = _write_temp(res, data, mode)
    try:
        # rename replaces the directory entry itself: a symlink planted meanwhile is replaced, not followed.
        os.rename(tmp, res.name, src_dir_fd=res.parent_fd, dst_dir_fd=res.parent_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=res.parent_fd)
        raise


def _encode(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ToolError(f"{what} {_not_utf8(text, exc)}", code="content_not_utf8") from None


def _not_utf8(text: str, exc: UnicodeEncodeError) -> str:
    return (
        f"is not valid UTF-8: character {exc.start + 1} is an unpaired surrogate ({text[exc.start]!r}). "
        "Send the text without it."
    )


def _match_lines(text: str, needle: str) -> list[int]:
    lines: list[int] = []
    start = 0
    while True:
        i = text.find(needle, start)
        if i < 0:
            return lines
        lines.append(text.count("\n", 0, i) + 1)
        start = i + 1


def _is_utf8(sample: bytes) -> bool:
    try:
        sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        # A multi-byte character cut by the sample's end is fine.
        return exc.start >= len(sample) - 3 and exc.reason == "unexpected end of data"
    return True
