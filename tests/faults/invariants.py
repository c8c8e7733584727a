"""The invariants every chat must keep whatever fails under it, checked after the faults.

For each chat (`ChatExpectation`), once the faults are over:

- **settles**: within a bound it is WAITING with an empty queue, or in ERROR with a reason and a
  message (and only an allowed reason, when the test says which);
- **no user message lost**: the user messages in its history, then its queue, are exactly the
  ones the client sent, each once, in the order sent;
- **no assistant message duplicated**: no two assistant messages are the same (the workload makes
  every reply and every set of calls unique), and each user message got exactly the replies
  its script names (a prefix of them when the chat ended in ERROR);
- **every tool call answered once**: each call of an assistant message has one result, in the
  tool message right after it, and no result answers a call that is not there;
- **every side effect exactly once**: each `execute` call appends its token to a file in the
  workspace; a call whose result is real appended it once, one whose result is an error (outcome
  unknown) at most once, and no token appears that no persisted call carries;
- **streams are whole**: a replay from seq 0 after the turn and the live follower (which
  reconnected across the faults) each have strictly increasing seqs, every durable event of the
  chat, each persisted message once, and no reply that was neither persisted nor discarded; a
  client that drops the deltas of replies marked `reply_discarded` rebuilds exactly the persisted
  text of each assistant message from its deltas. Two exceptions, both by design: the last deltas
  of a reply are numbered by the statement that persists it, so a replica killed between that
  commit and their publish leaves a gap right before `message_persisted` and the rebuilt text a
  prefix of the message's (a client shows the persisted text in its place); and a stream that
  crossed a Redis outage (`*_may_lose_deltas`) may miss deltas anywhere, so there the deltas must
  only be pieces of the persisted text, in order, none twice;
- **released**: a settled chat is owned by no worker.

`check_chats` reads everything through the public API and the database, collects every
violation of every chat, and fails once with a report naming the chat, what broke and the
events around it (with the test's `context`, e.g. its seed).
"""

from __future__ import annotations

import asyncio
import collections
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc.aio
import psycopg
from agentplane.chat.v1 import chat_pb2, chat_service_pb2

from tests.chat.transcript import Transcript, text_of
from tests.helpers import wait_until

WAITING, ERROR = chat_pb2.CHAT_STATUS_WAITING, chat_pb2.CHAT_STATUS_ERROR
USER, ASSISTANT, TOOL = (
    chat_pb2.MESSAGE_ROLE_USER,
    chat_pb2.MESSAGE_ROLE_ASSISTANT,
    chat_pb2.MESSAGE_ROLE_TOOL,
)
# The token an `execute` call of the workload appends (`echo TOKEN >> effects.log ...`).
TOKEN = re.compile(r"echo (\S+) >> ")
REPORT_EVENTS = 120


class ChatAccess(Protocol):
    """What the checker needs of a stack: the API and the database, directly."""

    database_url: str

    def stub(self, address: str | None = None, user: str = "alice") -> Any: ...


class LiveStream(Protocol):
    """A client's live stream of a chat (`workload.Follower`)."""

    events: list[chat_pb2.ChatEvent]
    reconnects: int
    # StreamChat failures other than the stream's replica or database being away.
    errors: list[str]

    @property
    def last_seq(self) -> int: ...


@dataclass
class ChatExpectation:
    """What the test knows of one chat: what it sent and what it expects."""

    chat_id: str
    label: str
    sent: list[str]
    # User message -> signatures of its assistant messages in order (`signature`); None: unchecked.
    replies: Mapping[str, Sequence[str]] | None = None
    # The workspace file `execute` calls append their tokens to, and this chat's tokens' prefix.
    effects_path: str | None = None
    token_prefix: str = ""
    # ERROR reasons this chat may end with: None any (with a reason and a message), empty none.
    allowed_errors: Collection[str] | None = None
    # The chat must end in ERROR (with one of `allowed_errors`): its fault outlasts every retry.
    must_fail: bool = False
    # Deltas may be missing from the replay after the turn, or from the live follower's stream
    # (they crossed a Redis outage; see the module docstring).
    replay_may_lose_deltas: bool = False
    follower_may_lose_deltas: bool = False


@dataclass
class Observed:
    """What the checker read of one chat once it settled."""

    chat: chat_pb2.Chat
    messages: list[chat_pb2.Message]
    queued: list[chat_pb2.QueuedMessage]
    durable: list[int]
    replay: list[chat_pb2.ChatEvent]
    effects: list[str] = field(default_factory=list)


