"""Issue 11: a service acting for user X reaches only X's workspaces.

A service acting for alice (``x-agentplane-on-behalf-of: alice``) is alice: it may name only alice
as owner (CreateWorkspace, ListWorkspaces: PERMISSION_DENIED otherwise) and touches only alice's
workspaces (GetWorkspace, DeleteWorkspace, CallTool, RotateWorkspaceAgentToken: NOT_FOUND
otherwise). Admins, and services acting for nobody, may still name another owner.
"""

from __future__ import annotations

import grpc
import pytest
from agentplane.toolexec.v1 import toolexec_service_pb2

from services.common import auth
from services.common.auth import Identity, Role
from services.common.errors import InvalidArgument, PermissionDenied
from services.common.rpc_errors import error_info
from services.toolexec.workspaces import may_name_any_owner, may_touch, named_owner
from tests.toolexec.conftest import Toolexec, call_request

Req = toolexec_service_pb2

FOR_ALICE = [(auth.ON_BEHALF_OF_METADATA_KEY, "alice")]

ALICE = Identity("alice", Role.USER)
ADMIN = Identity("root", Role.ADMIN)
BARE_CHAT = Identity("service:chat", Role.SERVICE)
CHAT_FOR_ALICE = Identity("service:chat", Role.SERVICE, acting_for="alice")


async def _expect(code: grpc.StatusCode, call: object, reason: str | None = None) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == code, info.value.details()
    if reason is not None:
        found = error_info(info.value)
        assert found is not None and found[0] == reason, found
    return info.value


# --- the rule itself, on identities -----------------------------------------------------


@pytest.mark.parametrize(
    ("identity", "expected"),
    [(ALICE, False), (CHAT_FOR_ALICE, False), (ADMIN, True), (BARE_CHAT, True)],
)
def test_who_may_name_any_owner(identity: Identity, expected: bool) -> None:
    assert may_name_any_owner(identity) is expected


@pytest.mark.parametrize("identity", [ALICE, CHAT_FOR_ALICE])
def test_named_owner_for_a_user_or_a_service_acting_for_one(identity: Identity) -> None:
    assert named_owner(identity, "", "list the workspaces of") == "alice"
    assert named_owner(identity, "alice", "list the workspaces of") == "alice"
    with pytest.raises(PermissionDenied) as err:
        named_owner(identity, "bob", "list the workspaces of")
    assert err.value.reason == "OWNER_MISMATCH"


def test_named_owner_message_says_whom_the_service_acts_for() -> None:
    with pytest.raises(PermissionDenied) as err:
        named_owner(CHAT_FOR_ALICE, "bob", "create a workspace for")
    assert "service:chat acting for alice may only create a workspace for alice" in str(err.value)


def test_named_owner_for_admins_and_bare_services() -> None:
    assert named_owner(ADMIN, "bob", "list the workspaces of") == "bob"
    assert named_owner(ADMIN, "", "list the workspaces of") == "root"
    assert named_owner(BARE_CHAT, "bob", "list the workspaces of") == "bob"
    with pytest.raises(InvalidArgument):
        named_owner(BARE_CHAT, "", "list the workspaces of")


@pytest.mark.parametrize(
    ("identity", "owner", "expected"),
    [
        (ALICE, "alice", True),
        (ALICE, "bob", False),
        (CHAT_FOR_ALICE, "alice", True),
        (CHAT_FOR_ALICE, "bob", False),
        (ADMIN, "bob", True),
        (BARE_CHAT, "bob", False),
    ],
)
def test_may_touch(identity: Identity, owner: str, expected: bool) -> None:
    assert may_touch(identity, owner) is expected


# --- over gRPC -------------------------------------------------------------------------


