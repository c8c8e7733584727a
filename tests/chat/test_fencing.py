"""Leases and fencing in the store, against a real Postgres (no servers needed)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import psycopg
import pytest
from agentplane.chat.v1 import chat_pb2
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from services.chat.deltas import EventNumberer
from services.chat.domain import LeaseLost, NewMessage
from services.chat.liveness import LivenessLock
from services.chat.server import create_chat_pool
from services.chat.settings import ChatSettings
from services.chat.store import ChatStore
from services.chat.store.leases import owner_gone
from tests.chat.conftest import text
from tests.helpers import wait_until


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[tuple[ChatStore, list[chat_pb2.ChatEvent]]]:
    """The store as the chat service builds it (its pool, a numberer), recording what it publishes."""
    pool = await create_chat_pool(database_url, ChatSettings())
    published: list[chat_pb2.ChatEvent] = []

    async def publish(chat_id: str, events: Sequence[chat_pb2.ChatEvent]) -> None:
        published.extend(events)

    async def publish_many(batch: Sequence[tuple[str, Sequence[chat_pb2.ChatEvent]]]) -> None:
        for _, events in batch:
            published.extend(events)

    numberer = EventNumberer(pool, publish_many)
    try:
        yield ChatStore(pool, publish, numberer=numberer), published
    finally:
        await numberer.close()
        await pool.close()


@asynccontextmanager
async def alive(database_url: str, worker_id: str) -> AsyncIterator[LivenessLock]:
    """`worker_id` is alive to sweeps and interrupts: it holds its liveness lock, as a running
    worker does. Leaving the block ends the lock's session, as the death of its process would."""
    lock = LivenessLock(database_url, worker_id, on_held=lambda: None, on_lost=lambda: None)
    await lock.start()
    assert lock.held
    try:
        yield lock
    finally:
        await lock.stop()


async def _owner_gone(database_url: str, chat_id: str) -> bool:
    """What InterruptChat sees: the chat's owner can no longer be running it."""
    async with await psycopg.AsyncConnection.connect(database_url, row_factory=dict_row) as conn:
        async with conn.cursor() as cur:
            return await owner_gone(cur, chat_id)


