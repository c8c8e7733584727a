"""`agentplane workspace create|list|delete`: manage workspaces on the toolexec service."""

from __future__ import annotations

import argparse
import uuid
from typing import Any

from agentplane.toolexec.v1 import toolexec_pb2, toolexec_service_pb2, toolexec_service_pb2_grpc

from services.cli.connect import add_connection_arguments, call, open_channel, to_dict
from services.cli.output import CliError, add_output_argument, emit, table


def register(subparsers: Any) -> None:
    """Add the `workspace` command group."""
    workspace = subparsers.add_parser("workspace", help="manage workspaces (toolexec)")
    actions = workspace.add_subparsers(dest="workspace_action", required=True)

    create = actions.add_parser("create", help="create a workspace, optionally from a template")
    create.add_argument("name", help="workspace name")
    create.add_argument("--template", default="", help="workspace template id or name")
    create.add_argument(
        "--param", action="append", default=[], metavar="NAME=VALUE", help="template parameter (repeatable)"
    )
    create.add_argument("--owner", default="", help="owner user id (admins only; default: you)")
    create.add_argument(
        "--driver",
        default="",
        choices=["", "local", "external", "kubernetes"],
        help="where the agent runs: local (a sandbox on the toolexec host), external (prints the token "
        "and the command to run the agent anywhere) or kubernetes (a pod); default: the deployment's",
    )
    create.set_defaults(func=create_workspace)

    rotate = actions.add_parser(
        "rotate-token", help="replace a workspace's agent token and print the command that runs the agent"
    )
    rotate.add_argument("workspace_id")
    rotate.set_defaults(func=rotate_token)

    lister = actions.add_parser("list", help="list workspaces")
    lister.add_argument("--owner", default="", help="list this user's workspaces (admins only)")
    lister.set_defaults(func=list_workspaces)

    delete = actions.add_parser("delete", help="delete a workspace and kill its processes")
    delete.add_argument("workspace_id")
    delete.set_defaults(func=delete_workspace)

    for parser in (create, lister, delete, rotate):
        add_connection_arguments(parser)
        add_output_argument(parser)


HEADERS = ["ID", "STATE", "OWNER", "DRIVER", "AGENT", "NAME", "FAILURE"]


def _row(ws: toolexec_pb2.Workspace) -> list[str]:
    state = toolexec_pb2.WorkspaceState.Name(ws.state).removeprefix("WORKSPACE_STATE_").lower()
    agent = "connected" if ws.agent.connected else "offline"
    return [ws.id, state, ws.owner_id, ws.driver or "local", agent, ws.name, ws.failure_message]


def _summary(ws: toolexec_pb2.Workspace) -> str:
    return table(HEADERS, [_row(ws)], "")


async def create_workspace(args: argparse.Namespace) -> int:
    """Create a workspace and print it."""
    params: dict[str, str] = {}
    for item in args.param:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise CliError(f"--param must be NAME=VALUE, got {item!r}")
        params[name] = value
    channel = open_channel(args, "toolexec")
    try:
        stub = toolexec_service_pb2_grpc.ToolExecServiceStub(channel)
        request = toolexec_service_pb2.CreateWorkspaceRequest(
            request_id=uuid.uuid4().hex,
            owner_id=args.owner,
            name=args.name,
            template_id=args.template,
            parameters=params,
            driver=args.driver,
        )
        resp = await call(args, lambda: stub.CreateWorkspace(request))
        if resp is None:
            return 1
        text = _summary(resp.workspace)
        data = to_dict(resp.workspace)
        if resp.agent_token:
            data = {"workspace": data, "agent_token": resp.agent_token, "agent_command": resp.agent_command}
            text += f"\n\nRun the workspace agent (the token is shown only now):\n  {resp.agent_command}"
        emit(args, data, text)
        return 0 if resp.workspace.state == toolexec_pb2.WORKSPACE_STATE_READY else 1
    finally:
        await channel.close()


async def list_workspaces(args: argparse.Namespace) -> int:
    """List workspaces, all pages."""
    channel = open_channel(args, "toolexec")
    try:
        stub = toolexec_service_pb2_grpc.ToolExecServiceStub(channel)
        found: list[toolexec_pb2.Workspace] = []
        token = ""
        while True:
            request = toolexec_service_pb2.ListWorkspacesRequest(
                page_size=500, page_token=token, owner_id=args.owner
            )
            resp = await call(args, lambda request=request: stub.ListWorkspaces(request))  # type: ignore[misc]
            if resp is None:
                return 1
            found.extend(resp.workspaces)
            token = resp.next_page_token
            if not token:
                break
        emit(args, [to_dict(w) for w in found], table(HEADERS, [_row(w) for w in found], "no workspaces"))
        return 0
    finally:
        await channel.close()


async def delete_workspace(args: argparse.Namespace) -> int:
    """Delete a workspace."""
    channel = open_channel(args, "toolexec")
    try:
        stub = toolexec_service_pb2_grpc.ToolExecServiceStub(channel)
        request = toolexec_service_pb2.DeleteWorkspaceRequest(workspace_id=args.workspace_id)
        if await call(args, lambda: stub.DeleteWorkspace(request)) is None:
            return 1
        emit(args, {"deleted": args.workspace_id}, f"deleted {args.workspace_id}")
        return 0
    finally:
        await channel.close()


async def rotate_token(args: argparse.Namespace) -> int:
    """Replace the agent token; print the new token's agent command."""
    channel = open_channel(args, "toolexec")
    try:
        stub = toolexec_service_pb2_grpc.ToolExecServiceStub(channel)
        request = toolexec_service_pb2.RotateWorkspaceAgentTokenRequest(workspace_id=args.workspace_id)
        resp = await call(args, lambda: stub.RotateWorkspaceAgentToken(request))
        if resp is None:
            return 1
        emit(
            args,
            {
                "workspace_id": args.workspace_id,
                "agent_token": resp.agent_token,
                "agent_command": resp.agent_command,
            },
            "The old token no longer works. Run the workspace agent with the new one (shown only now):\n  "
            + resp.agent_command,
        )
        return 0
    finally:
        await channel.close()