async def test_service_acting_for_alice_cannot_list_bobs_workspaces(toolexec: Toolexec) -> None:
    bobs = await toolexec.create("bob", "bobs")
    alices = await toolexec.create("alice", "alices")
    chat = toolexec.stub("service:chat", "service")
    await _expect(
        grpc.StatusCode.PERMISSION_DENIED,
        chat.ListWorkspaces(Req.ListWorkspacesRequest(owner_id="bob"), metadata=FOR_ALICE),
        "OWNER_MISMATCH",
    )
    # The same through the client's acting_for (how services send on-behalf-of).
    with auth.acting_for("alice"):
        await _expect(
            grpc.StatusCode.PERMISSION_DENIED,
            chat.ListWorkspaces(Req.ListWorkspacesRequest(owner_id="bob")),
            "OWNER_MISMATCH",
        )
    # A page token of bob's listing does not help either.
    admin = toolexec.stub("root", "admin")
    page = await admin.ListWorkspaces(Req.ListWorkspacesRequest(owner_id="bob", page_size=1))
    assert [w.id for w in page.workspaces] == [bobs]
    await _expect(
        grpc.StatusCode.PERMISSION_DENIED,
        chat.ListWorkspaces(
            Req.ListWorkspacesRequest(owner_id="bob", page_token="x" * 8), metadata=FOR_ALICE
        ),
        "OWNER_MISMATCH",
    )
    # Alice's own listing, named or implied.
    for owner in ("", "alice"):
        mine = await chat.ListWorkspaces(Req.ListWorkspacesRequest(owner_id=owner), metadata=FOR_ALICE)
        assert [w.id for w in mine.workspaces] == [alices]


async def test_service_acting_for_alice_cannot_create_a_workspace_for_bob(toolexec: Toolexec) -> None:
    chat = toolexec.stub("service:chat", "service")
    await _expect(
        grpc.StatusCode.PERMISSION_DENIED,
        chat.CreateWorkspace(Req.CreateWorkspaceRequest(name="for bob", owner_id="bob"), metadata=FOR_ALICE),
        "OWNER_MISMATCH",
    )
    await _expect(
        grpc.StatusCode.PERMISSION_DENIED,
        chat.CreateWorkspace(
            Req.CreateWorkspaceRequest(name="for bob", owner_id="bob", driver="external"), metadata=FOR_ALICE
        ),
        "OWNER_MISMATCH",
    )
    admin = toolexec.stub("root", "admin")
    assert not (await admin.ListWorkspaces(Req.ListWorkspacesRequest(owner_id="bob"))).workspaces
    # Alice's own, named or implied.
    implied = await chat.CreateWorkspace(Req.CreateWorkspaceRequest(name="mine"), metadata=FOR_ALICE)
    named = await chat.CreateWorkspace(
        Req.CreateWorkspaceRequest(name="mine too", owner_id="alice"), metadata=FOR_ALICE
    )
    assert implied.workspace.owner_id == "alice" and named.workspace.owner_id == "alice"
    listed = await toolexec.stub("alice").ListWorkspaces(Req.ListWorkspacesRequest())
    assert {w.id for w in listed.workspaces} == {implied.workspace.id, named.workspace.id}


async def test_service_acting_for_alice_cannot_touch_bobs_workspace(toolexec: Toolexec) -> None:
    admin = toolexec.stub("root", "admin")
    local = await toolexec.create("bob", "bobs")
    external = (
        await admin.CreateWorkspace(Req.CreateWorkspaceRequest(name="ext", owner_id="bob", driver="external"))
    ).workspace.id
    chat = toolexec.stub("service:chat", "service")
    nf = grpc.StatusCode.NOT_FOUND
    for ws in (local, external):
        await _expect(
            nf,
            chat.GetWorkspace(Req.GetWorkspaceRequest(workspace_id=ws), metadata=FOR_ALICE),
            "WORKSPACE_NOT_FOUND",
        )
        await _expect(
            nf,
            chat.CallTool(call_request(ws, "read_file", {"path": "x"}), metadata=FOR_ALICE),
            "WORKSPACE_NOT_FOUND",
        )
        await _expect(
            nf,
            chat.RotateWorkspaceAgentToken(
                Req.RotateWorkspaceAgentTokenRequest(workspace_id=ws), metadata=FOR_ALICE
            ),
            "WORKSPACE_NOT_FOUND",
        )
        # Deletes are idempotent: to alice, bob's workspace is gone, so deleting it succeeds and
        # leaves it alone.
        await chat.DeleteWorkspace(Req.DeleteWorkspaceRequest(workspace_id=ws), metadata=FOR_ALICE)
    # Both still exist: the admin sees them.
    left = await admin.ListWorkspaces(Req.ListWorkspacesRequest(owner_id="bob"))
    assert {w.id for w in left.workspaces} == {local, external}


