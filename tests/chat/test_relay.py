"""The Postgres relay of live chat events (used while Redis is down), through a real Postgres."""

from __future__ import annotations

import uuid

import psycopg
from agentplane.chat.v1 import chat_pb2

from services.chat.relay import MAX_EVENT_BYTES, MAX_PAYLOAD, RELAY_CHANNEL, PgRelay, is_stub, payloads
from services.common import db


def delta(chat_id: str, seq: int, text: str) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(
        seq=seq, chat_id=chat_id, part_delta=chat_pb2.PartDelta(message_id="m", part_index=0, text=text)
    )


def persisted(chat_id: str, seq: int, text: str) -> chat_pb2.ChatEvent:
    message = chat_pb2.Message(
        id="m",
        role=chat_pb2.MESSAGE_ROLE_ASSISTANT,
        parts=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text=text))],
    )
    return chat_pb2.ChatEvent(seq=seq, chat_id=chat_id, message_persisted=message)


async def test_events_cross_replicas_through_notify_whole_and_in_order(database_url: str) -> None:
    chat_a, chat_b = str(uuid.uuid4()), str(uuid.uuid4())
    # Many small deltas (several notifications' worth), a message larger than one notification,
    # and one event beyond the relay's limit (sent as a stub with its seq).
    sent_a = [delta(chat_a, seq, f"{seq:04d} " * 20) for seq in range(1, 301)]
    sent_a.append(persisted(chat_a, 301, "x" * 40_000))
    sent_a.append(persisted(chat_a, 302, "y" * (MAX_EVENT_BYTES + 10)))
    sent_a.append(delta(chat_a, 303, "after the big one"))
    sent_b = [delta(chat_b, seq, "b") for seq in range(1, 4)]

    pool = await db.create_pool(database_url, autocommit=True)
    sender, receiver = PgRelay(pool), PgRelay(pool)
    try:
        async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as listener:
            await listener.execute(f"LISTEN {RELAY_CHANNEL}")
            for ev in sent_a[:150]:
                sender.send(chat_a, [ev])
            sender.send(chat_b, sent_b)
            sender.send(chat_a, sent_a[150:])
            await sender.close()  # sends what is queued
            assert sender.sent > 10
            got: dict[str, list[chat_pb2.ChatEvent]] = {chat_a: [], chat_b: []}
            notes = [n async for n in listener.notifies(timeout=10, stop_after=sender.sent)]
            assert len(notes) == sender.sent
            for note in notes:
                assert len(note.payload.encode()) <= MAX_PAYLOAD
                assert sender.receive(note.payload, lambda _: True)[1] == [], "a replica skips its own"
                chat_id, events = receiver.receive(note.payload, lambda _: True)
                got[chat_id].extend(events)
    finally:
        await pool.close()

    assert got[chat_b] == sent_b
    assert [e.seq for e in got[chat_a]] == list(range(1, 304))
    assert got[chat_a][:301] == sent_a[:301]
    big = got[chat_a][301]
    assert is_stub(big) and big.seq == 302, "too large: a stub the subscriber reads from Postgres"
    assert got[chat_a][302] == sent_a[302]


async def test_a_round_with_a_missed_piece_is_dropped_and_the_next_one_is_whole(database_url: str) -> None:
    chat_id = str(uuid.uuid4())
    first = payloads("sender", chat_id, [delta(chat_id, seq, "z" * 1000) for seq in range(1, 20)])
    second = payloads("sender", chat_id, [delta(chat_id, 20, "next")])
    assert len(first) > 2 and len(second) == 1
    pool = await db.create_pool(database_url)
    try:
        receiver = PgRelay(pool)
        # The LISTEN connection was re-opened in the middle of the first round: piece 1 is missing.
        for payload in [first[0], *first[2:]]:
            assert receiver.receive(payload, lambda _: True) == (chat_id, [])
        assert receiver.receive(second[0], lambda _: True) == (chat_id, [delta(chat_id, 20, "next")])
        # A chat without subscribers here is not even decoded.
        assert receiver.receive(second[0], lambda _: False) == (chat_id, [])
    finally:
        await pool.close()