def signature_of_calls(tokens: Iterable[str]) -> str:
    return "calls: " + ", ".join(tokens)


def tool_calls(message: chat_pb2.Message) -> list[chat_pb2.ToolCallPart]:
    return [p.tool_call for p in message.parts if p.WhichOneof("part") == "tool_call"]


def tool_results(message: chat_pb2.Message) -> list[chat_pb2.ToolResultPart]:
    return [p.tool_result for p in message.parts if p.WhichOneof("part") == "tool_result"]


def call_token(call: chat_pb2.ToolCallPart) -> str | None:
    found = TOKEN.search(call.arguments_json)
    return found.group(1) if found else None


def signature(message: chat_pb2.Message) -> str:
    """An assistant message as the workload names it: its text, or the tokens of its calls."""
    calls = tool_calls(message)
    if calls:
        return signature_of_calls(call_token(c) or f"<{c.name}>" for c in calls)
    return text_of(message)


def settled(chat: chat_pb2.Chat) -> bool:
    return (chat.status == WAITING and chat.queued_message_count == 0) or chat.status == ERROR


def errored(events: Iterable[chat_pb2.ChatEvent]) -> bool:
    """Whether any turn of the chat ended in ERROR (its status events say so)."""
    return any(e.HasField("status_changed") and e.status_changed.status == ERROR for e in events)


# ---------------------------------------------------------------------------------------------
# The rules, as pure functions of what was observed (tests/faults/test_invariants.py feeds them
# broken histories and streams to prove each one can fail).


def status_violations(exp: ChatExpectation, chat: chat_pb2.Chat) -> list[str]:
    out = []
    if exp.must_fail and chat.status != ERROR:
        out.append(f"expected to end in ERROR ({sorted(exp.allowed_errors or [])}), ended {_status(chat)}")
    if chat.status == ERROR:
        err = chat.last_error
        if not err.reason or not err.message:
            out.append(f"ERROR without a clear reason and message: {err}")
        if exp.allowed_errors is not None and err.reason not in exp.allowed_errors:
            out.append(
                f"ended in ERROR {err.reason} ({err.message!r}); allowed: {sorted(exp.allowed_errors)}"
            )
    elif chat.status != WAITING or chat.queued_message_count:
        out.append(
            f"not settled: {chat_pb2.ChatStatus.Name(chat.status)} with {chat.queued_message_count} queued"
        )
    return out


def _status(chat: chat_pb2.Chat) -> str:
    status = chat_pb2.ChatStatus.Name(chat.status).removeprefix("CHAT_STATUS_")
    return f"{status} {chat.last_error.reason}" if chat.status == ERROR else status


def history_violations(
    exp: ChatExpectation,
    chat: chat_pb2.Chat,
    messages: Sequence[chat_pb2.Message],
    queued: Sequence[chat_pb2.QueuedMessage],
    turn_failed: bool,
) -> list[str]:
    out: list[str] = []
    users = [text_of(m) for m in messages if m.role == USER]
    waiting = [text_of(chat_pb2.Message(parts=q.parts)) for q in queued]
    if users + waiting != exp.sent:
        out.append(f"user messages {users} + queued {waiting} != sent {exp.sent}")
    ids = collections.Counter(m.id for m in messages)
    out += [f"message {i} listed {n} times" for i, n in ids.items() if n > 1]
    sigs = collections.Counter(signature(m) for m in messages if m.role == ASSISTANT)
    out += [f"assistant message duplicated ({n} times): {s!r}" for s, n in sigs.items() if n > 1]
    if exp.replies is not None:
        for user, got in _replies_by_user(messages).items():
            want = list(exp.replies.get(user, []))
            if got != want and not (turn_failed and got == want[: len(got)]):
                out.append(f"replies to {user!r}: {got} != expected {want}")
    out += _tool_pairing_violations(messages, complete=chat.status == WAITING)
    if chat.status == WAITING and messages:
        last = messages[-1]
        if last.role != ASSISTANT or tool_calls(last):
            out.append(f"WAITING, but the last message is not a final reply: {_describe(last)}")
    return out