async def test_service_acting_for_alice_uses_alices_workspace(toolexec: Toolexec) -> None:
    ws = await toolexec.create("alice")
    chat = toolexec.stub("service:chat", "service")
    got = await chat.GetWorkspace(Req.GetWorkspaceRequest(workspace_id=ws), metadata=FOR_ALICE)
    assert got.workspace.owner_id == "alice"
    written = await chat.CallTool(
        call_request(ws, "write_file", {"path": "a.txt", "content": "hi\n"}), metadata=FOR_ALICE
    )
    assert not written.is_error
    await chat.DeleteWorkspace(Req.DeleteWorkspaceRequest(workspace_id=ws), metadata=FOR_ALICE)
    await _expect(
        grpc.StatusCode.NOT_FOUND,
        toolexec.stub("alice").GetWorkspace(Req.GetWorkspaceRequest(workspace_id=ws)),
    )


async def test_admin_may_list_create_and_touch_bobs_workspaces(toolexec: Toolexec) -> None:
    admin = toolexec.stub("root", "admin")
    made = (await admin.CreateWorkspace(Req.CreateWorkspaceRequest(name="b", owner_id="bob"))).workspace
    assert made.owner_id == "bob"
    listed = await admin.ListWorkspaces(Req.ListWorkspacesRequest(owner_id="bob"))
    assert [w.id for w in listed.workspaces] == [made.id]
    assert (await admin.GetWorkspace(Req.GetWorkspaceRequest(workspace_id=made.id))).workspace == made
    # Bob sees it as his own.
    bobs = await toolexec.stub("bob").ListWorkspaces(Req.ListWorkspacesRequest())
    assert [w.id for w in bobs.workspaces] == [made.id]
    await admin.DeleteWorkspace(Req.DeleteWorkspaceRequest(workspace_id=made.id))


async def test_bare_service_keeps_naming_owners_but_touches_nothing(toolexec: Toolexec) -> None:
    chat = toolexec.stub("service:chat", "service")
    made = (await chat.CreateWorkspace(Req.CreateWorkspaceRequest(name="b", owner_id="bob"))).workspace
    assert made.owner_id == "bob"
    listed = await chat.ListWorkspaces(Req.ListWorkspacesRequest(owner_id="bob"))
    assert [w.id for w in listed.workspaces] == [made.id]
    await _expect(grpc.StatusCode.INVALID_ARGUMENT, chat.ListWorkspaces(Req.ListWorkspacesRequest()), None)
    # As before: a service acting for nobody is nobody's, so it touches no workspace.
    await _expect(grpc.StatusCode.NOT_FOUND, chat.GetWorkspace(Req.GetWorkspaceRequest(workspace_id=made.id)))


async def test_users_still_name_only_themselves(toolexec: Toolexec) -> None:
    alice = toolexec.stub("alice")
    await _expect(
        grpc.StatusCode.PERMISSION_DENIED,
        alice.ListWorkspaces(Req.ListWorkspacesRequest(owner_id="bob")),
        "OWNER_MISMATCH",
    )
    await _expect(
        grpc.StatusCode.PERMISSION_DENIED,
        alice.CreateWorkspace(Req.CreateWorkspaceRequest(name="x", owner_id="bob")),
        "OWNER_MISMATCH",
    )
    made = await alice.CreateWorkspace(Req.CreateWorkspaceRequest(name="x", owner_id="alice"))
    assert made.workspace.owner_id == "alice"
