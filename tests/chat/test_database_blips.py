"""A database that restarts or goes away during turns never leaves a chat RUNNING without a run.

Real Postgres and real servers throughout. The chat worker's database sessions are ended with
`pg_terminate_backend` on this test's own database (what a restart does to them), or its
connections go through a TCP proxy that the test cuts (the database is gone) and restores;
the shared server is never stopped. Whatever happens, every chat ends WAITING with its whole
answer soon after the database is back: no user message lost, no assistant message stored
twice, and an interrupt followed by a message runs that message. (That a resumed turn runs no
tool twice is test_replicas.py's.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import psycopg
import pytest
from agentplane.chat.v1 import chat_pb2, chat_service_pb2
from prometheus_client import CollectorRegistry

from services.chat import server as chat_server
from services.chat.liveness import APPLICATION_NAME
from services.common.settings import Settings
from services.simulator.script import Script
from tests.chat.conftest import FAST_CHAT, Stack, start_stack, stop_stack, text
from tests.common.test_database_unavailable import TcpProxy
from tests.helpers import wait_until

SCRIPT = Script.from_data(
    {
        "conversations": [
            # Held until the test has broken the database under the running turns.
            {"match": "count runs", "turns": [{"text": "All done.", "gate": "final"}]}
        ]
    }
)
USER, ASSISTANT = chat_pb2.MESSAGE_ROLE_USER, chat_pb2.MESSAGE_ROLE_ASSISTANT
# A lease far longer than the test: a chat that recovers did not wait for its lease to expire.
LONG_LEASE = replace(FAST_CHAT, lease_seconds=60.0)


async def _start_chats(stack: Stack, n: int) -> list[str]:
    """`n` chats whose replies are being generated (held at the gate)."""
    stub = stack.stub()
    ids = []
    for _ in range(n):
        resp = await stub.CreateChat(chat_service_pb2.CreateChatRequest(content=text("count runs")))
        ids.append(resp.chat.id)
    await stack.sim.wait_held("final", count=n, within=40)
    return ids


async def _check_answers(stack: Stack, ids: list[str], *, continued: frozenset[str] = frozenset()) -> None:
    """Each message once: the user's, then the answer stored once (`continued` chats got one
    more user message before it)."""
    for chat_id in ids:
        msgs = await stack.messages(chat_id)
        roles = [m.role for m in msgs]
        expected = [USER, *([USER] if chat_id in continued else []), ASSISTANT]
        assert roles == expected, (chat_id, roles)
        assert msgs[-1].parts[0].text.text == "All done."


async def _statuses(database_url: str, ids: list[str]) -> dict[str, tuple[str, str | None]]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT id::text, status, worker_id FROM chat_chats WHERE id = ANY(%s::uuid[])", (ids,)
        )
        return {r[0]: (r[1], r[2]) for r in await cur.fetchall()}


async def _liveness_sessions(database_url: str) -> int:
    """Sessions of this database holding a worker's liveness lock."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = %s",
            (APPLICATION_NAME,),
        )
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def _terminate_blocked(admin: psycopg.AsyncConnection[Any], locker_pid: int) -> int:
    """End every session waiting for a lock the locker holds (what a restart does to it)."""
    cur = await admin.execute(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 10000)) FROM pg_stat_activity"
        " WHERE datname = current_database() AND %s = ANY(pg_blocking_pids(pid))",
        (locker_pid,),
    )
    row = await cur.fetchone()
    return int(row[0]) if row else 0


@pytest.mark.timeout(120)
async def test_runs_whose_statements_the_database_ends_hand_their_chats_back(
    settings: Settings, make_token: Callable[..., str], workspaces_dir: str
) -> None:
    """A run's write dies with its session (AdminShutdown), and so does the statement that would
    end the run: the chat must neither stay RUNNING nor end in ERROR; it finishes."""
    stack = await start_stack(settings, make_token, workspaces_dir, chat_settings=LONG_LEASE, script=SCRIPT)
    db_url = stack.settings.require_database_url()
    try:
        ids = await _start_chats(stack, 3)
        async with (
            await psycopg.AsyncConnection.connect(db_url) as locker,
            await psycopg.AsyncConnection.connect(db_url, autocommit=True) as admin,
        ):
            # Every write to these chats now waits for the locker; each waiting session is ended.
            await locker.execute("SELECT 1 FROM chat_chats WHERE id = ANY(%s::uuid[]) FOR UPDATE", (ids,))
            await stack.sim.open_gate("final")
            # The fault lasts two seconds: the runs' writes, and the writes that follow their
            # failure, all die meanwhile.
            ended = 0
            until = time.monotonic() + 2.0
            while time.monotonic() < until:
                ended += await _terminate_blocked(admin, locker.info.backend_pid)
                await asyncio.sleep(0.02)
            await locker.commit()
        assert ended >= 3, "the runs' writes were ended"
        began = time.monotonic()
        for chat_id in ids:
            await stack.wait_status(chat_id, chat_pb2.CHAT_STATUS_WAITING, within=20)
        assert time.monotonic() - began < 20
        await _check_answers(stack, ids)
        assert all(worker is None for _, worker in (await _statuses(db_url, ids)).values())
        # An interrupt then a message: the message runs.
        stub = stack.stub()
        for chat_id in ids:
            await stub.InterruptChat(chat_service_pb2.InterruptChatRequest(chat_id=chat_id))
            await stub.SendMessage(chat_service_pb2.SendMessageRequest(chat_id=chat_id, content=text("more")))
        for chat_id in ids:
            await stack.wait_status(chat_id, chat_pb2.CHAT_STATUS_WAITING, within=20)
            roles = [m.role for m in await stack.messages(chat_id)]
            assert roles == [USER, ASSISTANT, USER, ASSISTANT], roles
    finally:
        await stop_stack(stack)