def _replies_by_user(messages: Sequence[chat_pb2.Message]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    current: list[str] | None = None
    for m in messages:
        if m.role == USER:
            current = out.setdefault(text_of(m), [])
        elif m.role == ASSISTANT and current is not None:
            current.append(signature(m))
    return out


def _tool_pairing_violations(messages: Sequence[chat_pb2.Message], *, complete: bool) -> list[str]:
    out = []
    for i, m in enumerate(messages):
        if m.role == TOOL:
            before = messages[i - 1] if i else None
            called = {c.id for c in tool_calls(before)} if before is not None else set()
            stray = [r.tool_call_id for r in tool_results(m) if r.tool_call_id not in called]
            if stray:
                out.append(f"tool message {m.id} answers calls the message before it does not make: {stray}")
        calls = tool_calls(m)
        if not calls:
            continue
        after = messages[i + 1] if i + 1 < len(messages) else None
        answered = collections.Counter(
            r.tool_call_id for r in (tool_results(after) if after is not None and after.role == TOOL else [])
        )
        for c in calls:
            n = answered[c.id]
            if n > 1 or (n == 0 and (complete or after is not None)):
                out.append(f"call {c.id} ({call_token(c)}) answered {n} times")
    return out


def effects_violations(
    exp: ChatExpectation, messages: Sequence[chat_pb2.Message], lines: Sequence[str]
) -> list[str]:
    """Each persisted call's token appears once if its result is real, at most once otherwise."""
    out = []
    ran = collections.Counter(line for line in lines if line.startswith(exp.token_prefix))
    results = {r.tool_call_id: r for m in messages if m.role == TOOL for r in tool_results(m)}
    made: set[str] = set()
    for m in messages:
        for c in tool_calls(m):
            token = call_token(c)
            if token is None:
                continue
            made.add(token)
            result = results.get(c.id)
            n = ran[token]
            if result is not None and not result.is_error and n != 1:
                out.append(f"call {c.id} ({token}) succeeded but its command ran {n} times")
            elif n > 1:
                state = "failed" if result is not None else "has no result"
                out.append(f"call {c.id} ({token}) {state} and its command ran {n} times")
    out += [
        f"{token} ran {n} times but no persisted call carries it"
        for token, n in ran.items()
        if token not in made
    ]
    return out


def stream_violations(
    name: str,
    events: Sequence[chat_pb2.ChatEvent],
    *,
    durable: Sequence[int],
    messages: Sequence[chat_pb2.Message],
    last_seq: int,
    lossy: bool,
) -> list[str]:
    """`events` of a stream followed from seq 0: whole, in order, and showing the persisted text."""
    out = []
    seqs = [e.seq for e in events]
    for i in range(1, len(seqs)):
        if seqs[i] <= seqs[i - 1]:
            out.append(f"{name}: seq {seqs[i]} came after {seqs[i - 1]} (index {i})")
            break
    missing = sorted(set(d for d in durable if d <= last_seq) - set(seqs))
    if missing:
        out.append(f"{name}: durable events missing (a gap): seqs {missing[:20]}")
    if not seqs or seqs[-1] != last_seq:
        out.append(f"{name}: ends at seq {seqs[-1] if seqs else 0}, the chat's last_seq is {last_seq}")
    persisted = collections.Counter(e.message_persisted.id for e in events if e.HasField("message_persisted"))
    out += [f"{name}: message {i} persisted {n} times in the stream" for i, n in persisted.items() if n > 1]
    absent = [m.id for m in messages if m.id not in persisted]
    if absent:
        out.append(f"{name}: no message_persisted for messages {absent}")
    shown = Transcript.of(events)
    for m in messages:
        if m.role != ASSISTANT:
            continue
        if m.id in shown.discarded:
            out.append(f"{name}: message {m.id} was persisted after reply_discarded named it")
            continue
        streamed, stored = shown.texts.get(m.id, ""), text_of(m)
        if lossy:
            if not _in_order_within(_deltas_of(events, m.id), stored):
                out.append(f"{name}: deltas of {m.id} are not pieces of its text in order: {streamed!r}")
        elif streamed != stored and not (stored.startswith(streamed) and _unpublished_tail(events, m.id)):
            out.append(f"{name}: text rebuilt from deltas of {m.id} is {streamed!r}, persisted {stored!r}")
    for reply in shown.unpersisted():
        out.append(f"{name}: reply {reply} streamed {shown.texts[reply]!r}, never persisted nor discarded")
    return out


def read_lines(path: str) -> list[str]:
    """The lines of a small local file (none when it does not exist)."""
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def _unpublished_tail(events: Sequence[chat_pb2.ChatEvent], message_id: str) -> bool:
    """Whether seqs right before the message's `message_persisted` event never came: its last
    deltas, numbered by the statement that persisted it and never published because the replica
    died between that commit and the publish (docs/chat.md, "Events": such a gap is skipped; the
    persisted message has the whole text, which a client shows in place of the streamed one)."""
    for i, e in enumerate(events):
        if e.HasField("message_persisted") and e.message_persisted.id == message_id:
            return i > 0 and events[i - 1].seq < e.seq - 1
    return False


def _deltas_of(events: Sequence[chat_pb2.ChatEvent], message_id: str) -> list[str]:
    return [
        e.part_delta.text
        for e in events
        if e.HasField("part_delta") and e.part_delta.message_id == message_id
    ]


def _in_order_within(pieces: Sequence[str], text: str) -> bool:
    at = 0
    for piece in pieces:
        found = text.find(piece, at)
        if found < 0:
            return False
        at = found + len(piece)
    return True


# ---------------------------------------------------------------------------------------------
# Reading what happened, and the report.


async def check_chats(
    access: ChatAccess,
    chats: Sequence[ChatExpectation],
    followers: Mapping[str, LiveStream] | None = None,
    *,
    context: str = "",
    settle_within: float = 30.0,
) -> None:
    """Wait for every chat to settle, then check every invariant of every chat; fail once with
    every violation found (and the events around it)."""
    followers = followers or {}
    results = await asyncio.gather(
        *(_check_one(access, exp, followers.get(exp.chat_id), settle_within) for exp in chats)
    )
    failed = [report for report in results if report]
    if failed:
        header = f"{len(failed)} of {len(chats)} chats broke an invariant" + (
            f" ({context})" if context else ""
        )
        raise AssertionError(header + "\n\n" + "\n\n".join(failed))


async def _check_one(
    access: ChatAccess, exp: ChatExpectation, follower: LiveStream | None, settle_within: float
) -> str:
    stub = access.stub()
    try:
        chat = await wait_until(
            lambda: _get_chat(stub, exp.chat_id),
            until=settled,
            what=f"chat {exp.label} to settle",
            timeout=settle_within,
        )
    except AssertionError as exc:
        row = await _chat_row(access.database_url, exp.chat_id)
        return _report(exp, [f"did not settle within {settle_within:g} s: {exc}; row: {row}"], None, None)
    observed = await _observe(access, stub, exp, chat)
    violations = status_violations(exp, chat)
    row = await _chat_row(access.database_url, exp.chat_id)
    if row.get("worker_id") is not None:
        violations.append(f"settled, but still owned by worker {row['worker_id']}: {row}")
    violations += history_violations(exp, chat, observed.messages, observed.queued, errored(observed.replay))
    if exp.effects_path is not None:
        violations += effects_violations(exp, observed.messages, observed.effects)
    common = {"durable": observed.durable, "messages": observed.messages, "last_seq": chat.last_seq}
    violations += stream_violations("replay", observed.replay, lossy=exp.replay_may_lose_deltas, **common)  # type: ignore[arg-type]
    live: list[chat_pb2.ChatEvent] | None = None
    if follower is not None:
        try:
            await wait_until(
                lambda: follower.last_seq,
                until=lambda seq: seq >= chat.last_seq,
                what=f"the live follower of {exp.label} to reach seq {chat.last_seq}",
                timeout=20,
            )
        except AssertionError as exc:
            violations.append(f"follower: {exc}")
        live = list(follower.events)
        violations += [f"follower: StreamChat failed with {error}" for error in follower.errors]
        violations += stream_violations("follower", live, lossy=exp.follower_may_lose_deltas, **common)  # type: ignore[arg-type]
    if not violations:
        return ""
    return _report(exp, violations, observed, live)


async def _get_chat(stub: Any, chat_id: str) -> chat_pb2.Chat:
    resp = await stub.GetChat(chat_service_pb2.GetChatRequest(chat_id=chat_id), timeout=10)
    return resp.chat


async def _observe(access: ChatAccess, stub: Any, exp: ChatExpectation, chat: chat_pb2.Chat) -> Observed:
    msgs = await stub.ListMessages(chat_service_pb2.ListMessagesRequest(chat_id=exp.chat_id, page_size=1000))
    queued = await stub.ListQueuedMessages(chat_service_pb2.ListQueuedMessagesRequest(chat_id=exp.chat_id))
    async with await psycopg.AsyncConnection.connect(access.database_url) as conn:
        cur = await conn.execute(
            "SELECT seq FROM chat_events WHERE chat_id = %s ORDER BY seq", (exp.chat_id,)
        )
        durable = [int(r[0]) for r in await cur.fetchall()]
    replay = await _replay(stub, exp.chat_id, chat.last_seq)
    effects = read_lines(exp.effects_path) if exp.effects_path is not None else []
    return Observed(chat, list(msgs.messages), list(queued.queued_messages), durable, replay, effects)


async def _replay(stub: Any, chat_id: str, last_seq: int) -> list[chat_pb2.ChatEvent]:
    """StreamChat from seq 0 up to `last_seq` (or what came within 20 s)."""
    events: list[chat_pb2.ChatEvent] = []
    call = stub.StreamChat(chat_service_pb2.StreamChatRequest(chat_id=chat_id, after_seq=0))
    try:
        async with asyncio.timeout(20):
            async for item in call:
                events.append(item.event)
                if item.event.seq >= last_seq:
                    break
    except (TimeoutError, grpc.aio.AioRpcError):
        pass  # the checks say what is missing
    finally:
        call.cancel()
    return events


async def _chat_row(database_url: str, chat_id: str) -> dict[str, Any]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT status, worker_id, lease_expires_at, generation, interrupt, last_seq,"
            " streaming_message_id, last_error_reason FROM chat_chats WHERE id = %s",
            (chat_id,),
        )
        row = await cur.fetchone()
        names = [d.name for d in cur.description or []]
    return dict(zip(names, row, strict=True)) if row else {}


