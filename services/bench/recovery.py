"""`agentplane bench recovery`: how soon a killed chat replica's chats run again elsewhere.

N chat replicas run as child processes (with config, inference, toolexec and the LLM simulator)
with the production lease settings. Each round starts chats whose replies stream for a few
seconds, SIGKILLs the replica running the most of them at a random point of their turn, and
watches (every 10 ms, from Postgres) each of its chats: when another replica claimed it
(`reclaim`) and when it was WAITING again with its answer (`waiting`). The killed replica is then
started again under a new worker id, and the next round begins.

Before the rounds it measures the chat replicas' database work at idle: pg_stat_statements calls
of the replicas' own Postgres role (the benchmark's queries run as another role) over a quiet
period, in statements per second.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from typing import Any

import psycopg
from agentplane.chat.v1 import chat_pb2, chat_service_pb2, chat_service_pb2_grpc
from psycopg import conninfo

from services.bench.stack import LocalStack, StackOptions, percentile
from services.common import aio
from services.common.client import create_channel

NAME = "recovery"
HELP = "SIGKILL chat replicas mid-turn: kill -> re-claimed and kill -> WAITING latencies, idle SQL/s"
OBSERVER_ROLE = "agentplane_bench_observer"
# The chat replicas' own role, so their statements can be told from everyone else's.
CHAT_ROLE = "agentplane_bench_chat"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark flags."""
    parser.add_argument("--replicas", type=int, default=3, help="chat replicas (at least 2)")
    parser.add_argument("--kills", type=int, default=10, help="rounds, one SIGKILL each")
    parser.add_argument("--chats", type=int, default=6, help="chats started in each round")
    parser.add_argument("--words", type=int, default=60, help="words of each reply (one token each)")
    parser.add_argument("--token-delay-ms", type=int, default=50, help="simulator delay between chunks")
    parser.add_argument(
        "--idle-seconds", type=float, default=30.0, help="quiet period measured for idle SQL/s"
    )
    parser.add_argument("--seed", type=int, default=1, help="seed of the random kill points")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds before the run is abandoned")


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark and return its JSON-ready results."""
    if args.replicas < 2:
        raise SystemExit("--replicas must be at least 2: a killed replica's chats need another one")
    return aio.run(asyncio.wait_for(_run(args), args.timeout))


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    options = StackOptions(
        services=("config", "inference", "toolexec"),
        simulator_args=("--ttft-ms", "200", "--token-delay-ms", str(args.token_delay_ms)),
        stat_statements=True,
    )
    async with LocalStack(options) as stack:
        return await _measure(stack, args)


class _Replicas:
    """The chat replicas: started, killed and started again under new worker ids."""

    def __init__(self, stack: LocalStack, database_url: str) -> None:
        self.stack = stack
        self.database_url = database_url
        self.worker_of: dict[int, str] = {}  # slot -> worker id of its live replica
        self.name_of: dict[int, str] = {}  # slot -> the stack's process name
        self.started = 0

    async def start(self, slot: int) -> None:
        self.started += 1
        worker_id = f"bench-chat-{slot}-{self.started}"
        name = f"chat-{slot}-{self.started}"
        await self.stack.start_replica(
            name,
            "chat",
            {"DATABASE_URL": self.database_url, "AGENTPLANE_CHAT_WORKER_ID": worker_id},
        )
        self.worker_of[slot], self.name_of[slot] = worker_id, name

    def address(self, slot: int) -> str:
        return self.stack.addresses[self.name_of[slot]]


async def _measure(stack: LocalStack, args: argparse.Namespace) -> dict[str, Any]:
    with psycopg.connect(stack.database_url, autocommit=True) as admin:
        for role in (OBSERVER_ROLE, CHAT_ROLE):
            admin.execute(f"CREATE ROLE {role} LOGIN SUPERUSER")  # type: ignore[arg-type]
    observer_url = conninfo.make_conninfo(stack.database_url, user=OBSERVER_ROLE)
    replicas = _Replicas(stack, conninfo.make_conninfo(stack.database_url, user=CHAT_ROLE))
    for slot in range(args.replicas):
        await replicas.start(slot)
    rng = random.Random(args.seed)
    async with await psycopg.AsyncConnection.connect(observer_url, autocommit=True) as observer:
        idle = await _idle_statements(observer, args.idle_seconds)
        kills = []
        for _ in range(args.kills):
            kills.append(await _round(stack, replicas, observer, args, rng))
    reclaim = [ms for k in kills for ms in k["reclaim_ms"]]
    waiting = [ms for k in kills for ms in k["waiting_ms"]]
    return {
        "replicas": args.replicas,
        "kills": len(kills),
        "chats_per_round": args.chats,
        "killed_chats": len(reclaim),
        "failed_chats": sum(k["failed"] for k in kills),
        "reclaim_p50_ms": round(percentile(reclaim, 50)),
        "reclaim_max_ms": round(max(reclaim, default=0.0)),
        "waiting_p50_ms": round(percentile(waiting, 50)),
        "waiting_max_ms": round(max(waiting, default=0.0)),
        "per_kill": [
            {
                "chats": len(k["reclaim_ms"]),
                "killed_after_ms": k["killed_after_ms"],
                "reclaim_max_ms": round(max(k["reclaim_ms"], default=0.0)),
                "waiting_max_ms": round(max(k["waiting_ms"], default=0.0)),
            }
            for k in kills
        ],
        **idle,
    }


async def _idle_statements(observer: psycopg.AsyncConnection[Any], seconds: float) -> dict[str, Any]:
    """The chat replicas' statements per second while no chat exists."""
    await asyncio.sleep(2.0)  # past their start-up statements
    await observer.execute("SELECT pg_stat_statements_reset()")
    began = time.monotonic()
    await asyncio.sleep(seconds)
    cur = await observer.execute(
        "SELECT s.calls, left(regexp_replace(s.query, '\\s+', ' ', 'g'), 100) FROM pg_stat_statements s"
        " WHERE s.userid = (SELECT oid FROM pg_roles WHERE rolname = %s) AND s.toplevel"
        " ORDER BY s.calls DESC",
        (CHAT_ROLE,),
    )
    rows = await cur.fetchall()
    elapsed = time.monotonic() - began
    calls = sum(int(r[0]) for r in rows)
    return {
        "idle_seconds": round(elapsed, 1),
        "idle_statements_per_second": round(calls / elapsed, 3),
        "idle_statements": [{"calls": int(c), "query": q} for c, q in rows[:10]],
    }


