"""What the fault tests run: scripted chats whose every reply and side effect is recognisable,
clients that retry the way a real one does, and live followers that reconnect.

Each chat has a marker (`c07`) and a conversation of its own in the simulator's script. For its
k-th user message the model first calls `execute` (one or two calls), each appending a token
(`c07-k-i`) to `effects.log` in the chat's workspace, then streams a text reply (`c07 reply k:
...`). So the invariants can name what each chat should hold (`ChatPlan.expected`), and the side
effects of every tool call are counted in the workspace.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import psycopg
from agentplane.chat.v1 import chat_pb2, chat_service_pb2

from services.common.rpc_errors import error_info
from tests.faults.invariants import WAITING, ChatExpectation, signature_of_calls
from tests.faults.stack import FaultStack
from tests.helpers import wait_until

EFFECTS_FILE = "effects.log"
# Codes a client retries (with the same request id): the server went away, the database blipped.
RETRIED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.ABORTED}


@dataclass
class TurnPlan:
    """What the model does for one user message: tool calls (their tokens), then a reply."""

    calls: list[str]
    reply: str
    tool_seconds: float = 0.0
    # Simulator faults of this turn's tool-call generation and of its reply (script form).
    call_fault: dict[str, Any] | None = None
    reply_fault: dict[str, Any] | None = None
    # A command that waits for this file in the workspace after appending its token.
    tool_gate: str | None = None

    def command(self, token: str) -> str:
        command = f"echo {token} >> {EFFECTS_FILE}"
        if self.tool_gate:
            command += f"; while [ ! -e {self.tool_gate} ]; do sleep 0.02; done"
        if self.tool_seconds:
            command += f"; sleep {self.tool_seconds}"
        return command

    def turns(self, token_delay_ms: float) -> list[dict[str, Any]]:
        """Its script turns: a tool step (unless it has no calls), then the text reply."""
        out: list[dict[str, Any]] = []
        if self.calls:
            step: dict[str, Any] = {
                "tool_calls": [
                    {"name": "execute", "arguments": {"command": self.command(t), "timeout_seconds": 60}}
                    for t in self.calls
                ]
            }
            if self.call_fault:
                step["fault"] = self.call_fault
            out.append(step)
        reply: dict[str, Any] = {"text": self.reply, "token_delay_ms": token_delay_ms}
        if self.reply_fault:
            reply["fault"] = self.reply_fault
        out.append(reply)
        return out


@dataclass
class ChatPlan:
    """One chat of a scenario: its marker, workspace, model and the turns of its user messages."""

    marker: str
    workspace_id: str
    turns: list[TurnPlan]
    model: str = ""
    token_delay_ms: float = 10.0

    def message(self, k: int) -> str:
        """The k-th user message (the first names the conversation the simulator plays)."""
        return f"[{self.marker}] message {k}"

    def conversation(self) -> dict[str, Any]:
        turns: list[dict[str, Any]] = []
        for turn in self.turns:
            turns += turn.turns(self.token_delay_ms)
        return {"match": f"[{self.marker}]", "turns": turns}

    def expected(self) -> dict[str, list[str]]:
        """User message -> the signatures of its assistant messages, in order."""
        out: dict[str, list[str]] = {}
        for k, turn in enumerate(self.turns):
            sigs = [signature_of_calls(turn.calls)] if turn.calls else []
            out[self.message(k)] = [*sigs, turn.reply]
        return out


def reply_text(marker: str, k: int, words: int) -> str:
    return f"{marker} reply {k}: " + " ".join(f"w{i}" for i in range(words))


def plan_turns(
    rng: random.Random,
    marker: str,
    count: int,
    *,
    words: tuple[int, int] = (20, 40),
    tool_seconds: float = 0.0,
) -> list[TurnPlan]:
    """`count` turns with one or two tool calls each (commands that take `tool_seconds`) and
    replies of a random length."""
    out = []
    for k in range(count):
        calls = [f"{marker}-{k}-{i}" for i in range(rng.choice((1, 1, 2)))]
        out.append(
            TurnPlan(calls=calls, reply=reply_text(marker, k, rng.randint(*words)), tool_seconds=tool_seconds)
        )
    return out


def script_data(plans: Sequence[ChatPlan]) -> list[dict[str, Any]]:
    return [p.conversation() for p in plans]


@dataclass
class TrackedChat:
    """A chat the test drives: what it sent, in order, and what it expects."""

    plan: ChatPlan
    chat_id: str = ""
    sent: list[str] = field(default_factory=list)
    # One send at a time: `sent` is in the order the server stored the messages.
    sending: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def remaining(self) -> int:
        return len(self.plan.turns) - len(self.sent)

    def expectation(self, stack: FaultStack, **kwargs: Any) -> ChatExpectation:
        return ChatExpectation(
            chat_id=self.chat_id,
            label=self.plan.marker,
            sent=list(self.sent),
            replies=self.plan.expected(),
            effects_path=f"{stack.workspace_path(self.plan.workspace_id)}/{EFFECTS_FILE}",
            token_prefix=f"{self.plan.marker}-",
            **kwargs,
        )


class Client:
    """Sends CreateChat / SendMessage as a careful client does: with a request id, retried (same
    id) on whichever replica `addresses()` offers while the one it used is gone or the database
    blips, for at most `within` seconds. Any other failure fails the test."""

    def __init__(
        self,
        stack: FaultStack,
        rng: random.Random,
        addresses: Callable[[], Sequence[str]] | None = None,
        within: float = 60.0,
    ) -> None:
        self._stack = stack
        self._rng = rng
        self._addresses = addresses or (lambda: [stack.chat.address])
        self._within = within
        self.retries = 0

    async def _call(self, method: str, request: Any) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._within
        while True:
            address = self._rng.choice(list(self._addresses()))
            try:
                return await getattr(self._stack.stub(address), method)(request, timeout=15)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRIED or loop.time() > deadline:
                    raise AssertionError(
                        f"{method} failed: {exc.code().name} {error_info(exc)} {exc.details()}"
                    ) from exc
                self.retries += 1
            # A client's backoff before the next attempt, not a wait for some state.
            await asyncio.sleep(0.05)

    async def create(self, chat: TrackedChat) -> None:
        """CreateChat with the plan's first message."""
        text = chat.plan.message(0)
        request = chat_service_pb2.CreateChatRequest(
            content=content(text),
            workspace_id=chat.plan.workspace_id,
            model_config_id=chat.plan.model,
            request_id=f"create-{uuid.uuid4().hex}",
        )
        resp = await self._call("CreateChat", request)
        chat.chat_id = resp.chat.id
        chat.sent.append(text)

    async def send(self, chat: TrackedChat) -> None:
        """SendMessage with the plan's next message (queued when the chat is busy)."""
        async with chat.sending:
            text = chat.plan.message(len(chat.sent))
            request = chat_service_pb2.SendMessageRequest(
                chat_id=chat.chat_id, content=content(text), request_id=f"send-{uuid.uuid4().hex}"
            )
            await self._call("SendMessage", request)
            chat.sent.append(text)


