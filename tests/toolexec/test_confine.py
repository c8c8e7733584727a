"""Confinement: a corpus of hostile paths, each refused by read_file, write_file and edit_files.

These call the tool functions directly on a real directory tree (no server needed); a few
cases also go through CallTool in test_tools_files.py.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.agent.confine import open_regular_file, open_root, resolve
from services.agent.tools import files
from services.agent.tools.base import ToolError


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[tuple[files.Root, Path, Path]]:
    """A workspace root with hostile links in it, and an 'outside' directory holding a secret."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("TOP SECRET\n")
    root = tmp_path / "ws"
    root.mkdir()
    (root / "src").mkdir()
    (root / "src" / "ok.txt").write_text("fine\n")
    (root / "link_out_dir").symlink_to(outside)
    (root / "link_out_file").symlink_to(outside / "secret.txt")
    (root / "link_etc").symlink_to("/etc")
    (root / "link_passwd").symlink_to("/etc/passwd")
    (root / "link_dotdot").symlink_to("..")
    (root / "src" / "link_up2").symlink_to("../../outside/secret.txt")
    (root / "link_root_abs").symlink_to("/")
    (root / "loop_a").symlink_to("loop_b")
    (root / "loop_b").symlink_to("loop_a")
    (root / "link_devnull").symlink_to("/dev/null")
    (root / "nested").mkdir()
    (root / "nested" / "deeper").mkdir()
    (root / "nested" / "deeper" / "escape").symlink_to("../../../outside")
    (root / "link_to_tmp").symlink_to(str(tmp_path))
    os.mkfifo(root / "fifo")
    fd = open_root(str(root))
    try:
        yield files.Root(fd, str(root)), root, outside
    finally:
        os.close(fd)


def hostile_paths(root: Path, outside: Path) -> list[str]:
    """At least 30 paths that must never reach anything outside the root (or a special file)."""
    return [
        "..",
        "../",
        "../outside/secret.txt",
        "../../etc/passwd",
        "../../../../../../../../etc/passwd",
        "src/../../outside/secret.txt",
        "src/../../../etc/shadow",
        "./../outside/secret.txt",
        "src/./../.././outside/secret.txt",
        "/etc/passwd",
        "/etc/shadow",
        "/proc/self/environ",
        "/dev/null",
        "/dev/zero",
        str(outside / "secret.txt"),
        str(root) + "/../outside/secret.txt",
        str(root) + "_sibling/file.txt",
        "link_out_dir/secret.txt",
        "link_out_file",
        "link_etc/passwd",
        "link_passwd",
        "link_dotdot/outside/secret.txt",
        "src/link_up2",
        "link_root_abs/etc/passwd",
        "loop_a",
        "link_devnull",
        "nested/deeper/escape/secret.txt",
        "link_to_tmp/outside/secret.txt",
        "fifo",
        "src/ok.txt/../../../outside/secret.txt",
        "nested/../../outside/secret.txt",
        "a\x00b",
        "",
        "   ",
        "x/" * 3000,
    ]


def _refused(fn: object, *args: object) -> ToolError:
    with pytest.raises(ToolError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value


def test_corpus_is_large_enough(sandbox: tuple[files.Root, Path, Path]) -> None:
    _, root, outside = sandbox
    assert len(hostile_paths(root, outside)) >= 30


def test_hostile_reads_are_refused(sandbox: tuple[files.Root, Path, Path]) -> None:
    ws, root, outside = sandbox
    for path in hostile_paths(root, outside):
        err = _refused(files.read_file, ws, {"path": path})
        assert "TOP SECRET" not in err.message
        assert err.code in ("path_refused", "not_found", "is_directory"), (path, err.message)


def test_hostile_writes_are_refused_and_touch_nothing(sandbox: tuple[files.Root, Path, Path]) -> None:
    ws, root, outside = sandbox
    before = sorted(os.listdir(outside))
    for path in hostile_paths(root, outside):
        _refused(files.write_file, ws, {"path": path, "content": "pwned"})
    assert (outside / "secret.txt").read_text() == "TOP SECRET\n"
    assert sorted(os.listdir(outside)) == before
    assert not (root.parent / "ws_sibling").exists()


def test_hostile_edits_are_refused(sandbox: tuple[files.Root, Path, Path]) -> None:
    ws, root, outside = sandbox
    for path in hostile_paths(root, outside):
        edit = {"path": path, "old_text": "TOP", "new_text": "OWNED"}
        _refused(files.edit_files, ws, {"edits": [edit]})
    assert (outside / "secret.txt").read_text() == "TOP SECRET\n"


def test_links_that_stay_inside_are_followed(sandbox: tuple[files.Root, Path, Path]) -> None:
    ws, root, _ = sandbox
    (root / "inside_link").symlink_to("src/ok.txt")
    (root / "abs_inside_link").symlink_to(str(root / "src"))
    (root / "src" / "up_and_back").symlink_to("../src/ok.txt")
    for path in ("inside_link", "abs_inside_link/ok.txt", "src/up_and_back", str(root / "src" / "ok.txt")):
        result = files.read_file(ws, {"path": path})
        assert "fine" in result.content, path
    # Writing through an inside link writes the target, not a new file beside it.
    files.write_file(ws, {"path": "inside_link", "content": "changed\n"})
    assert (root / "src" / "ok.txt").read_text() == "changed\n"


def test_device_file_is_refused(sandbox: tuple[files.Root, Path, Path]) -> None:
    ws, root, _ = sandbox
    try:
        os.mknod(root / "nulldev", 0o666 | 0o020000, os.makedev(1, 3))
    except PermissionError:
        # Without CAP_MKNOD, bind the check to a real device through /dev instead.
        err = _refused(files.read_file, ws, {"path": "/dev/null"})
        assert "outside" in err.message
        return
    err = _refused(files.read_file, ws, {"path": "nulldev"})
    assert "device" in err.message
    err = _refused(files.write_file, ws, {"path": "nulldev", "content": "x"})
    assert "regular file" in err.message


def test_swapping_a_directory_for_a_symlink_after_resolution_cannot_redirect(
    sandbox: tuple[files.Root, Path, Path],
) -> None:
    """The check/open race: the open happens relative to the directory fd that was checked."""
    ws, root, outside = sandbox
    (root / "d").mkdir()
    (root / "d" / "secret.txt").write_text("inside copy\n")
    res = resolve(ws.fd, ws.path, "d/secret.txt")
    try:
        # An attacker swaps d for a link to the outside between the check and the open.
        os.rename(root / "d", root / "d_old")
        (root / "d").symlink_to(outside)
        fd = open_regular_file(res, "d/secret.txt")
        with os.fdopen(fd) as f:
            assert f.read() == "inside copy\n"
    finally:
        res.close()
    # Resolving again now sees the link and refuses it.
    err = _refused(files.read_file, ws, {"path": "d/secret.txt"})
    assert err.code == "path_refused"