def _describe(m: chat_pb2.Message) -> str:
    role = chat_pb2.MessageRole.Name(m.role).removeprefix("MESSAGE_ROLE_").lower()
    if m.role == TOOL:
        detail = ", ".join(
            f"{r.tool_call_id}{' ERROR ' + r.content[:60] if r.is_error else ''}" for r in tool_results(m)
        )
    else:
        detail = signature(m)[:80]
    return f"seq {m.seq} {role} {m.id[:8]}: {detail}"


def describe_event(e: chat_pb2.ChatEvent) -> str:
    """One event in a line: `seq kind detail`."""
    kind = e.WhichOneof("event") or "?"
    if kind == "part_delta":
        detail = f"{e.part_delta.message_id[:8]} {e.part_delta.text!r}"
    elif kind == "status_changed":
        detail = chat_pb2.ChatStatus.Name(e.status_changed.status).removeprefix("CHAT_STATUS_")
        if e.status_changed.error.reason:
            detail += f" {e.status_changed.error.reason}"
    elif kind == "message_persisted":
        detail = _describe(e.message_persisted)
    elif kind == "reply_discarded":
        d = e.reply_discarded
        detail = f"{d.message_id[:8]} {d.reason} retrying={d.retrying}"
    elif kind == "tool_call_started":
        detail = f"{e.tool_call_started.tool_call.id}"
    elif kind == "tool_call_finished":
        detail = f"{e.tool_call_finished.tool_result.tool_call_id}"
    elif kind == "retry_scheduled":
        detail = f"attempt {e.retry_scheduled.attempt} {e.retry_scheduled.reason}"
    elif kind == "error":
        detail = f"{e.error.reason}: {e.error.message[:80]}"
    else:
        detail = ""
    return f"{e.seq:>5} {kind} {detail}"


