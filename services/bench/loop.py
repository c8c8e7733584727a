"""`agentplane bench loop`: the agent loop's own cost per step, through the whole product.

The four services and the LLM simulator run as child processes; the simulator answers at once
(no time to first token, no delay between chunks) from a script: a `write_file` call, then a
final text. Each chat gets its own workspace created through toolexec, so every step really
generates, persists, writes a file and persists the result.

- Step times come from the chat worker itself: with `AGENTPLANE_CHAT_STEP_LOG=1` it logs one
  JSON line per step (logger `agentplane.chat.steps`, field `duration_ms`: generate + persist +
  tools + persist results); we parse exactly the lines of the measured phase from its log file.
- Statements per step come from Postgres: pg_stat_statements is reset right before the measured
  phase and its `calls` are summed afterwards, excluding the benchmark's own role (the benchmark
  watches for finished chats and reads the statistics as a separate Postgres role).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import psycopg
from agentplane.chat.v1 import chat_pb2, chat_service_pb2, chat_service_pb2_grpc
from agentplane.toolexec.v1 import toolexec_service_pb2, toolexec_service_pb2_grpc
from psycopg import conninfo

from services.bench.stack import LocalStack, StackOptions, percentile, rss_mib
from services.common import aio
from services.common.client import create_channel

NAME = "loop"
HELP = "per-step overhead of the agent loop (write_file step + final text) and SQL statements per step"
OBSERVER_ROLE = "agentplane_bench_observer"
STEP_LOGGER = "agentplane.chat.steps"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark flags."""
    parser.add_argument("--chats", type=int, default=100, help="measured chats (2 steps each)")
    parser.add_argument("--warmup-chats", type=int, default=10, help="chats run before measuring")
    parser.add_argument("--concurrency", type=int, default=1, help="chats running at the same time")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds before the run is abandoned")


