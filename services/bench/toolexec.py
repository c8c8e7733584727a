"""`agentplane bench toolexec`: CallTool latency through the workspace agent, its reconnect and memory.

Starts an embedded Postgres (unless ``--database-url`` is given) on 127.0.0.1, migrates, runs
a real toolexec server on an ephemeral loopback port with a scratch workspaces directory,
creates a workspace (the local driver starts its agent in a sandbox: bubblewrap where it
works) and times sequential CallTool RPCs, each routed over the agent's connection and each
with a fresh tool_call_id, so every call goes through the ledger too:

- ``read_file_p50_ms`` / ``read_file_p99_ms``: `read_file` of a 100-line file;
- ``write_file_p50_ms`` / ``write_file_p99_ms``: `write_file` of 1 KiB (temp file, fsync, rename);
- ``execute_true_p50_ms`` / ``execute_true_p99_ms``: `execute` of ``true``;
- ``replay_p50_ms``: a repeated tool_call_id (of `write_file`) answered from the ledger;
- ``workspace_ready_ms``: from CreateWorkspace until the first call in it succeeded (the
  sandbox and agent start once per workspace, not per call);
- ``agent_reconnect_ms`` (p50 over ``--reconnects``, with ``agent_reconnect_max_ms``): from the
  agent's connection being closed by toolexec until a CallTool through it succeeds again;
- ``agent_idle_rss_mb`` / ``agent_idle_rss_anon_mb``: VmRSS / RssAnon of the agent's Python
  process (inside the sandbox), idle after all of the above.

``targets_met`` says, per metric with a target (``targets``), whether it was met. Every agent
the benchmark started is killed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import stat
import statistics
import tempfile
import time
import uuid
from typing import TYPE_CHECKING, Any

from services.bench.stats import percentile
from services.common import aio, auth
from services.common.client import create_channel
from services.common.db import with_database
from services.common.embedded import start_postgres
from services.common.errors import NotFound
from services.common.keys import init_dir as init_keys
from services.common.migrations import migrate
from services.common.settings import SERVICE_NAMES, Settings

if TYPE_CHECKING:
    from services.toolexec.server import ToolexecServer

NAME = "toolexec"
HELP = (
    "CallTool latency through the workspace agent (read_file, write_file, execute of true, ledger "
    "replay), agent reconnect time and idle agent memory"
)

# metric -> the most it may be (the targets).
TARGETS: dict[str, float] = {
    "read_file_p50_ms": 2.5,
    "write_file_p50_ms": 2.5,
    "execute_true_p50_ms": 15.0,
    "agent_reconnect_ms": 1000.0,
    "agent_idle_rss_mb": 40.0,
}
RECONNECT_TIMEOUT_SECONDS = 30.0
IDLE_SECONDS = 1.0
AGENT_MODULE = "services.agent"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark options."""
    parser.add_argument("--iterations", type=int, default=300, help="timed calls per file tool")
    parser.add_argument("--execute-iterations", type=int, default=200, help="timed execute calls")
    parser.add_argument("--warmup", type=int, default=30, help="untimed calls per tool first")
    parser.add_argument(
        "--reconnects", type=int, default=5, help="agent connections closed and timed until serving again"
    )
    parser.add_argument(
        "--database-url",
        default=None,
        help="Postgres admin URL to create a scratch database on (default: embedded)",
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-ready results."""
    from services.toolexec.server import EVENT_LOOP

    # The server runs in this process: on the loop toolexec runs on in production.
    return aio.run(_run(args), prefer=EVENT_LOOP)


class _NoTemplates:
    async def fetch(self, id_or_name: str) -> Any:
        raise NotFound(f"workspace template {id_or_name} not found")


def _make_reachable(path: str) -> None:
    """Make `path` 0755 and check that every parent lets others through.

    As root, the agent runs as the unprivileged workspace user: it must reach its workspace.
    """
    os.chmod(path, 0o755)
    parent = os.path.dirname(path)
    while parent and parent != "/":
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            raise RuntimeError(
                f"{parent} is not searchable by other users, so the sandboxed workspace user cannot "
                f"reach the benchmark's workspaces under {path}; set TMPDIR to a directory that is"
            )
        parent = os.path.dirname(parent)


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    import psycopg

    from services.toolexec import server as toolexec_server
    from services.toolexec.settings import ToolexecSettings

    tmp = tempfile.mkdtemp(prefix="agentplane-bench-toolexec-")
    # The embedded Postgres runs as its own user when we are root, the agents as the workspace user.
    _make_reachable(tmp)
    pg = None
    admin_url = args.database_url
    dbname = f"bench_toolexec_{uuid.uuid4().hex[:8]}"
    try:
        if admin_url is None:
            pg = await asyncio.to_thread(
                start_postgres, os.path.join(tmp, "pg"), delete=True, dbname="postgres"
            )
            admin_url = pg.url
        async with await psycopg.AsyncConnection.connect(admin_url, autocommit=True) as conn:
            await conn.execute(f'CREATE DATABASE "{dbname}"')  # type: ignore[arg-type]
        database_url = with_database(admin_url, dbname)
        await migrate(database_url)
        keys_dir = os.path.join(tmp, "keys")
        init_keys(keys_dir, SERVICE_NAMES)
        settings = Settings.from_env(
            {
                "AGENTPLANE_KEYS_DIR": keys_dir,
                "DATABASE_URL": database_url,
                "AGENTPLANE_TOOLEXEC_HOST": "127.0.0.1",
                "AGENTPLANE_TOOLEXEC_PORT": "0",
                "AGENTPLANE_LOG_LEVEL": "WARNING",
            }
        )
        workspaces = os.path.join(tmp, "workspaces")
        os.mkdir(workspaces)
        _make_reachable(workspaces)
        server = await toolexec_server.start(
            settings, toolexec_settings=ToolexecSettings(workspaces_dir=workspaces), templates=_NoTemplates()
        )
        try:
            return await _measure(args, server, auth.mint_token(settings.keys, "bench", auth.Role.USER))
        finally:
            try:
                await asyncio.to_thread(server.driver.kill_all_agents)
            finally:
                await server.stop()
    finally:
        if pg is None and args.database_url:
            async with await psycopg.AsyncConnection.connect(args.database_url, autocommit=True) as conn:
                await conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')  # type: ignore[arg-type]
        if pg is not None:
            await asyncio.to_thread(pg.stop)
        shutil.rmtree(tmp, ignore_errors=True)


async def _measure(args: argparse.Namespace, server: ToolexecServer, token: str) -> dict[str, Any]:
    from agentplane.toolexec.v1 import toolexec_service_pb2, toolexec_service_pb2_grpc

    channel = create_channel(server.address, token=token)
    try:
        stub = toolexec_service_pb2_grpc.ToolExecServiceStub(channel)
        created = time.perf_counter()
        ws = (
            await stub.CreateWorkspace(toolexec_service_pb2.CreateWorkspaceRequest(name="bench"))
        ).workspace.id

        def request(name: str, body: str, call_id: str | None = None) -> Any:
            return toolexec_service_pb2.CallToolRequest(
                workspace_id=ws,
                tool_call_id=call_id or f"{name}-{uuid.uuid4().hex[:12]}",
                name=name,
                arguments_json=body,
            )

        async def timed(
            name: str, arguments: dict[str, Any], n: int, call_id: str | None = None
        ) -> list[float]:
            body = json.dumps(arguments)
            samples: list[float] = []
            for i in range(args.warmup + n):
                call = request(name, body, call_id)
                start = time.perf_counter_ns()
                response = await stub.CallTool(call)
                elapsed = (time.perf_counter_ns() - start) / 1e6
                if response.is_error:
                    raise RuntimeError(f"{name} failed during the benchmark: {response.content}")
                if i >= args.warmup:
                    samples.append(elapsed)
            return samples

        async def reconnect() -> float:
            """ms from closing the agent's connection until a CallTool through it succeeds."""
            link = await server.hub.wait_for_link(ws, RECONNECT_TIMEOUT_SECONDS)
            if link is None:
                raise RuntimeError(
                    f"the agent of {ws} did not connect within {RECONNECT_TIMEOUT_SECONDS:g} s"
                )
            body = json.dumps({"path": "read_me.txt"})
            start = time.perf_counter()
            link.close("bench")
            while True:
                response = await stub.CallTool(request("read_file", body))
                elapsed = time.perf_counter() - start
                if not response.is_error:
                    break
                if elapsed > RECONNECT_TIMEOUT_SECONDS:
                    raise RuntimeError(
                        f"no successful call {elapsed:.1f} s after a reconnect: {response.content}"
                    )
            new = server.hub.get(ws)
            if new is None or new.connection_id == link.connection_id:
                raise RuntimeError("the call after closing the agent's connection did not go over a new one")
            return elapsed * 1000

        text = "".join(f"line {i}: some text to read back\n" for i in range(100))
        first = json.dumps({"path": "read_me.txt", "content": text})
        if (await stub.CallTool(request("write_file", first))).is_error:
            raise RuntimeError("the first call to the new workspace failed")
        workspace_ready_ms = (time.perf_counter() - created) * 1000
        await timed("write_file", {"path": "read_me.txt", "content": text}, 1)
        reads = await timed("read_file", {"path": "read_me.txt"}, args.iterations)
        writes = await timed("write_file", {"path": "out/data.txt", "content": "x" * 1024}, args.iterations)
        executes = await timed("execute", {"command": "true"}, args.execute_iterations)
        # Not read_file: a repeated read-only call reads again before the ledger answers it.
        replays = await timed(
            "write_file",
            {"path": "out/replayed.txt", "content": "x" * 1024},
            args.iterations,
            "replayed-call",
        )
        reconnects: list[float] = []
        for _ in range(args.reconnects):
            reconnects.append(await reconnect())
            await asyncio.sleep(0.1)  # let the new connection settle (heartbeats, last_seen)
        await asyncio.sleep(IDLE_SECONDS)
        memory = await asyncio.to_thread(_agent_memory, server, ws)
    finally:
        await channel.close()

    def p(values: list[float], q: float) -> float:
        return round(percentile(values, 100 * q), 3)

    result: dict[str, Any] = {
        "read_file_p50_ms": p(reads, 0.5),
        "read_file_p99_ms": p(reads, 0.99),
        "write_file_p50_ms": p(writes, 0.5),
        "write_file_p99_ms": p(writes, 0.99),
        "execute_true_p50_ms": p(executes, 0.5),
        "execute_true_p99_ms": p(executes, 0.99),
        "replay_p50_ms": p(replays, 0.5),
        "read_file_mean_ms": round(statistics.fmean(reads), 3),
        "workspace_ready_ms": round(workspace_ready_ms, 3),
        "agent_reconnect_ms": p(reconnects, 0.5) if reconnects else None,
        "agent_reconnect_max_ms": round(max(reconnects), 3) if reconnects else None,
        **memory,
        "sandbox": server.driver.sandbox.mode,
        "iterations": args.iterations,
        "execute_iterations": args.execute_iterations,
        "reconnects": args.reconnects,
        "targets": TARGETS,
    }
    result["targets_met"] = {
        metric: result[metric] is not None and result[metric] <= limit for metric, limit in TARGETS.items()
    }
    return result


def _agent_memory(server: ToolexecServer, workspace_id: str) -> dict[str, float]:
    """VmRSS and RssAnon (MB) of the workspace agent's Python process."""
    from services.agent import reaper

    top = server.driver.agent_pid(workspace_id)
    if top is None:
        raise RuntimeError(f"the agent of {workspace_id} is not running")
    agent: int | None = None
    # bwrap's command line holds the agent's too: the agent is the process that runs the module.
    for pid in [top, *reaper.descendants(top)]:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if AGENT_MODULE in argv and os.path.basename(argv[0]) != "bwrap":
            agent = pid
            break
    if agent is None:
        raise RuntimeError(f"no process running {AGENT_MODULE} below the agent's sandbox (pid {top})")
    fields: dict[str, float] = {}
    with open(f"/proc/{agent}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                fields[key] = int(value.split()[0]) / 1024  # kB
    return {
        "agent_idle_rss_mb": round(fields["VmRSS"], 1),
        "agent_idle_rss_anon_mb": round(fields["RssAnon"], 1),
        "agent_idle_rss_file_mb": round(fields["RssFile"], 1),
    }
