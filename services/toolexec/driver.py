"""The workspace driver interface: where a workspace lives and how tools run in it.

The local driver (`services.toolexec.local_driver`) keeps workspaces as directories on
this host; a Kubernetes driver (a pod per workspace) will implement the same protocol.
Everything above the driver (records, owner checks, the ledger, argument validation) is
shared by all drivers.
"""

from __future__ import annotations

from typing import Any, Protocol

from services.agent.tools.base import ToolResult
from services.toolexec.templates import TemplateFill


class WorkspaceFillError(Exception):
    """Filling a new workspace from its template failed; the message says why (for the user)."""


class WorkspaceDriver(Protocol):
    """Creates, deletes and runs tools in workspaces."""

    async def start(self) -> None:
        """Prepare the driver (clean up after a crashed predecessor)."""

    async def create(self, workspace_id: str, fill: TemplateFill | None) -> None:
        """Create the workspace, filled from `fill` (empty when None); raises `WorkspaceFillError`."""

    async def delete(self, workspace_id: str) -> None:
        """Kill the workspace's processes and remove it; a missing workspace is not an error."""

    async def run_tool(
        self, workspace_id: str, name: str, args: dict[str, Any], max_seconds: float | None
    ) -> ToolResult:
        """Run the validated call `name(args)`; tool failures come back as error results."""

    async def close(self) -> None:
        """Kill every process this driver started (service shutdown)."""
