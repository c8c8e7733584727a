"""The invariant checker fails on what it must catch: each rule fed a history or a stream broken
the way a fault could break it (no servers; these run in milliseconds)."""

from __future__ import annotations

import json

from agentplane.chat.v1 import chat_pb2

from tests.faults.invariants import (
    ERROR,
    WAITING,
    ChatExpectation,
    effects_violations,
    history_violations,
    signature_of_calls,
    status_violations,
    stream_violations,
)

USER, ASSISTANT, TOOL = (
    chat_pb2.MESSAGE_ROLE_USER,
    chat_pb2.MESSAGE_ROLE_ASSISTANT,
    chat_pb2.MESSAGE_ROLE_TOOL,
)


def _text(value: str) -> chat_pb2.ContentPart:
    return chat_pb2.ContentPart(text=chat_pb2.TextPart(text=value))


def _call(call_id: str, token: str) -> chat_pb2.ContentPart:
    args = json.dumps({"command": f"echo {token} >> effects.log"})
    return chat_pb2.ContentPart(
        tool_call=chat_pb2.ToolCallPart(id=call_id, name="execute", arguments_json=args)
    )


def _result(call_id: str, *, is_error: bool = False) -> chat_pb2.ContentPart:
    return chat_pb2.ContentPart(tool_result=chat_pb2.ToolResultPart(tool_call_id=call_id, is_error=is_error))


def _msg(
    mid: str, seq: int, role: chat_pb2.MessageRole.ValueType, *parts: chat_pb2.ContentPart
) -> chat_pb2.Message:
    return chat_pb2.Message(id=mid, seq=seq, role=role, parts=list(parts))


# A whole turn: the user asks, the model calls once, the result, the reply.
HISTORY = [
    _msg("u1", 1, USER, _text("hi")),
    _msg("a1", 4, ASSISTANT, _call("k1", "c00-0-0")),
    _msg("t1", 7, TOOL, _result("k1")),
    _msg("a2", 10, ASSISTANT, _text("done")),
]
EXP = ChatExpectation(
    chat_id="chat",
    label="c00",
    sent=["hi"],
    replies={"hi": [signature_of_calls(["c00-0-0"]), "done"]},
    token_prefix="c00-",
)
IDLE = chat_pb2.Chat(status=WAITING, last_seq=11)


def _ev(seq: int, **kind: object) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(seq=seq, **kind)  # type: ignore[arg-type]


def _delta(seq: int, mid: str, text: str) -> chat_pb2.ChatEvent:
    return _ev(seq, part_delta=chat_pb2.PartDelta(message_id=mid, text=text))


def _persisted(seq: int, m: chat_pb2.Message) -> chat_pb2.ChatEvent:
    return _ev(seq, message_persisted=m)


def _status(seq: int, status: chat_pb2.ChatStatus.ValueType) -> chat_pb2.ChatEvent:
    return _ev(seq, status_changed=chat_pb2.StatusChanged(status=status))


STREAM = [
    _persisted(1, HISTORY[0]),
    _status(2, chat_pb2.CHAT_STATUS_RUNNING),
    _persisted(4, HISTORY[1]),
    _persisted(7, HISTORY[2]),
    _delta(8, "a2", "do"),
    _delta(9, "a2", "ne"),
    _persisted(10, HISTORY[3]),
    _status(11, WAITING),
]
DURABLE = [1, 2, 4, 7, 10, 11]


def _stream(events: list[chat_pb2.ChatEvent], *, lossy: bool = False) -> list[str]:
    return stream_violations("s", events, durable=DURABLE, messages=HISTORY, last_seq=11, lossy=lossy)


def test_a_whole_chat_keeps_every_invariant() -> None:
    assert status_violations(EXP, IDLE) == []
    assert history_violations(EXP, IDLE, HISTORY, [], False) == []
    assert effects_violations(EXP, HISTORY, ["c00-0-0", "c01-0-0"]) == []
    assert _stream(STREAM) == []


def test_status_rules() -> None:
    unclear = chat_pb2.Chat(status=ERROR, last_error=chat_pb2.ChatError(reason="X"))
    assert status_violations(EXP, unclear)
    other = chat_pb2.Chat(status=ERROR, last_error=chat_pb2.ChatError(reason="X", message="m"))
    assert status_violations(ChatExpectation("c", "c", [], allowed_errors=("Y",)), other)
    assert not status_violations(ChatExpectation("c", "c", [], allowed_errors=("X",)), other)
    assert status_violations(ChatExpectation("c", "c", [], allowed_errors=("X",), must_fail=True), IDLE)
    assert status_violations(EXP, chat_pb2.Chat(status=chat_pb2.CHAT_STATUS_RUNNING))
    assert status_violations(EXP, chat_pb2.Chat(status=WAITING, queued_message_count=1))


