"""The workspace driver interface: where a workspace's agent runs and how it is started.

Everything above the driver (records, tokens, owner checks, the ledger, argument validation,
routing calls to the agent) is shared by all drivers. `local` runs each agent in a sandbox on
the toolexec host; `external` leaves running the agent to whoever holds its token;
`kubernetes` runs a pod per workspace (services/toolexec/k8s_driver.py).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

from services.toolexec.templates import PodSettings, TemplateFill

# Issues a fresh agent token for a workspace (stores its hash, returns the token once).
TokenIssuer = Callable[[str], Awaitable[str]]


class WorkspaceFillError(Exception):
    """Filling a new workspace from its template failed; the message says why (for the user)."""


class WorkspaceDriver(Protocol):
    """Creates, starts and deletes workspaces' agents."""

    name: str

    async def start(self) -> None:
        """Prepare the driver."""

    async def create(
        self,
        workspace_id: str,
        fill: TemplateFill | None,
        token: str,
        network: bool,
        *,
        pod: PodSettings | None = None,
    ) -> None:
        """Create the workspace, filled from `fill`, and start its agent if this driver runs agents.

        `pod` is the template's pod settings (image, resources, volume, egress): the kubernetes
        driver's business, ignored by the others."""

    async def ensure_agent(self, workspace_id: str) -> None:
        """Start the workspace's agent if it is not running and this driver can (no-op otherwise)."""

    async def delete(self, workspace_id: str) -> None:
        """Kill everything the workspace ran and remove it; a missing workspace is not an error."""

    async def close(self) -> None:
        """Release the driver (agents keep running: they outlive a toolexec restart)."""


class ExternalDriver:
    """Agents run wherever their owner starts them; toolexec only routes to them."""

    name = "external"

    async def start(self) -> None:
        """Nothing to prepare."""

    async def create(
        self,
        workspace_id: str,
        fill: TemplateFill | None,
        token: str,
        network: bool,
        *,
        pod: PodSettings | None = None,
    ) -> None:
        """Nothing to create: the agent brings its own directory."""
        if fill is not None:
            raise WorkspaceFillError(
                "templates fill workspaces of the local driver; an external agent serves its own directory"
            )

    async def ensure_agent(self, workspace_id: str) -> None:
        """toolexec cannot start an external agent."""

    async def delete(self, workspace_id: str) -> None:
        """The agent was told to terminate by the caller; nothing of it lives here."""

    async def close(self) -> None:
        """Nothing to release."""
