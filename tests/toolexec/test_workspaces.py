"""Workspace RPCs: create/get/list/delete, validation, owner checks, templates (static fetcher)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import grpc
import pytest
from agentplane.toolexec.v1 import toolexec_pb2, toolexec_service_pb2

from services.common import auth
from services.common.rpc_errors import error_info
from services.toolexec.templates import DirectoryFill, GitFill, Template, TemplateParameter
from tests.toolexec.conftest import Toolexec, call_request, ws_exists, ws_read

Req = toolexec_service_pb2


async def _expect(code: grpc.StatusCode, call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == code, info.value.details()
    return info.value


async def test_create_get_list_delete(toolexec: Toolexec) -> None:
    stub = toolexec.stub()
    created = (await stub.CreateWorkspace(Req.CreateWorkspaceRequest(name="first"))).workspace
    assert created.state == toolexec_pb2.WORKSPACE_STATE_READY
    assert created.owner_id == "alice" and created.name == "first" and created.id.startswith("ws_")
    assert ws_exists(toolexec, created.id)
    got = (await stub.GetWorkspace(Req.GetWorkspaceRequest(workspace_id=created.id))).workspace
    assert got == created
    await stub.DeleteWorkspace(Req.DeleteWorkspaceRequest(workspace_id=created.id))
    assert not ws_exists(toolexec, created.id)
    await _expect(
        grpc.StatusCode.NOT_FOUND, stub.GetWorkspace(Req.GetWorkspaceRequest(workspace_id=created.id))
    )
    err = await _expect(
        grpc.StatusCode.NOT_FOUND, stub.CallTool(call_request(created.id, "read_file", {"path": "x"}))
    )
    assert error_info(err) is not None and error_info(err)[0] == "WORKSPACE_NOT_FOUND"  # type: ignore[index]
    # Idempotent: deleting it again succeeds (a repeated delete answers as the first did).
    await stub.DeleteWorkspace(Req.DeleteWorkspaceRequest(workspace_id=created.id))


async def test_list_is_owner_scoped_and_paginated(toolexec: Toolexec) -> None:
    ids = [await toolexec.create("alice", f"w{i}") for i in range(5)]
    await toolexec.create("bob", "bobs")
    stub = toolexec.stub()
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        resp = await stub.ListWorkspaces(Req.ListWorkspacesRequest(page_size=2, page_token=token))
        seen += [w.id for w in resp.workspaces]
        assert all(w.owner_id == "alice" for w in resp.workspaces)
        pages += 1
        token = resp.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == list(reversed(ids))  # newest first
    await _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.ListWorkspaces(Req.ListWorkspacesRequest(page_token="garbage!")),
    )
    await _expect(
        grpc.StatusCode.INVALID_ARGUMENT, stub.ListWorkspaces(Req.ListWorkspacesRequest(page_size=-1))
    )
    await _expect(
        grpc.StatusCode.PERMISSION_DENIED, stub.ListWorkspaces(Req.ListWorkspacesRequest(owner_id="bob"))
    )
    admin = toolexec.stub("root", "admin")
    bobs = await admin.ListWorkspaces(Req.ListWorkspacesRequest(owner_id="bob"))
    assert [w.name for w in bobs.workspaces] == ["bobs"]


async def test_cross_owner_refusal_and_who_may_touch(toolexec: Toolexec) -> None:
    ws = await toolexec.create("alice")
    mallory = toolexec.stub("mallory")
    err = await _expect(
        grpc.StatusCode.NOT_FOUND, mallory.GetWorkspace(Req.GetWorkspaceRequest(workspace_id=ws))
    )
    assert "not found" in (err.details() or "")
    await _expect(grpc.StatusCode.NOT_FOUND, mallory.CallTool(call_request(ws, "execute", {"command": "id"})))
    # DeleteWorkspace is idempotent: mallory's delete answers as for a workspace that is gone and
    # leaves alice's alone (it is still there below).
    await mallory.DeleteWorkspace(Req.DeleteWorkspaceRequest(workspace_id=ws))
    # A service acting for someone else is refused too; acting for alice it may.
    chat = toolexec.stub("service:chat", "service")
    with auth.acting_for("mallory"):
        await _expect(grpc.StatusCode.NOT_FOUND, chat.GetWorkspace(Req.GetWorkspaceRequest(workspace_id=ws)))
    await _expect(grpc.StatusCode.NOT_FOUND, chat.GetWorkspace(Req.GetWorkspaceRequest(workspace_id=ws)))
    with auth.acting_for("alice"):
        r = await chat.CallTool(call_request(ws, "write_file", {"path": "AGENTS.md", "content": "# rules\n"}))
        assert not r.is_error
        r = await chat.CallTool(call_request(ws, "read_file", {"path": "AGENTS.md"}, call_id="agents-md-1"))
        assert r.content == "     1\t# rules"
    admin = toolexec.stub("root", "admin")
    got = await admin.GetWorkspace(Req.GetWorkspaceRequest(workspace_id=ws))
    assert got.workspace.owner_id == "alice"


async def test_create_validation_and_owner_rules(toolexec: Toolexec) -> None:
    stub = toolexec.stub()
    err = await _expect(grpc.StatusCode.INVALID_ARGUMENT, stub.CreateWorkspace(Req.CreateWorkspaceRequest()))
    assert "name" in (err.details() or "")
    await _expect(
        grpc.StatusCode.PERMISSION_DENIED,
        stub.CreateWorkspace(Req.CreateWorkspaceRequest(name="x", owner_id="bob")),
    )
    await _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.CreateWorkspace(Req.CreateWorkspaceRequest(name="x", parameters={"a": "b"})),
    )
    chat = toolexec.stub("service:chat", "service")
    err = await _expect(
        grpc.StatusCode.INVALID_ARGUMENT, chat.CreateWorkspace(Req.CreateWorkspaceRequest(name="x"))
    )
    assert "owner_id" in (err.details() or "")
    made = await chat.CreateWorkspace(Req.CreateWorkspaceRequest(name="for bob", owner_id="bob"))
    assert made.workspace.owner_id == "bob"
    for bad in ("", "nope", "ws_../../etc", "ws_" + "g" * 20):
        await _expect(
            grpc.StatusCode.INVALID_ARGUMENT, stub.GetWorkspace(Req.GetWorkspaceRequest(workspace_id=bad))
        )


async def test_create_is_idempotent_on_request_id(toolexec: Toolexec) -> None:
    stub = toolexec.stub()
    a = await stub.CreateWorkspace(Req.CreateWorkspaceRequest(name="x", request_id="req-1"))
    b = await stub.CreateWorkspace(Req.CreateWorkspaceRequest(name="x", request_id="req-1"))
    assert a.workspace.id == b.workspace.id
    c = await toolexec.stub("bob").CreateWorkspace(Req.CreateWorkspaceRequest(name="x", request_id="req-1"))
    assert c.workspace.id != a.workspace.id


async def test_call_tool_request_validation(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    stub = toolexec.stub()
    cases = [
        (Req.CallToolRequest(tool_call_id="c", name="read_file"), "workspace_id"),
        (Req.CallToolRequest(workspace_id=ws, name="read_file"), "tool_call_id"),
        (Req.CallToolRequest(workspace_id=ws, tool_call_id="c"), "name"),
        (Req.CallToolRequest(workspace_id=ws, tool_call_id="c" * 300, name="x"), "tool_call_id"),
    ]
    for request, field in cases:
        err = await _expect(grpc.StatusCode.INVALID_ARGUMENT, stub.CallTool(request))
        assert (err.details() or "").startswith(field), err.details()


async def test_list_tools(toolexec: Toolexec) -> None:
    import json

    stub = toolexec.stub()
    resp = await stub.ListTools(Req.ListToolsRequest())
    names = [t.name for t in resp.tools]
    assert names == [
        "read_file",
        "write_file",
        "edit_files",
        "execute",
        "process_output",
        "process_list",
        "process_signal",
    ]
    assert not resp.next_page_token
    for tool in resp.tools:
        schema = json.loads(tool.input_schema_json)
        assert schema["type"] == "object" and tool.description
    execute = next(t for t in resp.tools if t.name == "execute")
    assert "32 KiB" in execute.description and "4 h" in execute.description
    page = await stub.ListTools(Req.ListToolsRequest(page_size=3))
    assert len(page.tools) == 3 and page.next_page_token
    rest = await stub.ListTools(Req.ListToolsRequest(page_token=page.next_page_token))
    assert [t.name for t in rest.tools] == names[3:]
    await _expect(grpc.StatusCode.INVALID_ARGUMENT, stub.ListTools(Req.ListToolsRequest(page_token="zzz")))


async def test_directory_template(toolexec: Toolexec, tmp_path: Path) -> None:
    source = tmp_path / "tpl"
    (source / "src").mkdir(parents=True)
    (source / "AGENTS.md").write_text("be nice\n")
    (source / "src" / "main.py").write_text("print(1)\n")
    toolexec.templates.templates["py"] = Template(
        id="tpl-1", name="python", enabled=True, source=DirectoryFill(str(source))
    )
    resp = await toolexec.stub().CreateWorkspace(Req.CreateWorkspaceRequest(name="x", template_id="python"))
    ws = resp.workspace
    assert ws.state == toolexec_pb2.WORKSPACE_STATE_READY and ws.template_id == "tpl-1"
    assert ws_read(toolexec, ws.id, "src/main.py") == "print(1)\n"
    err = await _expect(
        grpc.StatusCode.NOT_FOUND,
        toolexec.stub().CreateWorkspace(Req.CreateWorkspaceRequest(name="x", template_id="nope")),
    )
    assert error_info(err)[0] == "WORKSPACE_TEMPLATE_NOT_FOUND"  # type: ignore[index]


def _make_repo(path: Path) -> None:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t"}
    env["GIT_COMMITTER_EMAIL"] = "t@x"
    path.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", "-b", "main", str(path)], check=True, env=env)
    (path / "README.md").write_text("v1\n")
    subprocess.run(["git", "-C", str(path), "add", "."], check=True, env=env)
    subprocess.run(["git", "-C", str(path), "commit", "-q", "-m", "v1"], check=True, env=env)
    subprocess.run(["git", "-C", str(path), "tag", "v1"], check=True, env=env)
    (path / "README.md").write_text("v2\n")
    subprocess.run(["git", "-C", str(path), "commit", "-q", "-am", "v2"], check=True, env=env)


async def test_git_template_with_parameters(toolexec: Toolexec, tmp_path: Path) -> None:
    _make_repo(tmp_path / "repos" / "demo")
    toolexec.templates.templates["git"] = Template(
        id="tpl-git",
        name="git",
        enabled=True,
        source=GitFill(url=str(tmp_path / "repos") + "/{repo}", ref="{ref}"),
        parameters=(TemplateParameter("repo", required=True), TemplateParameter("ref", default_value="main")),
    )
    stub = toolexec.stub()
    err = await _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.CreateWorkspace(Req.CreateWorkspaceRequest(name="x", template_id="git")),
    )
    assert "parameters.repo" in (err.details() or "")
    err = await _expect(
        grpc.StatusCode.INVALID_ARGUMENT,
        stub.CreateWorkspace(
            Req.CreateWorkspaceRequest(
                name="x", template_id="git", parameters={"repo": "demo", "color": "red"}
            )
        ),
    )
    assert "parameters.color" in (err.details() or "")
    resp = await stub.CreateWorkspace(
        Req.CreateWorkspaceRequest(name="x", template_id="git", parameters={"repo": "demo", "ref": "v1"})
    )
    ws = resp.workspace
    assert ws.state == toolexec_pb2.WORKSPACE_STATE_READY, ws.failure_message
    assert dict(ws.parameters) == {"repo": "demo", "ref": "v1"}
    assert ws_read(toolexec, ws.id, "README.md") == "v1\n"
    default = await stub.CreateWorkspace(
        Req.CreateWorkspaceRequest(name="y", template_id="git", parameters={"repo": "demo"})
    )
    assert ws_read(toolexec, default.workspace.id, "README.md") == "v2\n"
    # A repository that does not exist: the workspace is created FAILED with the reason.
    failed = await stub.CreateWorkspace(
        Req.CreateWorkspaceRequest(name="z", template_id="git", parameters={"repo": "missing"})
    )
    assert failed.workspace.state == toolexec_pb2.WORKSPACE_STATE_FAILED
    assert "git clone" in failed.workspace.failure_message
    err = await _expect(
        grpc.StatusCode.FAILED_PRECONDITION,
        stub.CallTool(call_request(failed.workspace.id, "execute", {"command": "ls"})),
    )
    assert error_info(err)[0] == "WORKSPACE_NOT_READY"  # type: ignore[index]


async def test_basic_view_is_the_record_without_agent_state(toolexec: Toolexec) -> None:
    ws = await toolexec.create()
    basic = (
        await toolexec.stub().GetWorkspace(
            Req.GetWorkspaceRequest(workspace_id=ws, view=Req.WORKSPACE_VIEW_BASIC)
        )
    ).workspace
    assert basic.id == ws and basic.owner_id == "alice" and not basic.HasField("agent")
    full = (await toolexec.stub().GetWorkspace(Req.GetWorkspaceRequest(workspace_id=ws))).workspace
    assert full.HasField("agent")
    # The owner check is the same in either view.
    err = await _expect(
        grpc.StatusCode.NOT_FOUND,
        toolexec.stub("bob").GetWorkspace(
            Req.GetWorkspaceRequest(workspace_id=ws, view=Req.WORKSPACE_VIEW_BASIC)
        ),
    )
    assert error_info(err)[0] == "WORKSPACE_NOT_FOUND"  # type: ignore[index]
