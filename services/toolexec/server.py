"""Building and running the toolexec server (`agentplane serve toolexec`, tests, the benchmark).

`build(settings)` returns a bound, not yet started `ServerHandle` (the kit's convention);
`build_server` / `start` return a `ToolexecServer` that also exposes the domain parts.

One process serves three gRPC services on its TCP port — `ToolExecService` (users and the
chat service), `WorkspaceAgentService` (external agents dial it with their agent token) and
`AgentRelayService` (other toolexec replicas) — and `WorkspaceAgentService` alone on a Unix
socket, the only thing of toolexec the local driver's sandboxes see.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from dataclasses import dataclass, field

import grpc.aio
from agentplane.toolexec.v1 import toolexec_service_pb2_grpc
from agentplane.toolexec.v1 import workspace_agent_service_pb2 as agent_pb
from agentplane.toolexec.v1 import workspace_agent_service_pb2_grpc as agent_grpc

from services.common import aio, db
from services.common.auth import ServiceTokenProvider
from services.common.interceptors import (
    AUTH_EXEMPT_PREFIXES,
    ErrorInterceptor,
    RequestContextInterceptor,
)
from services.common.server import (
    SERVER_OPTIONS,
    ServerHandle,
    create_server,
    default_interceptors,
    run_service,
)
from services.common.settings import Settings, SettingsError
from services.toolexec import sandbox as sandboxes
from services.toolexec.agent_hub import AgentHub
from services.toolexec.agent_servicer import AgentRelayServicer, WorkspaceAgentServicer
from services.toolexec.agent_store import AgentStore
from services.toolexec.calls import ToolCaller
from services.toolexec.driver import ExternalDriver, WorkspaceDriver
from services.toolexec.k8s_driver import KubernetesDriver
from services.toolexec.ledger import Ledger
from services.toolexec.local_driver import FILL_TIMEOUT_SECONDS, LocalDriver
from services.toolexec.metrics import ToolexecMetrics
from services.toolexec.router import AgentRouter
from services.toolexec.servicer import ToolExecServicer
from services.toolexec.settings import ToolexecSettings
from services.toolexec.store import WorkspaceStore
from services.toolexec.templates import TemplateFetcher
from services.toolexec.workspaces import WorkspaceManager

log = logging.getLogger(__name__)

# The standard event loop: spawning commands is several times slower under uvloop; see
# services/common/aio.py.
EVENT_LOOP = aio.ASYNCIO

SERVICE_NAME = "toolexec"
FULL_SERVICE_NAMES = [
    "agentplane.toolexec.v1.ToolExecService",
    "agentplane.toolexec.v1.WorkspaceAgentService",
    "agentplane.toolexec.v1.AgentRelayService",
]
# Agents authenticate with their workspace token, checked by the Connect handler itself.
AGENT_SERVICE_PREFIX = "/agentplane.toolexec.v1.WorkspaceAgentService/"
SWEEP_INTERVAL_SECONDS = 60.0
CREATING_STALE_SECONDS = FILL_TIMEOUT_SECONDS + 120.0


@dataclass
class ToolexecServer:
    """A built toolexec server: the handle plus the domain parts tests look at."""

    handle: ServerHandle
    workspaces: WorkspaceManager
    caller: ToolCaller
    local_driver: LocalDriver | None
    hub: AgentHub
    router: AgentRouter
    agents: AgentStore
    replica_id: str
    agent_server: grpc.aio.Server | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def driver(self) -> LocalDriver:
        """The local driver (tests and benchmarks, which run with one)."""
        assert self.local_driver is not None, "this toolexec has no local driver"
        return self.local_driver

    @property
    def port(self) -> int:
        """The bound port."""
        return self.handle.port

    @property
    def address(self) -> str:
        """`127.0.0.1:<port>` to dial."""
        return self.handle.address

    async def stop(self, grace: float | None = 0) -> None:
        """Stop serving and close the pool (agents keep running and reconnect to the next toolexec)."""
        await self.handle.stop(grace)


def choose_sandbox(tx: ToolexecSettings) -> sandboxes.Sandbox | None:
    """The sandbox of the local driver; None when there is none and new workspaces are external.

    SettingsError (saying what to do) when local workspaces are the default and no sandbox works.
    """
    try:
        return sandboxes.choose(tx.sandbox, tx.workspace_uid, tx.workspace_uid)
    except ValueError as exc:
        raise SettingsError(str(exc)) from None
    except sandboxes.SandboxUnavailable as exc:
        if tx.default_driver == "local":
            raise SettingsError(str(exc)) from None
        log.warning("the local workspace driver is off: %s", exc)
        return None


async def build_server(
    settings: Settings,
    *,
    toolexec_settings: ToolexecSettings | None = None,
    templates: TemplateFetcher | None = None,
) -> ToolexecServer:
    """Build (not start) toolexec on its configured port (0 = ephemeral).

    `toolexec_settings` default to the environment (`AGENTPLANE_WORKSPACES_DIR`, sandbox, ...);
    `templates` default to the config service at ``settings.address("config")``.
    """
    tx = toolexec_settings or ToolexecSettings.from_env(settings)
    if tx.default_driver not in ("local", "external", "kubernetes"):
        raise SettingsError(
            f"AGENTPLANE_WORKSPACE_DRIVER must be local, external or kubernetes, got {tx.default_driver!r}"
        )
    sandbox = choose_sandbox(tx)
    if sandbox is not None and not sandbox.isolated:
        log.warning(
            "workspace sandbox is %r: %s; %s", sandbox.mode, sandboxes.NOT_ISOLATED, sandboxes.INSTALL_HINT
        )
    replica_id = tx.instance_id or uuid.uuid4().hex
    hub = AgentHub(replica_id)
    drivers: dict[str, WorkspaceDriver] = {"external": ExternalDriver()}
    local = LocalDriver(tx.workspaces_dir, sandbox, tx.limits) if sandbox is not None else None
    if local is not None:
        drivers["local"] = local
    pods = _kubernetes_driver(tx)
    if pods is not None:
        drivers["kubernetes"] = pods
    for driver in drivers.values():
        await driver.start()
    closers = []
    is_revoked = None
    if templates is None:
        from services.tokens.wiring import follow_config

        revocations, stop_revocations = await follow_config(settings, SERVICE_NAME)
        is_revoked = revocations.is_revoked
        closers.append(stop_revocations)
        from services.config.client import ConfigClient
        from services.toolexec.config_templates import ConfigTemplateFetcher

        client = ConfigClient(
            settings.address("config"),
            ServiceTokenProvider(settings.keys, SERVICE_NAME),
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
    agents = AgentStore(pool)
    workspaces = WorkspaceManager(store, drivers, templates, tx.default_driver)
    if local is not None:
        local.set_token_issuer(workspaces.issue_token)
    if pods is not None:
        pods.set_token_issuer(workspaces.issue_token)
    router = AgentRouter(
        hub,
        agents,
        workspaces,
        ServiceTokenProvider(settings.keys, SERVICE_NAME),
        offline_wait_seconds=tx.offline_wait_seconds,
        reconnect_grace_seconds=tx.reconnect_grace_seconds,
        stale_after_seconds=tx.heartbeat_seconds * 3,
    )
    workspaces.on_terminate(
        lambda ws: router.signal(
            ws, agent_pb.AGENT_SIGNAL_KIND_TERMINATE_WORKSPACE, "the workspace was deleted"
        )
    )
    workspaces.on_revoke(
        lambda ws: router.signal(ws, agent_pb.AGENT_SIGNAL_KIND_TOKEN_REVOKED, "the agent token was rotated")
    )
    metrics = ToolexecMetrics.for_registry()
    caller = ToolCaller(workspaces, router, Ledger(pool, replica_id), metrics)
    agent_servicer = WorkspaceAgentServicer(hub, store, agents, "", tx.heartbeat_seconds)
    address_holder: dict[str, str] = {}

    def agent_url(driver: str) -> str:
        return tx.agent_url or address_holder.get("address", "")

    def register(server: grpc.aio.Server) -> None:
        toolexec_service_pb2_grpc.add_ToolExecServiceServicer_to_server(
            ToolExecServicer(workspaces, caller, agents, hub, agent_url, tx.heartbeat_seconds * 3), server
        )
        agent_grpc.add_WorkspaceAgentServiceServicer_to_server(agent_servicer, server)
        agent_grpc.add_AgentRelayServiceServicer_to_server(
            AgentRelayServicer(hub, tx.reconnect_grace_seconds), server
        )

    interceptors = default_interceptors(
        settings.keys,
        exempt_prefixes=(*AUTH_EXEMPT_PREFIXES, AGENT_SERVICE_PREFIX),
        max_token_lifetime_seconds=settings.max_token_lifetime_seconds,
        is_revoked=is_revoked,
        oidc=settings.oidc,
    )
    handle = create_server(settings, SERVICE_NAME, register, FULL_SERVICE_NAMES, interceptors)
    address = tx.advertise_address or handle.address
    address_holder["address"] = address
    if pods is not None:
        pods.set_agent_url(address)
    agent_servicer.replica_address = address

    agent_server = await _start_socket_server(local, agent_servicer) if local is not None else None

    server = ToolexecServer(handle, workspaces, caller, local, hub, router, agents, replica_id, agent_server)

    async def refresh_last_seen() -> None:
        while True:
            await asyncio.sleep(tx.heartbeat_seconds)
            try:
                links = hub.links()
                await agents.seen([link.connection_id for link in links])
                # A link whose workspace is gone or whose token was replaced ends, even if the
                # revocation signal never reached this replica.
                hashes = await store.agent_token_hashes([link.workspace_id for link in links])
                for link in links:
                    if hashes.get(link.workspace_id) != link.token_sha256:
                        link.close("the workspace was deleted or its agent token replaced")
            except Exception:
                log.warning("could not refresh the agents' connections", exc_info=True)

    async def sweep_creating() -> None:
        while True:
            try:
                await workspaces.sweep_creating(CREATING_STALE_SECONDS)
            except Exception:
                log.warning("could not sweep workspaces left creating", exc_info=True)
            await asyncio.sleep(SWEEP_INTERVAL_SECONDS)

    server.tasks += [asyncio.create_task(refresh_last_seen()), asyncio.create_task(sweep_creating())]

    async def stop_background() -> None:
        for task in server.tasks:
            task.cancel()
        await asyncio.gather(*server.tasks, return_exceptions=True)
        if agent_server is not None:
            await agent_server.stop(0)
        await router.close()
        with contextlib.suppress(Exception):
            await agents.replica_gone(replica_id)

    # Connected agents and workspaces by state (one query on scrape, cached).
    stop_metrics = metrics.watch(pool, lambda: len(hub.links()))

    async def stop_watching() -> None:
        stop_metrics()

    handle.watch_health(db.probe(pool))
    handle.on_stop(pool.close)
    handle.on_stop(stop_watching)
    for close in closers:
        handle.on_stop(close)
    for driver in drivers.values():
        handle.on_stop(driver.close)
    # Runs first (callbacks run last-added first), while the pool is still open.
    handle.on_stop(stop_background)
    return server


def _kubernetes_driver(tx: ToolexecSettings) -> KubernetesDriver | None:
    """The kubernetes driver when it is the default (AGENTPLANE_WORKSPACE_DRIVER=kubernetes)."""
    if tx.default_driver != "kubernetes":
        return None
    return KubernetesDriver(tx.kubernetes, kubeconfig=tx.kubeconfig)


async def _start_socket_server(local: LocalDriver, servicer: WorkspaceAgentServicer) -> grpc.aio.Server:
    """The sandboxes' way in: WorkspaceAgentService alone, on a Unix socket bound into each sandbox."""
    server = grpc.aio.server(
        interceptors=[RequestContextInterceptor(), ErrorInterceptor()], options=SERVER_OPTIONS
    )
    agent_grpc.add_WorkspaceAgentServiceServicer_to_server(servicer, server)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(local.socket_path)
    server.add_insecure_port(f"unix:{local.socket_path}")
    await server.start()
    os.chmod(local.socket_path, 0o666)
    return server


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
