"""A provider API key that is a unique canary string shows up nowhere it should not.

The four services run as separate processes (tests/hostile/procs.py), each with the environment,
the logging and the secret redaction it has in production. An admin stores two providers with the
canary as their key: the simulator (which expects it), and a hostile provider that echoes the
`Authorization` header it got back in its error messages, first a 500 (retried), then a 401. Then:

- a chat whose model hunts for the key from inside its sandboxed workspace (every process's
  environment, the control plane's data and workspaces directories, a grep of the file system);
- chats that hit the simulator's `invalid_key` and `server_error` faults, and the echoing provider;
- an admin mistyping the key (a refused CreateProvider) and reading providers back.

The canary must then be in no log line of any service, no chat event (replayed from the start), no
message, no error any RPC returned, no file under the workspaces or data directories, no process's
environment or command line, no metrics endpoint, no Redis key or value, and no text, json or bytea
column of any table of the database (the stored key is encrypted). That the canary was really used
is checked too: the providers received it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc.aio
import psycopg
import pytest
import redis.asyncio as aioredis
from agentplane.chat.v1 import chat_pb2, chat_service_pb2, chat_service_pb2_grpc
from agentplane.config.v1 import config_pb2, config_service_pb2, config_service_pb2_grpc
from agentplane.toolexec.v1 import toolexec_service_pb2, toolexec_service_pb2_grpc
from aiohttp import web
from google.protobuf import field_mask_pb2

from services.common.client import create_channel
from services.simulator.script import Script
from services.simulator.server import SimulatorHandle, start_simulator
from tests.helpers import kill_agents, wait_until
from tests.hostile.procs import SERVICES, ProcessStack, start_processes
from tests.hostile.world import text

CANARY = f"sk-canary-{uuid.uuid4().hex}"
# What the processes are told: quick provider retries, so the provoked failures end fast.
INFERENCE_ENV = {
    "AGENTPLANE_INFERENCE_MAX_ATTEMPTS": "2",
    "AGENTPLANE_INFERENCE_RETRY_BASE_MS": "10",
    "AGENTPLANE_INFERENCE_RETRY_MAX_DELAY_MS": "50",
}
TEXT_TYPES = ("text", "character varying", "character", "json", "jsonb", "ARRAY", "USER-DEFINED")


class EchoingProvider:
    """An OpenAI-compatible provider that quotes the request's Authorization header in its errors:
    a 500 first (inference retries it), then 401 (which ends the generation)."""

    def __init__(self) -> None:
        self.seen_keys: list[str] = []
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._complete)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}/v1"

    async def _complete(self, request: web.Request) -> web.Response:
        header = request.headers.get("Authorization", "")
        self.seen_keys.append(header.removeprefix("Bearer "))
        if len(self.seen_keys) % 2 == 1:
            body = {"error": {"message": f"upstream crashed serving {header}", "type": "server_error"}}
            return web.json_response(body, status=500)
        body = {
            "error": {
                "message": f"Incorrect API key provided: {header}. You sent {header!r}.",
                "type": "invalid_request_error",
                "code": "invalid_api_key",
            }
        }
        return web.json_response(body, status=401)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _hunt(stack: ProcessStack) -> list[str]:
    # Bracketed pattern: the command itself (in the chat's events) must not contain the needle.
    pattern = "sk-canar[y]-"
    return [
        "echo HUNT-STARTED; env",
        "for f in /proc/[0-9]*/environ /proc/[0-9]*/cmdline; do echo \"== $f\"; tr '\\0' '\\n' < $f; done",
        f"ls -la / /tmp {stack.data_dir} {stack.workspaces_dir} 2>&1; cat {stack.data_dir}/* | head -c 2000",
        f"grep -rIl -e '{pattern}' /etc /run /tmp /workspace /root /home 2>/dev/null | head; echo GREP-DONE",
    ]


@pytest.fixture
async def deployment(
    database_url: str, redis_url: str, keys_dir: str, tmp_path: Path
) -> AsyncIterator[tuple[ProcessStack, SimulatorHandle, EchoingProvider]]:
    sim = await start_simulator(expected_api_key=CANARY)
    echo = EchoingProvider()
    await echo.start()
    stack: ProcessStack | None = None
    try:
        stack = await start_processes(
            database_url, redis_url, keys_dir, tmp_path / "deployment", INFERENCE_ENV
        )
        yield stack, sim, echo
    finally:
        if stack is not None:
            await stack.stop()
            kill_agents(stack.workspaces_dir)
        await echo.stop()
        await sim.stop()


class Recorder:
    """Stubs as anyone; remembers every error any call returned."""

    def __init__(self, stack: ProcessStack, make_token: Callable[..., str]) -> None:
        self.stack = stack
        self.make_token = make_token
        self.errors: list[str] = []
        self.channels: list[grpc.aio.Channel] = []

    def channel(self, service: str, user: str, role: str = "user") -> grpc.aio.Channel:
        channel = create_channel(self.stack.addresses[service], token=self.make_token(user, role))
        self.channels.append(channel)
        return channel

    async def call(self, method: Any, request: Any, **kwargs: Any) -> Any:
        try:
            return await method(request, **kwargs)
        except grpc.aio.AioRpcError as exc:
            self.errors.append(f"{exc.code().name} {exc.details()} {exc.trailing_metadata()}")
            raise

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def _chat_until_done(rec: Recorder, stub: Any, request: Any) -> chat_pb2.Chat:
    created = await rec.call(stub.CreateChat, request)
    got = await wait_until(
        lambda: stub.GetChat(chat_service_pb2.GetChatRequest(chat_id=created.chat.id)),
        until=lambda r: r.chat.status in (chat_pb2.CHAT_STATUS_WAITING, chat_pb2.CHAT_STATUS_ERROR),
        what="the chat to finish its turn",
        timeout=60,
    )
    return got.chat  # type: ignore[no-any-return]


async def _events(stub: Any, chat: chat_pb2.Chat) -> list[str]:
    out: list[str] = []
    call = stub.StreamChat(chat_service_pb2.StreamChatRequest(chat_id=chat.id))
    try:
        async with asyncio.timeout(20):
            async for item in call:
                out.append(str(item.event))
                if item.event.seq >= chat.last_seq:
                    break
    finally:
        call.cancel()
    return out


async def _database_hits(database_url: str) -> list[str]:
    hits = []
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT table_schema, table_name, column_name, data_type FROM information_schema.columns"
            " WHERE table_schema NOT IN ('pg_catalog', 'information_schema')"
        )
        columns = await cur.fetchall()
        scanned = 0
        for schema, table, column, kind in columns:
            ident = f'"{schema}"."{table}"'
            if kind == "bytea":
                sql = f'SELECT count(*) FROM {ident} WHERE position(%s::bytea in "{column}") > 0'
                params: tuple[Any, ...] = (CANARY.encode(),)
            elif kind in TEXT_TYPES:
                sql = f'SELECT count(*) FROM {ident} WHERE "{column}"::text LIKE %s'
                params = (f"%{CANARY}%",)
            else:
                continue
            scanned += 1
            row = await (await conn.execute(sql, params)).fetchone()  # type: ignore[arg-type]
            if row and row[0]:
                hits.append(f"{table}.{column} ({row[0]} rows)")
        assert scanned > 20, f"only {scanned} columns scanned: is this the test's database?"
    return hits


async def _redis_hits(redis_url: str) -> list[str]:
    hits = []
    client: aioredis.Redis = aioredis.Redis.from_url(redis_url)
    try:
        key: bytes
        async for key in client.scan_iter():
            raw_kind: Any = await client.type(key)  # bytes: the client does not decode responses
            kind = raw_kind.decode()
            if kind == "string":
                values: Any = [await client.get(key)]
            elif kind == "stream":
                values = await client.xrange(key)
            elif kind == "list":
                values = await client.lrange(key, 0, -1)
            elif kind == "hash":
                values = await client.hgetall(key)
            elif kind in ("set", "zset"):
                values = await (client.smembers(key) if kind == "set" else client.zrange(key, 0, -1))
            else:
                values = []
            if CANARY.encode() in key or CANARY.encode() in repr(values).encode():
                hits.append(key.decode(errors="replace"))
    finally:
        await client.aclose()
    return hits


def _file_hits(*roots: str) -> list[str]:
    hits = []
    needle = CANARY.encode()
    for root in roots:
        for directory, _dirs, files in os.walk(root):
            for name in files:
                path = os.path.join(directory, name)
                with contextlib.suppress(OSError):
                    if os.path.isfile(path) and needle in Path(path).read_bytes():
                        hits.append(path)
    return hits


def _process_hits() -> list[str]:
    hits = []
    needle = CANARY.encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        for what in ("environ", "cmdline"):
            with contextlib.suppress(OSError):
                if needle in Path(f"/proc/{pid}/{what}").read_bytes():
                    hits.append(f"{pid} {what}")
    return hits


@pytest.mark.timeout(180)
async def test_the_provider_key_leaks_nowhere(
    deployment: tuple[ProcessStack, SimulatorHandle, EchoingProvider],
    database_url: str,
    redis_url: str,
    make_token: Callable[..., str],
) -> None:
    stack, sim, echo = deployment
    rec = Recorder(stack, make_token)
    try:
        await _exercise(rec, stack, sim, echo)
        results = await _collect(rec, stack)
    finally:
        await rec.close()
    # The canary was in play: both providers received it, and the hunt ran.
    assert any(r.api_key == CANARY for r in sim.requests), "the simulator never got the key"
    assert CANARY in echo.seen_keys, "the echoing provider never got the key"
    assert "HUNT-STARTED" in results["messages"] and "GREP-DONE" in results["messages"], "no hunt"

    found = [what for what, value in results.items() if CANARY in value]
    found += [f"database column {hit}" for hit in await _database_hits(database_url)]
    found += [f"redis key {hit}" for hit in await _redis_hits(redis_url)]
    found += [f"file {hit}" for hit in _file_hits(stack.workspaces_dir, stack.data_dir)]
    found += [f"process {hit}" for hit in _process_hits()]
    # The logs once the services have stopped, so shutdown's lines are in them too.
    await stack.stop()
    logs = stack.log_text()
    found += [f"the log of {name}" for name in SERVICES if CANARY in logs[name]]
    assert not found, f"the provider key {CANARY} was found in: {found}"
    # The echoing provider's words reached inference's log, with the key scrubbed out.
    assert "Bearer [REDACTED]" in logs["inference"]
    # Provider failures are warnings; nothing here is an ERROR (an unclosed client was, at exit).
    errors = [line for name in SERVICES for line in logs[name].splitlines() if '"level": "ERROR"' in line]
    assert not errors, "\n".join(errors)


async def _exercise(rec: Recorder, stack: ProcessStack, sim: SimulatorHandle, echo: EchoingProvider) -> None:
    admin = config_service_pb2_grpc.ConfigServiceStub(rec.channel("config", "admin", "admin"))
    sim_provider = await rec.call(
        admin.CreateProvider,
        config_service_pb2.CreateProviderRequest(
            provider=config_pb2.Provider(
                type=config_pb2.PROVIDER_TYPE_OPENAI_COMPATIBLE,
                display_name="simulator",
                base_url=sim.openai_base_url,
                enabled=True,
            ),
            api_key=CANARY,
        ),
    )
    echo_provider = await rec.call(
        admin.CreateProvider,
        config_service_pb2.CreateProviderRequest(
            provider=config_pb2.Provider(
                type=config_pb2.PROVIDER_TYPE_OPENAI_COMPATIBLE,
                display_name="echo",
                base_url=echo.base_url,
                enabled=True,
            ),
        ),
    )
    # The key set afterwards, by update (the other way a key arrives).
    await rec.call(
        admin.UpdateProvider,
        config_service_pb2.UpdateProviderRequest(
            provider=config_pb2.Provider(id=echo_provider.provider.id),
            api_key=CANARY,
            update_mask=field_mask_pb2.FieldMask(paths=["api_key"]),
        ),
    )
    models = {}
    for name, provider in (("sim", sim_provider.provider), ("echo", echo_provider.provider)):
        created = await rec.call(
            admin.CreateModelConfig,
            config_service_pb2.CreateModelConfigRequest(
                model_config=config_pb2.ModelConfig(
                    provider_id=provider.id,
                    model_name=f"{name}-model",
                    enabled=True,
                    is_default=name == "sim",
                    context_limit=100_000,
                )
            ),
        )
        models[name] = created.model_config.id
    # An admin pasting the key with a stray space: refused, and the refusal does not quote it.
    with pytest.raises(grpc.aio.AioRpcError):
        await rec.call(
            admin.CreateProvider,
            config_service_pb2.CreateProviderRequest(
                provider=config_pb2.Provider(
                    type=config_pb2.PROVIDER_TYPE_OPENAI, display_name="typo", base_url="https://x"
                ),
                api_key=f"{CANARY} ",
            ),
        )
    alice_chat = chat_service_pb2_grpc.ChatServiceStub(rec.channel("chat", "alice"))
    tools = toolexec_service_pb2_grpc.ToolExecServiceStub(rec.channel("toolexec", "alice"))
    workspace = await rec.call(
        tools.CreateWorkspace, toolexec_service_pb2.CreateWorkspaceRequest(name="hunt")
    )
    commands = _hunt(stack)
    turns: list[dict[str, Any]] = [
        {"tool_calls": [{"name": "execute", "arguments": {"command": c, "timeout_seconds": 60}}]}
        for c in commands
    ]
    sim.set_script(
        Script.from_data(
            {"conversations": [{"match": "find the key", "turns": [*turns, {"text": "none found"}]}]}
        )
    )
    hunt = await _chat_until_done(
        rec,
        alice_chat,
        chat_service_pb2.CreateChatRequest(content=text("find the key"), workspace_id=workspace.workspace.id),
    )
    assert hunt.status == chat_pb2.CHAT_STATUS_WAITING, hunt.last_error
    sim.inject_fault("invalid_key")
    refused = await _chat_until_done(
        rec, alice_chat, chat_service_pb2.CreateChatRequest(content=text("hello"))
    )
    assert refused.last_error.reason == "PROVIDER_AUTH_FAILED", refused.last_error
    sim.inject_fault("server_error", count=2)
    failing = await _chat_until_done(
        rec, alice_chat, chat_service_pb2.CreateChatRequest(content=text("again"))
    )
    assert failing.status == chat_pb2.CHAT_STATUS_ERROR, failing
    echoed = await _chat_until_done(
        rec,
        alice_chat,
        chat_service_pb2.CreateChatRequest(content=text("echo"), model_config_id=models["echo"]),
    )
    assert echoed.last_error.reason == "PROVIDER_AUTH_FAILED", echoed.last_error
    assert len(echo.seen_keys) == 2, echo.seen_keys  # the 500 was retried, the 401 ended it


async def _collect(rec: Recorder, stack: ProcessStack) -> dict[str, str]:
    """Everything the API shows: chats, events, messages, providers, errors; and the metrics."""
    alice_chat = chat_service_pb2_grpc.ChatServiceStub(rec.channel("chat", "alice"))
    admin = config_service_pb2_grpc.ConfigServiceStub(rec.channel("config", "admin", "admin"))
    chats = (await alice_chat.ListChats(chat_service_pb2.ListChatsRequest())).chats
    events: list[str] = []
    messages: list[str] = []
    for chat in chats:
        events += await _events(alice_chat, chat)
        listed = await alice_chat.ListMessages(chat_service_pb2.ListMessagesRequest(chat_id=chat.id))
        messages += [json.dumps([str(p) for p in m.parts]) for m in listed.messages]
    providers = await admin.ListProviders(config_service_pb2.ListProvidersRequest())
    metrics = []
    async with aiohttp.ClientSession() as session:
        for name, port in stack.metrics_ports.items():
            async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert resp.status == 200, f"{name} metrics: {resp.status}"
                metrics.append(await resp.text())
    assert any("agentplane_rpc_requests" in m for m in metrics)
    return {
        "chats": str(list(chats)),
        "events": "\n".join(events),
        "messages": "\n".join(messages),
        "providers": str(providers),
        "errors": "\n".join(rec.errors),
        "metrics": "\n".join(metrics),
    }