async def feed(
    chat: TrackedChat, client: Client, follower: Follower, rng: random.Random, stop: asyncio.Event
) -> None:
    """Send the chat's messages one after another until `stop`: usually once the previous turn is
    over, sometimes at once (queued behind the running turn). A chat that ended in ERROR gets no
    more (its next message would resume it with a history the script does not foresee)."""
    while chat.remaining and not stop.is_set():
        if rng.random() < 0.7:
            sent = len(chat.sent)
            state = await wait_until(
                lambda: "stop" if stop.is_set() else follower.idle_after(sent),  # noqa: B023 (awaited here)
                what=f"chat {chat.plan.marker} to finish the turn of message {sent}",
                timeout=90,
            )
            if state != WAITING:
                return
        await client.send(chat)


def content(value: str) -> list[chat_pb2.ContentPart]:
    return [chat_pb2.ContentPart(text=chat_pb2.TextPart(text=value))]


class Follower:
    """A client following a chat live from seq 0: when its stream breaks (its replica was killed,
    the database went away) it reconnects to a replica `addresses()` offers, after the last seq
    it got, the way a client resumes. `events` is everything it received, in order."""

    def __init__(
        self,
        stack: FaultStack,
        chat_id: str,
        rng: random.Random,
        addresses: Callable[[], Sequence[str]] | None = None,
    ) -> None:
        self.chat_id = chat_id
        self.events: list[chat_pb2.ChatEvent] = []
        self.reconnects = 0
        # Failures a client must not see (anything but its replica or database being away).
        self.errors: list[str] = []
        self._stack = stack
        self._rng = rng
        self._addresses = addresses or (lambda: [stack.chat.address])
        self.task = asyncio.create_task(self._follow())

    @property
    def last_seq(self) -> int:
        return self.events[-1].seq if self.events else 0

    def idle_after(self, sent: int) -> int | None:
        """The chat's status (WAITING or ERROR) once `sent` user messages were persisted and the
        chat went idle after the last one; None before."""
        users, idle = 0, None
        for e in self.events:
            if e.HasField("message_persisted") and e.message_persisted.role == chat_pb2.MESSAGE_ROLE_USER:
                users, idle = users + 1, None
            elif e.HasField("status_changed"):
                status = e.status_changed.status
                idle = status if status in (WAITING, chat_pb2.CHAT_STATUS_ERROR) else None
        return idle if users >= sent else None

    async def _follow(self) -> None:
        while True:
            address = self._rng.choice(list(self._addresses()))
            call = self._stack.stub(address).StreamChat(
                chat_service_pb2.StreamChatRequest(chat_id=self.chat_id, after_seq=self.last_seq)
            )
            try:
                async for item in call:
                    self.events.append(item.event)
            except grpc.aio.AioRpcError as exc:
                # Its replica died or lost its database (UNAVAILABLE), or it fell behind
                # (RESOURCE_EXHAUSTED): a client resumes elsewhere, and a gap would show.
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED):
                    self.errors.append(f"{exc.code().name} {error_info(exc)} {exc.details()}")
            finally:
                call.cancel()
            self.reconnects += 1
            await asyncio.sleep(0.05)  # a client's reconnect backoff

    async def close(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class Scenario:
    """Chats of `plans` driven by one client, each followed live and fed its messages until
    `finish()`."""

    def __init__(
        self, stack: FaultStack, rng: random.Random, addresses: Callable[[], Sequence[str]] | None = None
    ) -> None:
        self.stack = stack
        self.rng = rng
        self.addresses = addresses
        self.client = Client(stack, rng, addresses)
        self.chats: list[TrackedChat] = []
        self.followers: dict[str, Follower] = {}
        self._stop = asyncio.Event()
        self._feeders: list[asyncio.Task[None]] = []

    async def start(self, plans: Sequence[ChatPlan], *, feed_them: bool = True) -> None:
        """Create the chats (their first message), follow them, and (unless told not to: the test
        sends them itself) start feeding the rest."""
        for plan in plans:
            chat = TrackedChat(plan)
            await self.client.create(chat)
            self.chats.append(chat)
            self.followers[chat.chat_id] = Follower(self.stack, chat.chat_id, self.rng, self.addresses)
        for chat in self.chats if feed_them else []:
            follower = self.followers[chat.chat_id]
            rng = random.Random(self.rng.random())
            self._feeders.append(asyncio.create_task(feed(chat, self.client, follower, rng, self._stop)))

    async def wait_idle(self, within: float = 45) -> None:
        """Until every chat is idle after the last message sent to it."""
        for chat in self.chats:
            follower, sent = self.followers[chat.chat_id], len(chat.sent)
            await wait_until(
                lambda: follower.idle_after(sent),  # noqa: B023 (awaited within the iteration)
                what=f"chat {chat.plan.marker} to finish the turn of message {sent}",
                timeout=within,
            )

    async def wait_phase(self, probe: Probe, phase: str, within: float = 45) -> list[tuple[str, str]]:
        """Until some chat is in `phase` (`PHASE_SQL`); returns (chat id, worker id) of each."""
        return await wait_until(
            lambda: probe.in_phase(phase), what=f"a chat in phase {phase!r}", timeout=within
        )

    async def wait_progress(self, probe: Probe, since: int, within: float = 45) -> int:
        """Until the chats persisted a message each (on average) after `since` messages: the
        system recovered from the last fault. Returns the count now."""
        count = await wait_until(
            probe.messages,
            until=lambda n: n is not None and n >= since + len(self.chats),
            what=f"the chats to persist {len(self.chats)} more messages after {since}",
            timeout=within,
        )
        assert count is not None
        return count

    def send_soon(self) -> asyncio.Task[None] | None:
        """Send one more message to a random chat that has one left, now (in a task: the client
        retries it until the service answers); None when no chat has one left."""
        chats = [c for c in self.chats if c.remaining]
        if not chats:
            return None
        return asyncio.create_task(self.client.send(self.rng.choice(chats)))

    async def fed(self, within: float = 60) -> None:
        """Until every message of every plan was sent (a chat that ended in ERROR gets no more)."""
        async with asyncio.timeout(within):
            await asyncio.gather(*self._feeders)

    async def finish(self) -> None:
        """Send no more messages (the ones sent run to their end)."""
        self._stop.set()
        await asyncio.gather(*self._feeders)

    def expectations(self, **kwargs: Any) -> list[ChatExpectation]:
        return [chat.expectation(self.stack, **kwargs) for chat in self.chats]

    @property
    def reconnects(self) -> int:
        return sum(f.reconnects for f in self.followers.values())

    def stats(self) -> str:
        """What the faults did, as the clients saw it (for reports)."""
        events = [e for f in self.followers.values() for e in f.events]
        discarded = sum(1 for e in events if e.HasField("reply_discarded"))
        retries = sum(1 for e in events if e.HasField("retry_scheduled"))
        sent = sum(len(c.sent) for c in self.chats)
        return (
            f"{sent} messages sent ({self.client.retries} RPC retries), followers reconnected"
            f" {self.reconnects} times, saw {discarded} replies discarded and {retries} retry notices"
        )

    async def close(self) -> None:
        self._stop.set()
        for task in self._feeders:
            task.cancel()
        await asyncio.gather(*self._feeders, return_exceptions=True)
        for follower in self.followers.values():
            await follower.close()


# Chats of the test's database by what they are doing now: a reply streaming (its deltas are out,
# it is not persisted yet), tool calls running (the last message is an assistant message with
# calls), or running at all; with the worker that runs each.
_RUNNING = "SELECT c.id::text, c.worker_id FROM chat_chats c WHERE c.status = 'running'"
PHASE_SQL = {
    "streaming": _RUNNING + " AND c.streaming_message_id IS NOT NULL",
    "tool": _RUNNING
    + " AND (SELECT m.role = 'assistant' AND m.parts @> '[{\"tool_call\": {}}]' FROM chat_messages m"
    " WHERE m.chat_id = c.id AND NOT m.deleted ORDER BY m.seq DESC LIMIT 1)",
    "any": _RUNNING,
}


class Probe:
    """Reads the test's database directly (its own connection, made again after a restart), to
    see what the chats are doing; a query the database cannot answer now returns None."""

    def __init__(self, database_url: str) -> None:
        self._url = database_url
        self._conn: psycopg.AsyncConnection[tuple[Any, ...]] | None = None

    async def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]] | None:
        try:
            if self._conn is None or self._conn.closed:
                self._conn = await psycopg.AsyncConnection.connect(
                    self._url, autocommit=True, connect_timeout=2
                )
            cur = await self._conn.execute(sql, params)  # type: ignore[arg-type]
            return list(await cur.fetchall())
        except psycopg.OperationalError:
            await self.close()
            return None

    async def in_phase(self, phase: str) -> list[tuple[str, str]]:
        """(chat id, worker id) of the chats in `phase` now (none while the database is away)."""
        return [(str(r[0]), str(r[1])) for r in await self.rows(PHASE_SQL[phase]) or []]

    async def messages(self) -> int | None:
        """How many messages the chats have persisted so far."""
        rows = await self.rows("SELECT count(*) FROM chat_messages")
        return int(rows[0][0]) if rows else None

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            with contextlib.suppress(psycopg.Error):
                await conn.close()