def script() -> dict[str, Any]:
    """The simulator script: one write_file call, then a final text."""
    return {
        "conversations": [
            {
                "turns": [
                    {
                        "tool_calls": [
                            {
                                "name": "write_file",
                                "arguments": {"path": "notes.txt", "content": "written by the benchmark\n"},
                            }
                        ]
                    },
                    {"text": "Wrote notes.txt."},
                ]
            }
        ]
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark and return its JSON-ready results."""
    return aio.run(asyncio.wait_for(_run(args), args.timeout))


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="agentplane-bench-loop-") as tmp:
        script_path = Path(tmp) / "script.json"
        script_path.write_text(json.dumps(script()))
        async with LocalStack(
            StackOptions(
                simulator_args=("--script", str(script_path), "--ttft-ms", "0", "--token-delay-ms", "0"),
                env={"AGENTPLANE_CHAT_STEP_LOG": "1"},
                stat_statements=True,
            )
        ) as stack:
            return await _measure(stack, args)


async def _measure(stack: LocalStack, args: argparse.Namespace) -> dict[str, Any]:
    with psycopg.connect(stack.database_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {OBSERVER_ROLE} LOGIN SUPERUSER")  # type: ignore[arg-type]
    observer_url = conninfo.make_conninfo(stack.database_url, user=OBSERVER_ROLE)

    token = stack.token("loop-bench-user")
    async with (
        create_channel(stack.addresses["chat"], token=token) as chat_channel,
        create_channel(stack.addresses["toolexec"], token=token) as toolexec_channel,
        await psycopg.AsyncConnection.connect(observer_url, autocommit=True) as observer,
    ):
        chats = chat_service_pb2_grpc.ChatServiceStub(chat_channel)
        toolexec = toolexec_service_pb2_grpc.ToolExecServiceStub(toolexec_channel)

        async def workspaces(n: int) -> list[str]:
            out = []
            for i in range(n):
                reply = await toolexec.CreateWorkspace(
                    toolexec_service_pb2.CreateWorkspaceRequest(name=f"loop-{i}-{uuid.uuid4().hex[:6]}")
                )
                out.append(reply.workspace.id)
            return out

        # Workspaces are created up front: their creation is not part of the loop's cost.
        warm_ws = await workspaces(args.warmup_chats)
        measured_ws = await workspaces(args.chats)
        await _drive(chats, observer, warm_ws, args.concurrency)

        log_path = stack.log_path("chat")
        offset = log_path.stat().st_size
        await observer.execute("SELECT pg_stat_statements_reset()")
        began = time.perf_counter()
        await _drive(chats, observer, measured_ws, args.concurrency)
        elapsed = time.perf_counter() - began
        # Top-level statements are what the services send; nested ones (foreign-key checks run
        # by triggers) are reported separately.
        cur = await observer.execute(
            "SELECT coalesce(sum(s.calls) FILTER (WHERE s.toplevel), 0), coalesce(sum(s.calls), 0)"
            " FROM pg_stat_statements s WHERE s.userid <> (SELECT oid FROM pg_roles WHERE rolname = %s)",
            (OBSERVER_ROLE,),
        )
        row = await cur.fetchone()
        statements, with_nested = (int(row[0]), int(row[1])) if row else (0, 0)
        top = await (
            await observer.execute(
                "SELECT s.calls, left(regexp_replace(s.query, '\\s+', ' ', 'g'), 120)"
                " FROM pg_stat_statements s"
                " WHERE s.userid <> (SELECT oid FROM pg_roles WHERE rolname = %s) AND s.toplevel"
                " ORDER BY s.calls DESC LIMIT 40",
                (OBSERVER_ROLE,),
            )
        ).fetchall()
        steps = await _steps_after(log_path, offset, expected=2 * args.chats)

    return {
        "chats": args.chats,
        "concurrency": args.concurrency,
        "steps": len(steps),
        "step_overhead_p50_ms": round(percentile(steps, 50), 2),
        "step_overhead_p90_ms": round(percentile(steps, 90), 2),
        "step_overhead_p99_ms": round(percentile(steps, 99), 2),
        "step_overhead_max_ms": round(max(steps, default=0.0), 2),
        "sql_statements": statements,
        "sql_per_step": round(statements / len(steps), 2) if steps else 0.0,
        "sql_per_step_with_nested": round(with_nested / len(steps), 2) if steps else 0.0,
        "top_statements": [{"calls": int(c), "query": q} for c, q in top],
        "duration_s": round(elapsed, 2),
        **rss_mib(stack),
    }


async def _drive(
    chats: chat_service_pb2_grpc.ChatServiceStub,
    observer: psycopg.AsyncConnection[Any],
    workspace_ids: list[str],
    concurrency: int,
) -> None:
    """Run one chat per workspace, `concurrency` at a time, each until it is idle again."""
    todo = list(workspace_ids)
    lock = asyncio.Lock()  # one observer connection, one query at a time

    async def lane() -> None:
        while todo:
            ws = todo.pop()
            reply = await chats.CreateChat(
                chat_service_pb2.CreateChatRequest(
                    content=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text="Write notes.txt, please."))],
                    workspace_id=ws,
                )
            )
            await _wait_idle(observer, lock, reply.chat.id)

    await asyncio.gather(*(lane() for _ in range(max(1, concurrency))))


async def _wait_idle(observer: psycopg.AsyncConnection[Any], lock: asyncio.Lock, chat_id: str) -> None:
    """Wait (as the observer role, so it is not counted) until the chat's turn ended."""
    while True:
        async with lock:
            cur = await observer.execute(
                "SELECT status, last_error_message FROM chat_chats WHERE id = %s", (chat_id,)
            )
            row = await cur.fetchone()
        if row is not None and row[0] == "error":
            raise RuntimeError(f"chat {chat_id} failed during the benchmark: {row[1]}")
        if row is not None and row[0] == "waiting":
            return
        await asyncio.sleep(0.005)


async def _steps_after(path: Path, offset: int, *, expected: int) -> list[float]:
    """Step durations (ms) logged after `offset`; waits briefly for the last lines to be flushed."""
    deadline = time.monotonic() + 10
    while True:
        with path.open("rb") as f:
            f.seek(offset)
            lines = f.read().splitlines()
        steps = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("logger") == STEP_LOGGER:
                steps.append(float(rec["duration_ms"]))
        if len(steps) >= expected or time.monotonic() > deadline:
            return steps
        await asyncio.sleep(0.05)