def _report(
    exp: ChatExpectation,
    violations: Sequence[str],
    observed: Observed | None,
    live: Sequence[chat_pb2.ChatEvent] | None,
) -> str:
    lines = [f"chat {exp.label} ({exp.chat_id}):", *(f"  - {v}" for v in violations)]
    if observed is not None:
        lines.append(f"  messages ({_status(observed.chat)}, last_seq {observed.chat.last_seq}):")
        lines += [f"    {_describe(m)}" for m in observed.messages]
        if observed.effects:
            mine = [line for line in observed.effects if line.startswith(exp.token_prefix)]
            lines.append(f"  side effects: {mine}")
        streams = [("replay", observed.replay)] + ([("follower", live)] if live is not None else [])
        for name, events in streams:
            mine = [v for v in violations if v.startswith(f"{name}:")]
            if mine:
                shown = _window(events, {m for v in mine for m in _UUID.findall(v)})
                lines.append(f"  {name} events ({len(shown)} of {len(events)}):")
                lines += [f"    {describe_event(e)}" for e in shown]
    return "\n".join(lines)


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _window(events: Sequence[chat_pb2.ChatEvent], message_ids: set[str]) -> Sequence[chat_pb2.ChatEvent]:
    """The events around the messages a violation names (from a few before the first event that
    names one to a few after the last), else the last `REPORT_EVENTS`."""
    touching = [i for i, e in enumerate(events) if message_ids & set(_UUID.findall(str(e)))]
    if not touching:
        return events[-REPORT_EVENTS:]
    return events[max(touching[0] - 8, 0) : touching[-1] + 4][-REPORT_EVENTS:]