def test_history_rules() -> None:
    lost = ChatExpectation("chat", "c00", ["hi", "again"], token_prefix="c00-")
    assert any("sent" in v for v in history_violations(lost, IDLE, HISTORY, [], False))
    queued = [chat_pb2.QueuedMessage(parts=[_text("again")])]
    assert not history_violations(lost, chat_pb2.Chat(status=ERROR), HISTORY, queued, True)
    doubled = [*HISTORY, _msg("a3", 12, ASSISTANT, _text("done"))]
    assert any("duplicated" in v for v in history_violations(EXP, IDLE, doubled, [], False))
    unanswered = [*HISTORY[:2], HISTORY[3]]
    assert any("answered 0 times" in v for v in history_violations(EXP, IDLE, unanswered, [], False))
    twice = [*HISTORY[:2], _msg("t1", 7, TOOL, _result("k1"), _result("k1")), HISTORY[3]]
    assert any("answered 2 times" in v for v in history_violations(EXP, IDLE, twice, [], False))
    stray = [*HISTORY[:2], _msg("t1", 7, TOOL, _result("k1"), _result("k9")), HISTORY[3]]
    assert any("does not make" in v for v in history_violations(EXP, IDLE, stray, [], False))
    cut = HISTORY[:3]
    assert any("final reply" in v for v in history_violations(EXP, IDLE, cut, [], False))
    # A turn cut short by an ERROR is a prefix of the expected replies, nothing else.
    failed = chat_pb2.Chat(status=ERROR)
    assert not history_violations(EXP, failed, HISTORY[:3], [], True)
    assert history_violations(EXP, failed, [HISTORY[0], HISTORY[3]], [], True)


def test_effects_rules() -> None:
    assert any("ran 0 times" in v for v in effects_violations(EXP, HISTORY, []))
    assert any("ran 2 times" in v for v in effects_violations(EXP, HISTORY, ["c00-0-0", "c00-0-0"]))
    assert any("no persisted call" in v for v in effects_violations(EXP, HISTORY, ["c00-0-0", "c00-5-0"]))
    unknown = [*HISTORY[:2], _msg("t1", 7, TOOL, _result("k1", is_error=True)), HISTORY[3]]
    assert not effects_violations(EXP, unknown, [])
    assert not effects_violations(EXP, unknown, ["c00-0-0"])
    assert effects_violations(EXP, unknown, ["c00-0-0", "c00-0-0"])


def test_stream_rules() -> None:
    assert any("came after" in v for v in _stream([*STREAM[:5], STREAM[4], *STREAM[5:]]))
    assert any("gap" in v for v in _stream([s for s in STREAM if s.seq != 7]))
    assert any("ends at" in v for v in _stream(STREAM[:-1]))
    assert any("rebuilt" in v for v in _stream([s for s in STREAM if s.seq != 8]))
    # The last deltas, numbered with the persist and lost with a replica killed before it
    # published them: a gap right before message_persisted, the text a prefix of the message's.
    assert _stream([s for s in STREAM if s.seq != 9]) == []
    assert _stream([*STREAM[:4], _delta(8, "a2", "da"), *STREAM[6:]])
    # A delta repeated (here: its text sent again under a new seq) shows the text twice.
    assert any("rebuilt" in v for v in _stream([*STREAM[:4], _delta(8, "a2", "done"), *STREAM[5:]]))
    # An abandoned reply's deltas are dropped once discarded; without the mark they are shown.
    abandoned = [
        *STREAM[:3],
        _delta(5, "x", "half"),
        _ev(6, reply_discarded=chat_pb2.ReplyDiscarded(message_id="x")),
    ]
    assert _stream(abandoned + STREAM[3:]) == []
    assert any("never persisted nor discarded" in v for v in _stream(abandoned[:-1] + STREAM[3:]))
    # Lossy streams may miss deltas, never repeat them or show others.
    assert _stream([s for s in STREAM if s.seq != 8], lossy=True) == []
    assert _stream([*STREAM[:5], _delta(9, "a2", "do"), *STREAM[6:]], lossy=True)
