"""Building and running the toolexec server (`agentplane serve toolexec`, tests, the benchmark).

`build(settings)` returns a bound, not yet started `ServerHandle` (the kit's convention);
`build_server` / `start` return a `ToolexecServer` that also exposes the domain parts.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import grpc.aio
from agentplane.toolexec.v1 import toolexec_service_pb2_grpc

from services.common import aio, db
from services.common.auth import ServiceTokenProvider
from services.common.server import ServerHandle, create_server, run_service
from services.common.settings import Settings
from services.toolexec.calls import ToolCaller
from services.toolexec.ledger import Ledger
from services.toolexec.local_driver import LocalDriver
from services.toolexec.servicer import ToolExecServicer
from services.toolexec.settings import ToolexecSettings
from services.toolexec.store import WorkspaceStore
from services.toolexec.templates import TemplateFetcher
from services.toolexec.workspaces import WorkspaceManager

# The standard event loop: spawning commands (with preexec_fn for rlimits) is several times
# slower under uvloop; see services/common/aio.py.
EVENT_LOOP = aio.ASYNCIO

SERVICE_NAME = "toolexec"
FULL_SERVICE_NAMES = ["agentplane.toolexec.v1.ToolExecService"]


@dataclass
class ToolexecServer:
    """A built toolexec server: the handle plus the domain parts tests look at."""

    handle: ServerHandle
    workspaces: WorkspaceManager
    caller: ToolCaller
    driver: LocalDriver

    @property
    def port(self) -> int:
        """The bound port."""
        return self.handle.port

    @property
    def address(self) -> str:
        """`127.0.0.1:<port>` to dial."""
        return self.handle.address

    async def stop(self, grace: float | None = 0) -> None:
        """Stop serving, kill every workspace process, close the pool."""
        await self.handle.stop(grace)


async def build_server(
    settings: Settings,
    *,
    toolexec_settings: ToolexecSettings | None = None,
    templates: TemplateFetcher | None = None,
) -> ToolexecServer:
    """Build (not start) toolexec on its configured port (0 = ephemeral).

    `toolexec_settings` default to the environment (`AGENTPLANE_WORKSPACES_DIR`, rlimits);
    `templates` default to the config service at ``settings.address("config")``.
    """
    tx = toolexec_settings or ToolexecSettings.from_env(settings)
    instance_id = tx.instance_id or uuid.uuid4().hex
    driver = LocalDriver(tx)
    await driver.start()
    closers = []
    if templates is None:
        from services.config.client import ConfigClient
        from services.toolexec.config_templates import ConfigTemplateFetcher

        client = ConfigClient(
            settings.address("config"),
            ServiceTokenProvider(settings.secret, SERVICE_NAME),
            redis_url=settings.redis_url,
        )
        await client.start()
        closers.append(client.close)
        templates = ConfigTemplateFetcher(client)
    sync = "on" if tx.ledger_synchronous_commit else "off"
    pool = await db.create_pool(
        settings.require_database_url(),
        autocommit=True,
        name="toolexec",
        # Replaces the kit's options string, so the statement timeout is repeated here.
        options=f"-c statement_timeout=30000 -c synchronous_commit={sync}",
    )
    store = WorkspaceStore(pool)
    workspaces = WorkspaceManager(store, driver, templates)
    caller = ToolCaller(workspaces, driver, Ledger(pool, instance_id))

    def register(server: grpc.aio.Server) -> None:
        toolexec_service_pb2_grpc.add_ToolExecServiceServicer_to_server(
            ToolExecServicer(workspaces, caller), server
        )

    handle = create_server(settings, SERVICE_NAME, register, FULL_SERVICE_NAMES)
    handle.on_stop(pool.close)
    for close in closers:
        handle.on_stop(close)
    # Runs first (callbacks run last-added first): no workspace process outlives the service.
    handle.on_stop(driver.close)
    return ToolexecServer(handle, workspaces, caller, driver)


async def start(
    settings: Settings,
    *,
    toolexec_settings: ToolexecSettings | None = None,
    templates: TemplateFetcher | None = None,
) -> ToolexecServer:
    """Build and start toolexec; `await server.stop()` when done."""
    server = await build_server(settings, toolexec_settings=toolexec_settings, templates=templates)
    await server.handle.start()
    return server


async def build(settings: Settings) -> ServerHandle:
    """Build (not start) the toolexec server: the kit's `build(settings) -> ServerHandle` convention."""
    return (await build_server(settings)).handle


async def serve(settings: Settings) -> None:
    """Run toolexec until SIGTERM/SIGINT (`agentplane serve toolexec`)."""
    await run_service(settings, SERVICE_NAME, build)
