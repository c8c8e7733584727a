"""Leases and fencing in the store, against a real Postgres (no servers needed)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import pytest
from agentplane.chat.v1 import chat_pb2

from services.chat.store import ChatStore, LeaseLost, NewMessage
from services.common import db
from tests.chat.conftest import eventually, text


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[tuple[ChatStore, list[chat_pb2.ChatEvent]]]:
    pool = await db.create_pool(database_url, max_size=4)
    published: list[chat_pb2.ChatEvent] = []

    async def publish(chat_id: str, events: Sequence[chat_pb2.ChatEvent]) -> None:
        published.extend(events)

    try:
        yield ChatStore(pool, publish), published
    finally:
        await pool.close()


async def test_stale_worker_cannot_write(store: tuple[ChatStore, list[chat_pb2.ChatEvent]]) -> None:
    s, published = store
    chat, _ = await s.create_chat(
        owner_id="alice", request_id="", content=text("hi"), model_config_id="m", workspace_id="", title="t"
    )
    [old] = await s.claim("worker-a", 5, lease_seconds=0.2)
    assert old.chat_id == chat.id

    async def swept() -> bool:
        return chat.id in await s.sweep()

    await eventually(swept, within=5)
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
    store: tuple[ChatStore, list[chat_pb2.ChatEvent]],
) -> None:
    s, _ = store
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
    result = await s.renew("w", 30)
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
