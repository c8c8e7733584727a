"""The demo's live view honours `reply_discarded`: the partial text is marked as not kept and a
late delta of the discarded reply is not shown."""

from __future__ import annotations

import io

from agentplane.chat.v1 import chat_pb2

from services.demo.render import LiveView


def _delta(message_id: str, text: str) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(part_delta=chat_pb2.PartDelta(message_id=message_id, text=text))


def test_a_discarded_reply_is_marked_and_its_late_deltas_dropped() -> None:
    out = io.StringIO()
    view = LiveView(out, spinner=False)
    view.event(_delta("m1", "The answer is"))
    discarded = chat_pb2.ReplyDiscarded(message_id="m1", reason="STREAM_INTERRUPTED", retrying=True)
    view.event(chat_pb2.ChatEvent(reply_discarded=discarded))
    view.event(_delta("m1", " forty"))  # published late by the run that broke
    view.event(_delta("m2", "The answer is 42."))
    view.close()
    assert out.getvalue() == (
        "The answer is\n"
        "[reply discarded (STREAM_INTERRUPTED): the text above is not kept; retrying]\n"
        "The answer is 42.\n"
    )
