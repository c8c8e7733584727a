"""Hardening of the workspace tools: edit_files bounds its result, paths that are not UTF-8 get a
clear error result, and a workspace root replaced by a symbolic link is refused.

Plain domain tests: the tool functions on a real directory, and ToolRunner for what goes
through the agent's dispatch (its error results, never an exception).
"""

from __future__ import annotations

import json
import os
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from services.agent.processes import ProcessLimits, ProcessManager
from services.agent.runner import ToolRunner
from services.agent.tools import files
from services.agent.tools.base import ToolError, ToolResult

MIB = 1024 * 1024
LIMIT = files.MAX_FILE_BYTES

# Lone surrogates: a JSON string can carry any of them ("\udc80"), but none is valid UTF-8.
# \udc80 is the one Python's file-system encoding would silently turn into the byte 0x80.
SURROGATE_PATHS = ["a\udc80b", "\ud800", "dir/\udfff/x.txt", "/abs\udc80"]


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    d = tmp_path / "ws"
    d.mkdir()
    return d.resolve()


@pytest.fixture
def root(ws: Path) -> Iterator[files.Root]:
    fd = os.open(ws, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield files.Root(fd, str(ws))
    finally:
        os.close(fd)


@pytest.fixture
async def runner(ws: Path, tmp_path: Path) -> AsyncIterator[ToolRunner]:
    processes = ProcessManager(str(tmp_path / "records"), ProcessLimits())
    try:
        yield ToolRunner(str(ws), processes, "ws-hardening")
    finally:
        await processes.close()


def _raises(
    tool: Callable[[files.Root, dict[str, Any]], ToolResult], root: files.Root, args: dict
) -> ToolError:
    with pytest.raises(ToolError) as info:
        tool(root, args)
    return info.value


def _write(path: Path | bytes, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _read(path: Path) -> str:
    with open(path) as f:
        return f.read()


def _assert_wire_safe(result: ToolResult) -> None:
    """The result can be sent as protobuf strings and JSON: strictly encodable UTF-8 everywhere."""
    result.content.encode("utf-8")
    json.dumps(result.structured, ensure_ascii=False).encode("utf-8")


# --- edit_files bounds the size of its result -------------------------------------------------


def test_edit_result_over_limit_is_refused_before_it_is_built(root: files.Root, ws: Path) -> None:
    (ws / "small.txt").write_text("keep\n")
    big = "x" * MIB
    (ws / "big.txt").write_text(big)
    doubling = {"path": "big.txt", "old_text": "x", "new_text": "xx", "replace_all": True}
    # Eight doublings of 1 MiB would be 256 MiB; the fifth (16 MiB) already crosses the limit.
    edits = [{"path": "small.txt", "old_text": "keep", "new_text": "changed"}, *[doubling] * 8]
    tracemalloc.start()
    try:
        err = _raises(files.edit_files, root, {"edits": edits})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert err.code == "result_too_large", err.message
    assert "No file was changed" in err.message
    assert "edits[4] (big.txt)" in err.message and str(16 * MIB) in err.message
    assert str(LIMIT) in err.message
    assert err.details["max_bytes"] == LIMIT
    # The oversized content was never built: memory stays around the limit, not 256 MiB.
    assert peak < 3 * LIMIT, peak
    # Nothing was written, no temporary file left behind.
    assert (ws / "big.txt").read_text() == big
    assert (ws / "small.txt").read_text() == "keep\n"
    assert sorted(os.listdir(ws)) == ["big.txt", "small.txt"]


def test_edit_result_limit_counts_bytes_not_characters(root: files.Root, ws: Path) -> None:
    content = "x" * (6 * MIB)
    (ws / "f.txt").write_text(content)
    # 6 Mi characters either way, but "é" is two bytes in UTF-8: 12 MiB.
    err = _raises(
        files.edit_files,
        root,
        {"edits": [{"path": "f.txt", "old_text": "x", "new_text": "é", "replace_all": True}]},
    )
    assert err.code == "result_too_large"
    assert str(12 * MIB) in err.message
    assert (ws / "f.txt").read_text() == content


def test_edit_result_of_exactly_the_limit_is_allowed(root: files.Root, ws: Path) -> None:
    (ws / "f.txt").write_text("a" * (LIMIT - 10) + "TAIL")
    result = files.edit_files(
        root, {"edits": [{"path": "f.txt", "old_text": "TAIL", "new_text": "TAIL" + "b" * 6}]}
    )
    assert not result.is_error
    assert os.path.getsize(ws / "f.txt") == LIMIT
    err = _raises(
        files.edit_files, root, {"edits": [{"path": "f.txt", "old_text": "TAIL", "new_text": "TAILc"}]}
    )
    assert err.code == "result_too_large"
    assert str(LIMIT + 1) in err.message
    assert os.path.getsize(ws / "f.txt") == LIMIT


def test_shrinking_a_file_at_the_limit_is_allowed(root: files.Root, ws: Path) -> None:
    (ws / "f.txt").write_text("ab" * (LIMIT // 2))
    result = files.edit_files(
        root, {"edits": [{"path": "f.txt", "old_text": "ab", "new_text": "a", "replace_all": True}]}
    )
    assert not result.is_error
    assert os.path.getsize(ws / "f.txt") == LIMIT // 2


# --- lone surrogates: in paths, symlink targets and text ---------------------------------------


@pytest.mark.parametrize("path", SURROGATE_PATHS)
def test_surrogate_path_is_refused_by_the_file_tools(root: files.Root, ws: Path, path: str) -> None:
    if path.startswith("/"):
        path = str(ws) + path
    for tool, args in [
        (files.read_file, {"path": path}),
        (files.write_file, {"path": path, "content": "x"}),
    ]:
        err = _raises(tool, root, args)
        assert err.code == "path_not_utf8", err.message
        assert "not valid UTF-8" in err.message and "unpaired surrogate" in err.message
        _assert_wire_safe(err.to_result())
    err = _raises(files.edit_files, root, {"edits": [{"path": path, "old_text": "a", "new_text": "b"}]})
    assert err.code == "edit_failed" and "not valid UTF-8" in err.message
    _assert_wire_safe(err.to_result())
    assert os.listdir(ws) == []


@pytest.mark.parametrize("path", SURROGATE_PATHS)
async def test_surrogate_path_gets_an_error_result_from_every_tool(
    runner: ToolRunner, ws: Path, path: str
) -> None:
    if path.startswith("/"):
        path = str(ws) + path
    calls: list[tuple[str, dict[str, Any]]] = [
        ("read_file", {"path": path}),
        ("write_file", {"path": path, "content": "x"}),
        ("edit_files", {"edits": [{"path": path, "old_text": "a", "new_text": "b"}]}),
        ("execute", {"command": "touch planted", "workdir": path}),
    ]
    for name, args in calls:
        result = await runner.run(name, args)
        assert result.is_error, (name, result.content)
        assert result.structured["error"] in ("path_not_utf8", "edit_failed"), (name, result.content)
        assert "not valid UTF-8" in result.content, (name, result.content)
        _assert_wire_safe(result)
    assert os.listdir(ws) == []


def test_symlink_to_a_name_that_is_not_utf8_is_refused(root: files.Root, ws: Path) -> None:
    base = os.fsencode(ws)
    os.mkdir(base + b"/\x80dir")
    _write(base + b"/\x80dir/f.txt", "hello\n")
    os.symlink(b"\x80dir", base + b"/link")
    for tool, args in [
        (files.read_file, {"path": "link/f.txt"}),
        (files.write_file, {"path": "link/new.txt", "content": "x"}),
    ]:
        err = _raises(tool, root, args)
        assert err.code == "path_not_utf8", err.message
        assert "symlink 'link'" in err.message
        _assert_wire_safe(err.to_result())
    assert os.listdir(base + b"/\x80dir") == [b"f.txt"]


def test_text_with_lone_surrogate_is_refused(root: files.Root, ws: Path) -> None:
    err = _raises(files.write_file, root, {"path": "f.txt", "content": "ok \ud800 no"})
    assert err.code == "content_not_utf8" and "unpaired surrogate" in err.message
    _assert_wire_safe(err.to_result())
    assert os.listdir(ws) == []
    (ws / "f.txt").write_text("hello\n")
    err = _raises(
        files.edit_files, root, {"edits": [{"path": "f.txt", "old_text": "hello", "new_text": "\udc80"}]}
    )
    assert err.code == "edit_failed" and "new_text is not valid UTF-8" in err.message
    _assert_wire_safe(err.to_result())
    assert (ws / "f.txt").read_text() == "hello\n"
    assert os.listdir(ws) == ["f.txt"]


# --- a workspace root replaced by a symbolic link (or a file, or gone) --------------------------

ROOT_CALLS: list[tuple[str, dict[str, Any]]] = [
    ("read_file", {"path": "secret.txt"}),
    ("write_file", {"path": "planted.txt", "content": "x"}),
    ("edit_files", {"edits": [{"path": "secret.txt", "old_text": "token", "new_text": "stolen"}]}),
    ("execute", {"command": "cat secret.txt; touch planted.txt"}),
    ("process_list", {}),
]


async def test_root_replaced_by_a_symlink_is_refused(runner: ToolRunner, ws: Path, tmp_path: Path) -> None:
    ok = await runner.run("write_file", {"path": "mine.txt", "content": "mine\n"})
    assert not ok.is_error, ok.content
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    _write(elsewhere / "secret.txt", "token\n")
    os.rename(ws, tmp_path / "ws-moved")
    os.symlink(elsewhere, ws)
    for name, args in ROOT_CALLS:
        result = await runner.run(name, args)
        assert result.is_error, (name, result.content)
        assert result.structured["error"] == "workspace_root_replaced", (name, result.content)
        assert "symbolic link" in result.content and "token" not in result.content
    assert os.listdir(elsewhere) == ["secret.txt"]
    assert _read(elsewhere / "secret.txt") == "token\n"
    # Put back as a directory, the workspace works again.
    os.unlink(ws)
    os.rename(tmp_path / "ws-moved", ws)
    result = await runner.run("read_file", {"path": "mine.txt"})
    assert not result.is_error and "mine" in result.content


async def test_root_replaced_by_a_file_or_removed(runner: ToolRunner, ws: Path, tmp_path: Path) -> None:
    os.rename(ws, tmp_path / "ws-moved")
    _write(ws, "not a directory\n")
    for name, args in ROOT_CALLS:
        result = await runner.run(name, args)
        assert result.is_error, (name, result.content)
        assert result.structured["error"] == "workspace_root_replaced", (name, result.content)
    os.unlink(ws)
    for name, args in ROOT_CALLS:
        result = await runner.run(name, args)
        assert result.is_error and result.structured["error"] == "workspace_missing", (name, result.content)
    assert ws.name not in os.listdir(tmp_path)