@pytest.mark.timeout(150)
async def test_chats_survive_quick_database_restarts_and_an_outage(
    settings: Settings, make_token: Callable[..., str], workspaces_dir: str
) -> None:
    """The worker replica reaches the database through a proxy: two 0.3 s cuts while the turns
    generate, then a 12 s outage while they answer. The API replica (direct) watches."""
    stack = await start_stack(
        settings,
        make_token,
        workspaces_dir,
        chat_settings=replace(FAST_CHAT, run_workers=False, worker_id="api-only"),
        script=SCRIPT,
    )
    db_url = stack.settings.require_database_url()
    proxy = TcpProxy(db_url)
    await proxy.start()
    try:
        worker_settings = replace(stack.settings, database_url=proxy.url())
        worker = await chat_server.start(
            worker_settings, replace(LONG_LEASE, worker_id="blip-worker"), registry=CollectorRegistry()
        )
        stack.servers.append(worker)
        ids = await _start_chats(stack, 4)

        for _ in range(2):  # two quick restarts
            await proxy.cut()
            await asyncio.sleep(0.3)  # the length of the outage, not a wait for anything
            await proxy.restore()
        # Every turn generates again (or still), held at the same gate.
        await stack.sim.wait_held("final", count=4, within=30)

        await proxy.cut()
        cut_at = time.monotonic()
        await stack.sim.open_gate("final")
        await wait_until(
            lambda: _liveness_sessions(db_url), until=lambda n: n == 0, what="the worker's session to end"
        )
        # During the outage the user interrupts one chat and sends it another message.
        first = ids[0]
        stub = stack.stub()
        interrupted = (await stub.InterruptChat(chat_service_pb2.InterruptChatRequest(chat_id=first))).chat
        assert interrupted.status == chat_pb2.CHAT_STATUS_WAITING
        sent = await stub.SendMessage(
            chat_service_pb2.SendMessageRequest(chat_id=first, content=text("go on"))
        )
        assert sent.HasField("message"), "the message went into the history, not behind a run that is gone"
        await asyncio.sleep(max(0.0, 12.0 - (time.monotonic() - cut_at)))  # the outage's length
        await proxy.restore()

        began = time.monotonic()
        for chat_id in ids:
            await stack.wait_status(chat_id, chat_pb2.CHAT_STATUS_WAITING, within=30)
        assert time.monotonic() - began < 30
        await _check_answers(stack, ids, continued=frozenset({first}))
        statuses = await _statuses(db_url, ids)
        assert all(s == ("waiting", None) for s in statuses.values()), statuses
        # The worker holds its liveness lock again (it claimed and finished the chats above).
        assert await _liveness_sessions(db_url) == 1
    finally:
        await stop_stack(stack)
        await proxy.cut()


async def _generation(database_url: str, chat_id: str) -> int:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT generation FROM chat_chats WHERE id = %s", (chat_id,))
        row = await cur.fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.timeout(60)
async def test_a_worker_that_loses_its_liveness_session_stops_its_runs(
    settings: Settings, make_token: Callable[..., str], workspaces_dir: str
) -> None:
    """Only the session holding the worker's liveness lock ends: from then on other replicas may
    take its chats, so its runs stop at once; the chat is handed back and finishes once."""
    stack = await start_stack(settings, make_token, workspaces_dir, chat_settings=LONG_LEASE, script=SCRIPT)
    db_url = stack.settings.require_database_url()
    try:
        [chat_id] = await _start_chats(stack, 1)
        before = await _generation(db_url, chat_id)
        async with await psycopg.AsyncConnection.connect(db_url, autocommit=True) as admin:
            cur = await admin.execute(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid, 10000)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name = %s",
                (APPLICATION_NAME,),
            )
            row = await cur.fetchone()
        assert row is not None and row[0] == 1, "the worker held its liveness lock"
        # The run stopped (its generation is over) and a new one generates the reply again.
        await wait_until(
            lambda: _generation(db_url, chat_id), until=lambda g: g > before, what="the run to be stopped"
        )
        await wait_until(
            lambda: stack.sim.gate("final"),
            until=lambda gate: gate.arrived >= 2 and gate.held == 1,
            what="a new run generating, the stopped one's stream closed",
        )
        await stack.sim.open_gate("final")
        await stack.wait_status(chat_id, chat_pb2.CHAT_STATUS_WAITING)
        await _check_answers(stack, [chat_id])
    finally:
        await stop_stack(stack)