async def _chat_rows(
    observer: psycopg.AsyncConnection[Any], ids: list[str]
) -> dict[str, tuple[str, str | None]]:
    cur = await observer.execute(
        "SELECT id::text, status, worker_id FROM chat_chats WHERE id = ANY(%s::uuid[])", (ids,)
    )
    return {r[0]: (r[1], r[2]) for r in await cur.fetchall()}


async def _round(
    stack: LocalStack,
    replicas: _Replicas,
    observer: psycopg.AsyncConnection[Any],
    args: argparse.Namespace,
    rng: random.Random,
) -> dict[str, Any]:
    """Start chats, kill the replica running most of them mid-turn, time their recovery."""
    slot_api = rng.randrange(args.replicas)
    async with create_channel(replicas.address(slot_api), token=stack.token("recovery-bench")) as channel:
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        ids = []
        for i in range(args.chats):
            reply = await stub.CreateChat(
                chat_service_pb2.CreateChatRequest(
                    content=[
                        chat_pb2.ContentPart(
                            text=chat_pb2.TextPart(
                                text=f"recovery {i} {uuid.uuid4().hex[:6]} [[words={args.words}]]"
                            )
                        )
                    ]
                )
            )
            ids.append(reply.chat.id)
    # Every chat running, then a random point of the turn (replies take about words x delay).
    deadline = time.monotonic() + 60
    while True:
        rows = await _chat_rows(observer, ids)
        if all(status == "running" for status, _ in rows.values()):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"chats did not all start running: {rows}")
        await asyncio.sleep(0.01)
    turn_ms = 200 + args.words * args.token_delay_ms
    killed_after_ms = round(rng.uniform(0.1, 0.6) * turn_ms)
    await asyncio.sleep(killed_after_ms / 1000)
    rows = await _chat_rows(observer, ids)
    owners: dict[str, list[str]] = {}
    for chat_id, (status, worker) in rows.items():
        if status == "running" and worker is not None:
            owners.setdefault(worker, []).append(chat_id)
    by_slot = {slot: owners.get(w, []) for slot, w in replicas.worker_of.items()}
    victim = max(by_slot, key=lambda slot: len(by_slot[slot]))
    victim_worker, victim_chats = replicas.worker_of[victim], by_slot[victim]
    if not victim_chats:
        raise RuntimeError(f"no replica was running a chat to kill: {rows}")

    stack.kill(replicas.name_of[victim])
    killed = time.perf_counter()
    reclaim: dict[str, float] = {}
    waiting: dict[str, float] = {}
    failed = 0
    while len(waiting) < len(victim_chats):
        now = (time.perf_counter() - killed) * 1000
        if now > 120_000:
            raise RuntimeError(f"chats of the killed replica not WAITING after 120 s: {victim_chats}")
        for chat_id, (status, worker) in (await _chat_rows(observer, victim_chats)).items():
            if chat_id not in reclaim and worker is not None and worker != victim_worker:
                reclaim[chat_id] = now
            if chat_id not in waiting and status in ("waiting", "error"):
                waiting[chat_id] = now
                reclaim.setdefault(chat_id, now)  # claimed and finished between two looks
                failed += status == "error"
        await asyncio.sleep(0.01)

    await replicas.start(victim)
    # The round's other chats finish too before the next round starts.
    while True:
        rows = await _chat_rows(observer, ids)
        if all(status in ("waiting", "error") for status, _ in rows.values()):
            break
        await asyncio.sleep(0.05)
    return {
        "reclaim_ms": list(reclaim.values()),
        "waiting_ms": list(waiting.values()),
        "killed_after_ms": killed_after_ms,
        "failed": failed,
    }
