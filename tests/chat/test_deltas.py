"""EventNumberer: streaming events of many chats numbered in one statement, against a real Postgres."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import pytest
from agentplane.chat.v1 import chat_pb2

from services.chat.deltas import EventNumberer
from services.chat.domain import Claim, LeaseLost
from services.chat.server import create_chat_pool
from services.chat.settings import ChatSettings
from services.chat.store import ChatStore
from tests.chat.conftest import text

Batch = list[tuple[str, list[chat_pb2.ChatEvent]]]


@dataclass
class Harness:
    """A store whose streaming events go through a real EventNumberer; records each published batch."""

    store: ChatStore
    batches: list[Batch] = field(default_factory=list)


@pytest.fixture
async def harness(database_url: str) -> AsyncIterator[Harness]:
    pool = await create_chat_pool(database_url, ChatSettings())
    h: Harness | None = None

    async def publish(chat_id: str, events: Sequence[chat_pb2.ChatEvent]) -> None:
        return None  # durable events are not what this test looks at

    async def publish_many(batch: Sequence[tuple[str, Sequence[chat_pb2.ChatEvent]]]) -> None:
        assert h is not None
        h.batches.append([(cid, list(evs)) for cid, evs in batch])

    numberer = EventNumberer(pool, publish_many)
    h = Harness(ChatStore(pool, publish, numberer=numberer))
    try:
        yield h
    finally:
        await numberer.close()
        await pool.close()


def delta(chunk: str) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(part_delta=chat_pb2.PartDelta(text=chunk))


async def running_chats(s: ChatStore, n: int) -> list[Claim]:
    """`n` chats claimed (running) by one worker."""
    for i in range(n):
        await s.create_chat(
            owner_id="alice",
            request_id="",
            content=text(f"c{i}"),
            model_config_id="m",
            workspace_id="",
            title="t",
        )
    claims = await s.claim("worker-a", n, lease_seconds=30)
    assert len(claims) == n
    return claims


async def test_chats_batched_in_one_statement_get_increasing_seqs_in_call_order(harness: Harness) -> None:
    s = harness.store
    claims = await running_chats(s, 3)
    before = {c.chat_id: (await s.get_chat("alice", c.chat_id)).last_seq for c in claims}
    # Interleaved emits of three chats, all queued before the numberer runs: one statement.
    calls: list[tuple[str, list[chat_pb2.ChatEvent]]] = []
    for round_ in range(3):
        for c in claims:
            calls.append((c.chat_id, [delta(f"{c.chat_id[:4]}-{round_}-{k}") for k in range(round_ + 1)]))
    tasks = [
        asyncio.create_task(s.emit(cid, next(c.fence for c in claims if c.chat_id == cid), evs))
        for cid, evs in calls
    ]
    await asyncio.gather(*tasks)

    assert len(harness.batches) == 1, "all queued emits should share one numbering statement"
    [batch] = harness.batches
    assert {cid for cid, _ in batch} == set(before)
    for c in claims:
        # The chat's events, in the order emit was called, numbered last_seq+1, +2, ... without gaps.
        expected = [ev.part_delta.text for cid, evs in calls if cid == c.chat_id for ev in evs]
        published = [ev for cid, evs in batch if cid == c.chat_id for ev in evs]
        assert [ev.part_delta.text for ev in published] == expected
        assert [ev.seq for ev in published] == list(range(before[c.chat_id] + 1, before[c.chat_id] + 1 + 6))
        assert all(ev.chat_id == c.chat_id and ev.time.seconds > 0 for ev in published)
        assert (await s.get_chat("alice", c.chat_id)).last_seq == before[c.chat_id] + 6


async def test_lost_fence_fails_only_that_chat_in_the_batch(harness: Harness) -> None:
    s = harness.store
    claims = await running_chats(s, 3)
    lost = claims[1]
    # Another worker took the chat over: its generation moved past the fence the old run holds.
    async with s._pool.connection() as conn:
        await conn.execute("UPDATE chat_chats SET generation = generation + 1 WHERE id = %s", (lost.chat_id,))
    before = {c.chat_id: (await s.get_chat("alice", c.chat_id)).last_seq for c in claims}

    tasks = {
        c.chat_id: asyncio.create_task(s.emit(c.chat_id, c.fence, [delta("a"), delta("b")])) for c in claims
    }
    results = dict(zip(tasks, await asyncio.gather(*tasks.values(), return_exceptions=True), strict=True))

    assert isinstance(results[lost.chat_id], LeaseLost)
    assert len(harness.batches) == 1
    [batch] = harness.batches
    assert lost.chat_id not in {cid for cid, _ in batch}
    assert (await s.get_chat("alice", lost.chat_id)).last_seq == before[lost.chat_id]
    for c in claims:
        if c is lost:
            continue
        assert results[c.chat_id] is None
        [(_, events)] = [(cid, evs) for cid, evs in batch if cid == c.chat_id]
        assert [ev.seq for ev in events] == [before[c.chat_id] + 1, before[c.chat_id] + 2]
        assert (await s.get_chat("alice", c.chat_id)).last_seq == before[c.chat_id] + 2
    # The numberer keeps working for the healthy chats after the failure.
    await s.emit(claims[0].chat_id, claims[0].fence, [delta("c")])
    assert harness.batches[-1][0][1][0].seq == before[claims[0].chat_id] + 3
