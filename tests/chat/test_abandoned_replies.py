"""Replies abandoned mid-stream are marked in the stream (`reply_discarded`), against the real stack.

A replica SIGKILLed mid-reply, and a provider stream dropped mid-reply, both leave part_delta
events of a message that is never persisted. A client following the chat live, and one replaying
it from seq 0 afterwards, must both end with exactly the persisted reply.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import psycopg
import pytest
from agentplane.chat.v1 import chat_pb2, chat_service_pb2

from services.chat.loop_replies import RUN_ABANDONED, STREAM_INTERRUPTED
from services.common.settings import Settings
from services.simulator.script import Script
from tests.chat.conftest import FAST_CHAT, Stack, start_stack, stop_stack, text
from tests.chat.test_replicas import _replica_env, _spawn_replica
from tests.chat.transcript import Transcript, streamed_text, text_of
from tests.helpers import wait_until

WORDS = [f"w{i}" for i in range(40)]
HELD_AFTER = 10  # output chunks (one word each) streamed before the reply holds at its gate
PREFIX = " ".join(WORDS[:HELD_AFTER])
FULL = " ".join(WORDS)


class _Follower:
    """A StreamChat call from `after` that keeps every event until the chat WAITs after `floor`."""

    def __init__(self, stack: Stack, chat_id: str, after: int = 0, floor: int = 0) -> None:
        self.events: list[chat_pb2.ChatEvent] = []
        self._call = stack.stub().StreamChat(
            chat_service_pb2.StreamChatRequest(chat_id=chat_id, after_seq=after)
        )
        self._floor = floor
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for item in self._call:
            ev = item.event
            self.events.append(ev)
            waiting = (
                ev.HasField("status_changed") and ev.status_changed.status == chat_pb2.CHAT_STATUS_WAITING
            )
            if waiting and ev.seq > self._floor:
                return

    async def done(self, within: float = 40) -> list[chat_pb2.ChatEvent]:
        await asyncio.wait_for(self.task, within)
        return self.events

    def close(self) -> None:
        self._call.cancel()
        self.task.cancel()


def _check_stream(events: list[chat_pb2.ChatEvent], reply: chat_pb2.Message, reason: str) -> str:
    """The stream shows exactly the persisted reply once the discarded one is dropped; returns the
    discarded reply's id."""
    seqs = [e.seq for e in events]
    assert seqs == sorted(set(seqs)), "strictly increasing, no repeats"
    discards = [e.reply_discarded for e in events if e.HasField("reply_discarded")]
    assert len(discards) == 1, discards
    [discarded] = discards
    assert discarded.reason == reason and discarded.retrying and discarded.message_id != reply.id
    # The partial reply was streamed, under the id the discard names, before the discard.
    at = next(i for i, e in enumerate(events) if e.HasField("reply_discarded"))
    partial = [e for e in events[:at] if e.HasField("part_delta")]
    assert {e.part_delta.message_id for e in partial} == {discarded.message_id}
    assert streamed_text(partial) == PREFIX
    shown = Transcript.of(events)
    assert shown.shown() == [text_of(reply)] and not shown.unpersisted() and shown.late_deltas == 0
    return discarded.message_id


async def _streaming_message_id(settings: Settings, chat_id: str) -> Any:
    async with await psycopg.AsyncConnection.connect(settings.require_database_url()) as conn:
        cur = await conn.execute("SELECT streaming_message_id FROM chat_chats WHERE id = %s", (chat_id,))
        row = await cur.fetchone()
        assert row is not None
        return row[0]


@pytest.mark.timeout(120)
async def test_a_reply_of_a_killed_replica_is_discarded_for_live_and_replaying_clients(
    settings: Settings, make_token: Callable[..., str], workspaces_dir: str, tmp_path: Any
) -> None:
    script = Script.from_data(
        [{"turns": [{"text": FULL, "gate": {"name": "mid", "after_chunks": HELD_AFTER}}]}]
    )
    # This replica serves the API only: replica B (a real process) runs the chat, then dies.
    stack = await start_stack(
        settings,
        make_token,
        workspaces_dir,
        chat_settings=replace(FAST_CHAT, run_workers=False),
        script=script,
    )
    proc = None
    live: _Follower | None = None
    try:
        proc = await _spawn_replica(_replica_env(stack.settings, "replica-b"), str(tmp_path / "b.log"))
        chat = (await stack.stub().CreateChat(chat_service_pb2.CreateChatRequest(content=text("go")))).chat
        live = following = _Follower(stack, chat.id)
        await stack.sim.wait_held("mid", within=40)
        # B streamed the first words to the live client (through Redis: it is another process).
        await wait_until(
            lambda: streamed_text(following.events),
            until=lambda streamed: streamed == PREFIX,
            what="the live client to get the words streamed before the gate",
        )
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
        await stack.sim.open_gate("mid")
        # Another replica sweeps B's lease and runs the chat again.
        await stack.start_chat_replica(FAST_CHAT)
        events = await live.done()

        [_, reply] = await stack.messages(chat.id)
        assert text_of(reply) == FULL and reply.role == chat_pb2.MESSAGE_ROLE_ASSISTANT
        abandoned = _check_stream(events, reply, RUN_ABANDONED)
        # A client replaying the chat afterwards sees the same: the partial deltas (still in the
        # Redis buffer), marked by the durable discard, then the whole reply.
        replay = await _Follower(stack, chat.id).done()
        assert _check_stream(replay, reply, RUN_ABANDONED) == abandoned
        assert [e.seq for e in replay if not e.HasField("part_delta")] == [
            e.seq for e in events if not e.HasField("part_delta")
        ]
        assert await _streaming_message_id(stack.settings, chat.id) is None
    finally:
        if live is not None:
            live.close()
        if proc is not None and proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 10)
        await stop_stack(stack)


async def test_a_provider_stream_dropped_mid_reply_is_discarded_and_generated_again(stack: Stack) -> None:
    stack.sim.set_script(
        Script.from_data(
            [
                {
                    "turns": [
                        {
                            "text": FULL,
                            "gate": {"name": "mid", "after_chunks": HELD_AFTER},
                            # The first attempt's connection drops right after the gate.
                            "fault": {"kind": "drop", "after_chunks": HELD_AFTER, "times": 1},
                        }
                    ]
                }
            ]
        )
    )
    chat = (await stack.stub().CreateChat(chat_service_pb2.CreateChatRequest(content=text("go")))).chat
    live = _Follower(stack, chat.id)
    try:
        await stack.sim.wait_held("mid")
        await wait_until(
            lambda: streamed_text(live.events),
            until=lambda streamed: streamed == PREFIX,
            what="the live client to get the words streamed before the drop",
        )
        await stack.sim.open_gate("mid")
        events = await live.done()
    finally:
        live.close()

    [_, reply] = await stack.messages(chat.id)
    assert text_of(reply) == FULL
    _check_stream(events, reply, STREAM_INTERRUPTED)
    retries = [e.retry_scheduled for e in events if e.HasField("retry_scheduled")]
    assert [(r.attempt, r.reason) for r in retries] == [(2, STREAM_INTERRUPTED)]
    replay = await _Follower(stack, chat.id).done()
    _check_stream(replay, reply, STREAM_INTERRUPTED)
    assert len(stack.sim.requests) == 2, "one dropped attempt, one retry"
    assert (await stack.chat_of(chat.id)).status == chat_pb2.CHAT_STATUS_WAITING
