"""A run that is cancelled mid-stream (a replica stopping, its worker cancelling its runs) stops
its model stream with it, so nothing of it is written once the run has ended.

Found by the hostile suites' teardown: a stopped chat server's runs went on streaming in orphaned
tasks and wrote deltas after the database pool had closed ("Task exception was never retrieved:
PoolClosed"), because the race between the stream and the interrupt flag cancelled neither when
the run itself was cancelled.
"""

from __future__ import annotations

import asyncio

from tests.chat.loopkit import FakeModel, Gate, LoopKit, Text


async def test_a_cancelled_run_closes_its_stream_and_writes_nothing_after() -> None:
    gate = Gate("mid-stream")
    kit = LoopKit(model=FakeModel([Text("before "), gate, Text("after")]))
    chat_id = kit.create_chat("stream, then be cancelled")
    _, task = kit.start(chat_id)
    await gate.reached()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5)
    assert done, "the cancelled run did not end"
    # The stream ended with the run: it was cancelled at the gate, not left waiting there to emit
    # "after" from an orphaned task once the gate opened.
    assert gate.cancelled and kit.model.closed_early == 1, "the model stream outlived its run"
    assert "after" not in str(kit.store.events)
