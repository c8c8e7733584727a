"""Wiring of the chat service: pool, Redis, LISTEN connection, clients, workers and the gRPC server.

`start(settings)` builds and starts a real chat server (port 0 in tests) and returns a
`ChatServer` with the bound address and an async `stop()`; `agentplane serve chat` runs
`serve(settings)`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from agentplane.chat.v1 import chat_service_pb2_grpc
from agentplane.toolexec.v1 import toolexec_service_pb2, toolexec_service_pb2_grpc
from prometheus_client import CollectorRegistry
from psycopg_pool import AsyncConnectionPool

from services.chat.clients import ConfigPrompts, InferenceModel, ToolExecTools
from services.chat.deltas import EventNumberer
from services.chat.events import EventHub
from services.chat.metrics import ChatMetrics
from services.chat.notify import Notifier
from services.chat.relay import RELAY_CHANNEL, PgRelay
from services.chat.service import ChatAPI, ChatDeps
from services.chat.servicer import ChatServicer
from services.chat.settings import ChatSettings
from services.chat.store import INTERRUPT_CHANNEL, PENDING_CHANNEL, WATCH_CHANNEL, ChatStore
from services.chat.worker import Worker
from services.common import auth, db, rpc_errors
from services.common.client import create_channel
from services.common.errors import AgentplaneError, InvalidArgument, NotFound
from services.common.metrics import RpcMetrics
from services.common.server import ServerHandle, create_server, run_service
from services.common.settings import Settings
from services.config.client import ConfigClient
from services.tokens.wiring import follow_config

log = logging.getLogger(__name__)

SERVICE_NAME = "chat"
FULL_SERVICE_NAMES = ["agentplane.chat.v1.ChatService"]


@dataclass
class ChatServer:
    """A built chat server and its parts (tests reach into `store`, `worker` and `api`)."""

    handle: ServerHandle
    api: ChatAPI
    store: ChatStore
    worker: Worker | None
    metrics: ChatMetrics

    @property
    def address(self) -> str:
        """`host:port` of the bound server."""
        return self.handle.address

    async def stop(self, grace: float | None = 0) -> None:
        """Stop serving and every background task."""
        await self.handle.stop(grace)


async def create_chat_pool(database_url: str, chat_settings: ChatSettings) -> AsyncConnectionPool[Any]:
    """The chat service's Postgres pool (the store's tests build theirs with this too, so they run
    the store as the service does): sized for the chats a replica runs, autocommit."""
    return await db.create_pool(
        database_url,
        max_size=max(10, min(chat_settings.max_concurrent_chats + 10, 40)),
        name="chat",
        # Single-statement changes commit by themselves; transactions are explicit.
        autocommit=True,
    )


async def build_server(
    settings: Settings,
    chat_settings: ChatSettings | None = None,
    *,
    registry: CollectorRegistry | None = None,
) -> ChatServer:
    """Build (not start) the chat server; workers start with the server."""
    cs = chat_settings or ChatSettings.from_env()
    if cs.step_log:
        logging.getLogger("agentplane.chat.steps").setLevel(logging.DEBUG)
    database_url = settings.require_database_url()
    pool = await create_chat_pool(database_url, cs)
    redis = db.create_redis(settings.redis_url) if settings.redis_url else None
    hub = EventHub(
        redis,
        buffer_size=cs.event_buffer_size,
        subscriber_queue_size=cs.subscriber_queue_size,
        # While Redis is unreachable, live events reach the other replicas through Postgres.
        relay=PgRelay(pool) if redis is not None else None,
    )
    notifier = Notifier(database_url, [PENDING_CHANNEL, INTERRUPT_CHANNEL, WATCH_CHANNEL, RELAY_CHANNEL])
    notifier.add(RELAY_CHANNEL, hub.relayed)
    tokens = auth.ServiceTokenProvider(settings.keys, SERVICE_NAME)
    config = ConfigClient(settings.address("config"), tokens, redis_url=settings.redis_url, registry=registry)
    inference_channel = create_channel(settings.address("inference"), token_provider=tokens)
    toolexec_channel = create_channel(settings.address("toolexec"), token_provider=tokens)
    store = ChatStore(
        pool, hub.publish, max_queued=cs.max_queued_messages, numberer=EventNumberer(pool, hub.publish_many)
    )
    model = InferenceModel(inference_channel)
    tools = ToolExecTools(toolexec_channel, call_timeout_seconds=cs.tool_timeout_seconds)
    prompts = ConfigPrompts(config)
    metrics = ChatMetrics.for_registry(registry)
    toolexec_stub = toolexec_service_pb2_grpc.ToolExecServiceStub(toolexec_channel)

    async def resolve_model(model_config_id: str) -> str:
        resolved = await config.resolve_model(model_config_id)
        if model_config_id and resolved.fell_back_to_default:
            raise InvalidArgument(
                "model_config_id",
                f"model config {model_config_id} is not available; leave it empty for the default model",
            )
        return str(resolved.model_config.id)

    async def check_workspace(workspace_id: str) -> None:
        # On behalf of the caller (the RPC's effective user): toolexec checks the owner.
        try:
            # The basic view: existence and owner, from toolexec's cache (no database read).
            await toolexec_stub.GetWorkspace(
                toolexec_service_pb2.GetWorkspaceRequest(
                    workspace_id=workspace_id, view=toolexec_service_pb2.WORKSPACE_VIEW_BASIC
                ),
                timeout=10,
            )
        except grpc.aio.AioRpcError as exc:
            err: AgentplaneError = rpc_errors.from_rpc_error(exc)
            if isinstance(err, NotFound):
                # Absent, deleted, or another user's (toolexec does not tell these apart).
                raise NotFound(
                    f"workspace {workspace_id} not found: it does not exist, was deleted, or belongs "
                    "to another user (`agentplane workspace list` shows yours)",
                    reason="WORKSPACE_NOT_FOUND",
                    metadata={"workspace_id": workspace_id},
                ) from None
            if isinstance(err, InvalidArgument):
                # A malformed id: toolexec's message says what a workspace id looks like.
                detail = err.message.removeprefix(f"{err.field}: ") if err.field else err.message
                raise InvalidArgument("workspace_id", detail) from None
            raise err from None

    api = ChatAPI(
        store,
        hub,
        notifier,
        ChatDeps(
            model=model,
            tools=tools,
            prompts=prompts,
            resolve_model=resolve_model,
            check_workspace=check_workspace,
            metrics=metrics,
        ),
    )
    worker = (
        Worker(
            store,
            cs,
            notifier,
            model=model,
            tools=tools,
            prompts=prompts,
            metrics=metrics,
            database_url=database_url,
        )
        if cs.run_workers
        else None
    )

    def register(server: grpc.aio.Server) -> None:
        chat_service_pb2_grpc.add_ChatServiceServicer_to_server(ChatServicer(api), server)

    revocations, stop_revocations = await follow_config(settings, SERVICE_NAME)
    handle = create_server(
        settings,
        SERVICE_NAME,
        register,
        FULL_SERVICE_NAMES,
        metrics=RpcMetrics.for_registry(registry),
        is_revoked=revocations.is_revoked,
    )
    # The chats' state gauges, from one query on scrape (cached: see CachedStateCollector).
    stop_state_metrics = metrics.watch_state(pool)
    await config.start()
    await notifier.start()
    if worker is not None:
        await worker.start()

    async def shutdown() -> None:
        stop_state_metrics()
        await stop_revocations()
        if worker is not None:
            await worker.stop()
        await notifier.stop()
        await hub.close()
        await config.close()
        await inference_channel.close()
        await toolexec_channel.close()
        if redis is not None:
            await redis.aclose()
        await pool.close()

    handle.watch_health(db.probe(pool))
    handle.on_stop(shutdown)
    return ChatServer(handle=handle, api=api, store=store, worker=worker, metrics=metrics)


async def start(
    settings: Settings,
    chat_settings: ChatSettings | None = None,
    *,
    registry: CollectorRegistry | None = None,
) -> ChatServer:
    """Build and start a chat server; `await server.stop()` when done."""
    server = await build_server(settings, chat_settings, registry=registry)
    await server.handle.start()
    return server


async def build(settings: Settings) -> ServerHandle:
    """Build (not start) the chat server: the kit's `build(settings) -> ServerHandle` convention."""
    return (await build_server(settings)).handle


async def serve(settings: Settings) -> None:
    """Run the chat service until SIGTERM/SIGINT (`agentplane serve chat`)."""
    await run_service(settings, SERVICE_NAME, build)
