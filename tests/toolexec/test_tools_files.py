"""read_file, write_file and edit_files through CallTool: success and error paths."""

from __future__ import annotations

import json
import os
import stat

from agentplane.toolexec.v1 import toolexec_service_pb2

from tests.toolexec.conftest import Toolexec, call_request, ws_path, ws_read, ws_write


async def _call(tx: Toolexec, ws: str, name: str, args: dict | str) -> toolexec_service_pb2.CallToolResponse:
    return await tx.stub().CallTool(call_request(ws, name, args))


async def test_write_then_read_with_line_numbers(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    w = await _call(toolexec, ws, "write_file", {"path": "pkg/mod/a.py", "content": "one\ntwo\nthree\n"})
    assert not w.is_error, w.content
    assert json.loads(w.structured_json) == {"path": "pkg/mod/a.py", "bytes": 14, "created": True}
    assert ws_read(toolexec, ws, "pkg/mod/a.py") == "one\ntwo\nthree\n"
    r = await _call(toolexec, ws, "read_file", {"path": "pkg/mod/a.py", "offset": 2, "limit": 1})
    assert not r.is_error
    assert r.content.splitlines()[0] == "     2\ttwo"
    info = json.loads(r.structured_json)
    assert info["total_lines"] == 3 and info["truncated"] is True and info["next_offset"] == 3
    assert "offset=3" in r.content


async def test_read_default_limit_and_byte_cap(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    ws_write(toolexec, ws, "big.txt", "".join(f"row {i}\n" for i in range(5000)))
    r = await _call(toolexec, ws, "read_file", {"path": "big.txt"})
    info = json.loads(r.structured_json)
    assert info["lines_returned"] == 2000 and info["total_lines"] == 5000 and info["truncated"]
    ws_write(toolexec, ws, "big.txt", ("y" * 1000 + "\n") * 500)
    r = await _call(toolexec, ws, "read_file", {"path": "big.txt"})
    info = json.loads(r.structured_json)
    assert info["truncated"] and info["lines_returned"] < 100
    assert len(r.content.encode()) <= 64 * 1024 + 200


async def test_read_errors(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    ws_write(toolexec, ws, "bin.dat", b"\x7fELF\x00\x01\x02" * 100)
    ws_write(toolexec, ws, "short.txt", "a\nb\n")
    cases = {
        "missing.txt": "does not exist",
        "bin.dat": "binary",
        ".": "directory",
        "../x": "refused",
    }
    for path, expected in cases.items():
        r = await _call(toolexec, ws, "read_file", {"path": path})
        assert r.is_error and expected in r.content, (path, r.content)
    r = await _call(toolexec, ws, "read_file", {"path": "short.txt", "offset": 10})
    assert r.is_error and "has 2 lines" in r.content


async def test_write_keeps_mode_and_is_atomic(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    path = ws_write(toolexec, ws, "run.sh", "#!/bin/sh\necho old\n")
    os.chmod(path, 0o750)
    r = await _call(toolexec, ws, "write_file", {"path": "run.sh", "content": "#!/bin/sh\necho new\n"})
    assert not r.is_error and json.loads(r.structured_json)["created"] is False
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o750
    assert ws_read(toolexec, ws, "run.sh").endswith("echo new\n")
    # No temporary files are left beside it.
    assert sorted(os.listdir(os.path.dirname(path))) == ["run.sh"]


async def test_write_errors(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    os.mkdir(ws_path(toolexec, ws, "adir"))
    r = await _call(toolexec, ws, "write_file", {"path": "adir", "content": "x"})
    assert r.is_error and "directory" in r.content
    r = await _call(toolexec, ws, "write_file", {"path": "/etc/evil", "content": "x"})
    assert r.is_error and "outside the workspace" in r.content
    r = await _call(toolexec, ws, "write_file", {"path": "a.txt"})
    assert r.is_error and "'content' is a required property" in r.content
    assert "write_file(path: string, content: string)" in r.content


async def test_edit_files_success_with_diff(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    ws_write(toolexec, ws, "a.py", "x = 1\ny = 2\nz = 1\n")
    ws_write(toolexec, ws, "b.py", "print('hi')\n")
    edits = [
        {"path": "a.py", "old_text": "y = 2", "new_text": "y = 3"},
        {"path": "a.py", "old_text": "= 1", "new_text": "= 10", "replace_all": True},
        {"path": "b.py", "old_text": "'hi'", "new_text": "'bye'"},
    ]
    r = await _call(toolexec, ws, "edit_files", {"edits": edits})
    assert not r.is_error, r.content
    assert ws_read(toolexec, ws, "a.py") == "x = 10\ny = 3\nz = 10\n"
    assert ws_read(toolexec, ws, "b.py") == "print('bye')\n"
    assert "--- a/a.py" in r.content and "+y = 3" in r.content and "+print('bye')" in r.content
    assert len(json.loads(r.structured_json)["files"]) == 2


async def test_edit_files_all_or_nothing(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    ws_write(toolexec, ws, "a.py", "dup\nother\ndup\n")
    ws_write(toolexec, ws, "b.py", "keep me\n")
    edits = [
        {"path": "b.py", "old_text": "keep", "new_text": "changed"},
        {"path": "a.py", "old_text": "dup", "new_text": "single"},
        {"path": "a.py", "old_text": "absent", "new_text": "x"},
        {"path": "nope.py", "old_text": "a", "new_text": "b"},
    ]
    r = await _call(toolexec, ws, "edit_files", {"edits": edits})
    assert r.is_error
    assert "No file was changed" in r.content
    assert "matches 2 times (at lines 1, 3)" in r.content
    assert "edits[2] (a.py): old_text was not found" in r.content
    assert "edits[3]" in r.content and "does not exist" in r.content
    assert ws_read(toolexec, ws, "b.py") == "keep me\n"
    assert ws_read(toolexec, ws, "a.py") == "dup\nother\ndup\n"


async def test_edit_files_schema_errors(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    r = await _call(toolexec, ws, "edit_files", {"edits": []})
    assert r.is_error and "edits" in r.content and "should be non-empty" in r.content
    r = await _call(toolexec, ws, "edit_files", {"edits": [{"path": "a", "old_text": "x"}]})
    assert r.is_error and "edits[0]" in r.content and "new_text" in r.content
