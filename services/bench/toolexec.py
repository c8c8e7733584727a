"""`agentplane bench toolexec`: CallTool latency over gRPC for the hot tools.

Starts an embedded Postgres (unless ``--database-url`` is given) on 127.0.0.1, migrates, runs
a real toolexec server on an ephemeral loopback port with a scratch workspaces directory,
creates a workspace, and times sequential CallTool RPCs (each with a fresh tool_call_id, so
every call goes through the ledger: one insert before, one update after):

- ``read_file_p50_ms`` / ``read_file_p99_ms``: `read_file` of a 100-line file;
- ``write_file_p50_ms`` / ``write_file_p99_ms``: `write_file` of 1 KiB (temp file, fsync, rename);
- ``execute_true_p50_ms`` / ``execute_true_p99_ms``: `execute` of ``true``;
- ``replay_p50_ms``: a repeated tool_call_id answered from the ledger.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
import uuid
from typing import Any

from services.bench.stats import percentile
from services.common import aio, auth
from services.common.client import create_channel
from services.common.db import with_database
from services.common.embedded import start_postgres
from services.common.errors import NotFound
from services.common.migrations import migrate
from services.common.settings import Settings

NAME = "toolexec"
HELP = "CallTool latency over gRPC: read_file, write_file, execute of true, ledger replay"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark options."""
    parser.add_argument("--iterations", type=int, default=500, help="timed calls per file tool")
    parser.add_argument("--execute-iterations", type=int, default=200, help="timed execute calls")
    parser.add_argument("--warmup", type=int, default=30, help="untimed calls per tool first")
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


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    import psycopg

    from services.toolexec import server as toolexec_server
    from services.toolexec.settings import ToolexecSettings

    tmp = tempfile.mkdtemp(prefix="agentplane-bench-toolexec-")
    os.chmod(tmp, 0o755)  # the embedded Postgres runs as its own user when we are root
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
        secret = "bench-secret-0123456789abcdef-0123456789abcdef"
        settings = Settings.from_env(
            {
                "AGENTPLANE_SECRET": secret,
                "DATABASE_URL": database_url,
                "AGENTPLANE_TOOLEXEC_HOST": "127.0.0.1",
                "AGENTPLANE_TOOLEXEC_PORT": "0",
                "AGENTPLANE_LOG_LEVEL": "WARNING",
            }
        )
        workspaces = os.path.join(tmp, "workspaces")
        server = await toolexec_server.start(
            settings, toolexec_settings=ToolexecSettings(workspaces_dir=workspaces), templates=_NoTemplates()
        )
        try:
            return await _measure(args, server.address, auth.mint_token(secret, "bench", auth.Role.USER))
        finally:
            await server.stop()
    finally:
        if pg is None and args.database_url:
            async with await psycopg.AsyncConnection.connect(args.database_url, autocommit=True) as conn:
                await conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')  # type: ignore[arg-type]
        if pg is not None:
            await asyncio.to_thread(pg.stop)
        shutil.rmtree(tmp, ignore_errors=True)


async def _measure(args: argparse.Namespace, address: str, token: str) -> dict[str, Any]:
    from agentplane.toolexec.v1 import toolexec_service_pb2, toolexec_service_pb2_grpc

    channel = create_channel(address, token=token)
    try:
        stub = toolexec_service_pb2_grpc.ToolExecServiceStub(channel)
        ws = (
            await stub.CreateWorkspace(toolexec_service_pb2.CreateWorkspaceRequest(name="bench"))
        ).workspace.id

        async def timed(
            name: str, arguments: dict[str, Any], n: int, call_id: str | None = None
        ) -> list[float]:
            body = json.dumps(arguments)
            samples: list[float] = []
            for i in range(args.warmup + n):
                request = toolexec_service_pb2.CallToolRequest(
                    workspace_id=ws,
                    tool_call_id=call_id or f"{name}-{i}-{uuid.uuid4().hex[:8]}",
                    name=name,
                    arguments_json=body,
                )
                start = time.perf_counter_ns()
                response = await stub.CallTool(request)
                elapsed = (time.perf_counter_ns() - start) / 1e6
                if response.is_error:
                    raise RuntimeError(f"{name} failed during the benchmark: {response.content}")
                if i >= args.warmup:
                    samples.append(elapsed)
            return samples

        text = "".join(f"line {i}: some text to read back\n" for i in range(100))
        await timed("write_file", {"path": "read_me.txt", "content": text}, 1)
        reads = await timed("read_file", {"path": "read_me.txt"}, args.iterations)
        writes = await timed("write_file", {"path": "out/data.txt", "content": "x" * 1024}, args.iterations)
        executes = await timed("execute", {"command": "true"}, args.execute_iterations)
        replays = await timed("read_file", {"path": "read_me.txt"}, args.iterations, call_id="replayed-call")
    finally:
        await channel.close()

    def p(values: list[float], q: float) -> float:
        return round(percentile(values, 100 * q), 3)

    return {
        "read_file_p50_ms": p(reads, 0.5),
        "read_file_p99_ms": p(reads, 0.99),
        "write_file_p50_ms": p(writes, 0.5),
        "write_file_p99_ms": p(writes, 0.99),
        "execute_true_p50_ms": p(executes, 0.5),
        "execute_true_p99_ms": p(executes, 0.99),
        "replay_p50_ms": p(replays, 0.5),
        "read_file_mean_ms": round(statistics.fmean(reads), 3),
        "iterations": args.iterations,
        "execute_iterations": args.execute_iterations,
    }