async def _owner(database_url: str, chat_id: str) -> tuple[str | None, str | None, str]:
    """The chat row's worker_id, interrupt flag and status."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT worker_id, interrupt, status FROM chat_chats WHERE id = %s", (chat_id,)
        )
        row = await cur.fetchone()
    assert row is not None
    return row[0], row[1], row[2]


async def test_stale_worker_cannot_write(store: tuple[ChatStore, list[chat_pb2.ChatEvent]]) -> None:
    s, published = store
    chat, _ = await s.create_chat(
        owner_id="alice", request_id="", content=text("hi"), model_config_id="m", workspace_id="", title="t"
    )
    [old] = await s.claim("worker-a", 5, lease_seconds=0.2)
    assert old.chat_id == chat.id

    await wait_until(s.sweep, until=lambda swept: chat.id in swept, what="the expired lease to be swept")
    [new] = await s.claim("worker-b", 5, lease_seconds=30)
    assert new.chat_id == chat.id and new.fence.generation > old.fence.generation
    seq_before = (await s.get_chat("alice", chat.id)).last_seq
    reply = NewMessage(role="assistant", parts=text("stale"), sender_id="service:chat")
    with pytest.raises(LeaseLost):
        await s.persist(chat.id, old.fence, reply)
    with pytest.raises(LeaseLost):
        await s.emit(chat.id, old.fence, [chat_pb2.ChatEvent(part_delta=chat_pb2.PartDelta(text="x"))])
    with pytest.raises(LeaseLost):
        await s.finish_turn(chat.id, old.fence)
    with pytest.raises(LeaseLost):
        await s.fail_run(chat.id, old.fence, "X", "y")
    after = await s.get_chat("alice", chat.id)
    assert after.last_seq == seq_before and after.status == chat_pb2.CHAT_STATUS_RUNNING
    assert [m.role for m in await s.history(chat.id)] == [chat_pb2.MESSAGE_ROLE_USER]
    # The new owner still writes.
    await s.persist(
        chat.id, new.fence, NewMessage(role="assistant", parts=text("fresh"), sender_id="service:chat")
    )
    assert not await s.finish_turn(chat.id, new.fence)
    assert (await s.get_chat("alice", chat.id)).status == chat_pb2.CHAT_STATUS_WAITING
    assert [e.seq for e in published] == sorted({e.seq for e in published})


async def test_renewal_reports_lost_and_interrupted_chats(
    store: tuple[ChatStore, list[chat_pb2.ChatEvent]], database_url: str
) -> None:
    s, _ = store
    async with alive(database_url, "w"):
        await _renewal_reports_lost_and_interrupted_chats(s)


async def _renewal_reports_lost_and_interrupted_chats(s: ChatStore) -> None:
    ids = []
    for i in range(3):
        chat, _ = await s.create_chat(
            owner_id="alice",
            request_id="",
            content=text(f"c{i}"),
            model_config_id="m",
            workspace_id="",
            title="t",
        )
        ids.append(chat.id)
    claims = await s.claim("w", 10, lease_seconds=30)
    assert {c.chat_id for c in claims} == set(ids)
    await s.interrupt("alice", ids[0])
    await s.edit_message(
        owner_id="alice",
        chat_id=ids[1],
        message_id=(await s.history(ids[1]))[0].id,
        content=text("edited"),
    )
    result = await s.renew("w", {c.chat_id: c.fence.generation for c in claims}, 30)
    # The edit took chat 1 away (new generation, no worker); chat 0 is still ours but interrupted.
    assert set(result.held) == {ids[0], ids[2]}
    assert result.interrupted == {ids[0]}
    assert (await s.get_chat("alice", ids[1])).status == chat_pb2.CHAT_STATUS_PENDING
    assert [m.parts[0].text.text for m in await s.history(ids[1])] == ["edited"]


async def test_claim_skips_locked_and_respects_limit(
    store: tuple[ChatStore, list[chat_pb2.ChatEvent]],
) -> None:
    s, _ = store
    for i in range(5):
        await s.create_chat(
            owner_id="alice",
            request_id="",
            content=text(f"c{i}"),
            model_config_id="m",
            workspace_id="",
            title="t",
        )
    a = await s.claim("a", 2, 30)
    b = await s.claim("b", 10, 30)
    assert len(a) == 2 and len(b) == 3
    assert not {c.chat_id for c in a} & {c.chat_id for c in b}


async def _blocked_on_lock(conn: psycopg.AsyncConnection[Any], pid: int) -> bool:
    cur = await conn.execute(
        "SELECT count(*) FROM pg_stat_activity"
        " WHERE datname = current_database() AND wait_event_type = 'Lock' AND pid <> %s",
        (pid,),
    )
    row = await cur.fetchone()
    return row is not None and row[0] > 0


async def test_finish_turn_never_strands_a_message_queued_meanwhile(
    store: tuple[ChatStore, list[chat_pb2.ChatEvent]], database_url: str
) -> None:
    s, published = store
    chat, _ = await s.create_chat(
        owner_id="alice", request_id="", content=text("hi"), model_config_id="m", workspace_id="", title="t"
    )
    [claim] = await s.claim("w", 5, lease_seconds=30)
    async with (
        await psycopg.AsyncConnection.connect(database_url) as sender,
        await psycopg.AsyncConnection.connect(database_url, autocommit=True) as watcher,
    ):
        # What SendMessage does to a running chat, held open: lock the row, queue, bump last_seq.
        await sender.execute("SELECT 1 FROM chat_chats WHERE id = %s FOR UPDATE", (chat.id,))
        queued_id = str(uuid.uuid4())
        await sender.execute(
            "INSERT INTO chat_queued_messages (id, chat_id, position, parts, sender_id)"
            " VALUES (%s, %s, 0, %s, 'alice')",
            (queued_id, chat.id, Jsonb([{"text": {"text": "queued meanwhile"}}])),
        )
        await sender.execute("UPDATE chat_chats SET last_seq = last_seq + 1 WHERE id = %s", (chat.id,))
        # finish_turn takes its snapshot now (the queue looks empty) and waits for the row lock.
        finishing = asyncio.create_task(s.finish_turn(chat.id, claim.fence))
        await wait_until(
            lambda: _blocked_on_lock(watcher, sender.info.backend_pid),
            what="finish_turn to wait for the row lock",
        )
        await sender.commit()
        assert await asyncio.wait_for(finishing, 10) is not None  # the next turn began
    history = await s.history(chat.id)
    assert [m.id for m in history][-1] == queued_id
    assert history[-1].parts[0].text.text == "queued meanwhile"
    after = await s.get_chat("alice", chat.id)
    assert after.status == chat_pb2.CHAT_STATUS_RUNNING and after.queued_message_count == 0
    delivered = [e for e in published if e.message_persisted.id == queued_id]
    assert len(delivered) == 1 and delivered[0].seq == history[-1].seq
    # The next finish finds the queue empty and releases the chat with one WAITING event.
    assert not await s.finish_turn(chat.id, claim.fence)
    final = await s.get_chat("alice", chat.id)
    assert final.status == chat_pb2.CHAT_STATUS_WAITING and published[-1].seq == final.last_seq
    assert published[-1].status_changed.status == chat_pb2.CHAT_STATUS_WAITING
    stored = await s.events_between(chat.id, 0)
    assert [e.seq for e in stored] == sorted({e.seq for e in stored})


async def test_claim_starts_runs_in_its_statement(
    store: tuple[ChatStore, list[chat_pb2.ChatEvent]],
) -> None:
    s, published = store
    chat, _ = await s.create_chat(
        owner_id="alice", request_id="", content=text("hi"), model_config_id="m", workspace_id="ws", title="t"
    )
    [claim] = await s.claim("w", 5, lease_seconds=30)
    assert claim.info is not None
    assert (claim.info.owner_id, claim.info.model_config_id, claim.info.workspace_id) == ("alice", "m", "ws")
    got = await s.get_chat("alice", chat.id)
    assert got.status == chat_pb2.CHAT_STATUS_RUNNING and got.last_seq == 3
    running = published[-1]
    assert running.seq == 3 and running.chat_id == chat.id
    assert running.status_changed.status == chat_pb2.CHAT_STATUS_RUNNING
    # The stored copy is the same event (its chat_id appended by SQL).
    stored = (await s.events_between(chat.id, 2))[0]
    assert stored == running


async def test_claim_of_a_resume_interrupt_leaves_delivery_to_start_run(
    store: tuple[ChatStore, list[chat_pb2.ChatEvent]],
) -> None:
    s, _ = store
    chat, _ = await s.create_chat(
        owner_id="alice", request_id="", content=text("hi"), model_config_id="m", workspace_id="", title="t"
    )
    [old] = await s.claim("w1", 5, lease_seconds=0.2)
    _, _, queued = await s.send_message(
        owner_id="alice", chat_id=chat.id, request_id="", content=text("next"), interrupt=True
    )
    assert queued is not None

    # The lease expires: PENDING, interrupt still 'resume'.
    await wait_until(s.sweep, until=lambda swept: chat.id in swept, what="the expired lease to be swept")
    [claim] = await s.claim("w2", 5, lease_seconds=30)
    assert claim.info is None and claim.fence.generation > old.fence.generation
    info = (await s.start_run(chat.id, claim.fence)).info
    assert info.owner_id == "alice"
    history = await s.history(chat.id)
    assert [m.id for m in history][-1] == queued.id
    assert (await s.get_chat("alice", chat.id)).queued_message_count == 0


async def test_renewal_renews_only_held_runs_and_hands_back_the_rest(
    store: tuple[ChatStore, list[chat_pb2.ChatEvent]], database_url: str
) -> None:
    s, _ = store
    ids = []
    for i in range(4):
        chat, _ = await s.create_chat(
            owner_id="alice",
            request_id="",
            content=text(f"c{i}"),
            model_config_id="m",
            workspace_id="",
            title="t",
        )
        ids.append(chat.id)
    async with alive(database_url, "w"):
        claims = {c.chat_id: c for c in await s.claim("w", 10, lease_seconds=30)}
        assert set(claims) == set(ids)
        # Chat 3 was interrupted (WAITING, still owned until its run wraps up).
        await s.interrupt("alice", ids[3])
        assert await _owner(database_url, ids[3]) == ("w", "stop", "waiting")
        # Only chat 0's run is still in memory (chat 1's with an older generation): the runs of
        # 1, 2 and 3 ended without giving their chats back (their database was away).
        held = {ids[0]: claims[ids[0]].fence.generation, ids[1]: claims[ids[1]].fence.generation - 1}
        result = await s.renew("w", held, 30)
        assert set(result.held) == {ids[0]} and result.held[ids[0]] == claims[ids[0]].fence
        assert result.handed_back == {ids[1], ids[2], ids[3]}
        assert await _owner(database_url, ids[0]) == ("w", None, "running")
        for chat_id in ids[1:3]:
            assert await _owner(database_url, chat_id) == (None, None, "pending")
        assert await _owner(database_url, ids[3]) == (None, None, "waiting")
        # Their old fences write nothing; any worker continues the pending ones.
        reply = NewMessage(role="assistant", parts=text("late"), sender_id="service:chat")
        with pytest.raises(LeaseLost):
            await s.persist(ids[2], claims[ids[2]].fence, reply)
        again = {c.chat_id: c for c in await s.claim("w2", 10, lease_seconds=30)}
        assert set(again) == {ids[1], ids[2]}
        assert again[ids[2]].fence.generation > claims[ids[2]].fence.generation
        # The interrupted chat is idle: the next message goes into the history and runs.
        _, message, queued = await s.send_message(
            owner_id="alice", chat_id=ids[3], request_id="", content=text("next"), interrupt=False
        )
        assert message is not None and queued is None
        assert await _owner(database_url, ids[3]) == (None, None, "pending")


async def test_sweep_hands_back_the_chats_of_a_worker_whose_session_ended(
    store: tuple[ChatStore, list[chat_pb2.ChatEvent]], database_url: str
) -> None:
    s, _ = store
    ids = []
    for i in range(2):
        chat, _ = await s.create_chat(
            owner_id="alice",
            request_id="",
            content=text(f"c{i}"),
            model_config_id="m",
            workspace_id="",
            title="t",
        )
        ids.append(chat.id)
    async with alive(database_url, "live"):
        async with alive(database_url, "doomed"):
            [kept] = await s.claim("live", 1, lease_seconds=30)
            [doomed] = await s.claim("doomed", 1, lease_seconds=30)
            # Both owners hold their locks and their leases run for 30 s: nothing to sweep.
            assert await s.sweep() == []
        # The doomed worker's session ended (its process was killed): its chat comes back at
        # the next sweep, long before its lease would expire.
        swept = await wait_until(s.sweep, what="the dead worker's chat to be swept")
        assert swept == [doomed.chat_id]
        assert await _owner(database_url, doomed.chat_id) == (None, None, "pending")
        assert await _owner(database_url, kept.chat_id) == ("live", None, "running")
        [again] = await s.claim("live", 5, lease_seconds=30)
        assert again.chat_id == doomed.chat_id and again.fence.generation > doomed.fence.generation


async def test_interrupt_of_a_chat_whose_worker_is_gone_leaves_it_idle_and_unowned(
    store: tuple[ChatStore, list[chat_pb2.ChatEvent]], database_url: str
) -> None:
    s, _ = store
    chat, _ = await s.create_chat(
        owner_id="alice", request_id="", content=text("hi"), model_config_id="m", workspace_id="", title="t"
    )
    async with alive(database_url, "gone"):
        [claim] = await s.claim("gone", 5, lease_seconds=30)
    # Its worker died with the run; the lease still runs for 30 s. Postgres drops the session's
    # lock once the backend has exited, a moment after the client closed it.
    await wait_until(lambda: _owner_gone(database_url, chat.id), what="the dead worker's lock to go")
    interrupted = await s.interrupt("alice", chat.id)
    assert interrupted.status == chat_pb2.CHAT_STATUS_WAITING
    assert await _owner(database_url, chat.id) == (None, None, "waiting")
    with pytest.raises(LeaseLost):
        await s.finish_turn(chat.id, claim.fence)
    # The next message is not queued behind a run that no longer exists: it runs.
    _, message, queued = await s.send_message(
        owner_id="alice", chat_id=chat.id, request_id="", content=text("again"), interrupt=False
    )
    assert message is not None and queued is None
    assert (await s.get_chat("alice", chat.id)).status == chat_pb2.CHAT_STATUS_PENDING
