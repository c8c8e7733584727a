"""A test environment for the agent loop: in-memory Model, Tools, Prompts and Store, no servers.

In the spirit of Temporal's `temporalio.testing` and Coder's chatloop tests: `services.chat.loop`
runs for real against fakes that honour its protocols, and a test steers it through gates
instead of timing. A `Gate` placed in a model reply, a tool or a store write stops the loop at
that point; the test waits until it is reached, acts (interrupts, takes the lease away) and opens
it. Nothing sleeps.

- `FakeModel(*replies)`: each `generate` plays the next scripted reply (text and reasoning deltas,
  tool calls, usage, retry notices, a `Fail` that raises `ModelError`, gates) and records the
  request. A reply may also be a function of the request.
- `FakeTools`: a few workspace tools over an in-memory file dict, or any handler; records every
  call with the user it acted for, and the on-behalf-of identity that was ambient at the time.
- `FakePrompts`: model limits, the system prompt and user prompts.
- `FakeStore`: chats, messages and events in memory with the real store's rules: every fenced
  write checks the fence (a stale one raises `LeaseLost` and changes nothing), every event gets
  the chat's next seq, `history` starts at the latest summary, `finish_turn` delivers queued
  messages. Every event is kept in `events`, every write in `writes`.
- `LoopKit`: the four wired together; `create_chat`, `context`, `run`, `start`, `interrupt`.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from agentplane.chat.v1 import chat_pb2
from agentplane.inference.v1 import inference_pb2, inference_service_pb2

from services.chat import loop as loop_mod
from services.chat import parts as parts_mod
from services.chat.domain import Fence, LeaseLost, NewMessage, RunInfo, StartedRun
from services.chat.loop import LoopConfig, ModelError, ModelLimits, RunContext, ToolOutcome
from services.common import auth
from services.common.errors import FailedPrecondition

MODEL = "model-1"
OWNER = "alice"
WORKSPACE = "ws-1"

# --- gates ------------------------------------------------------------------------------


class Gate:
    """A point where a fake stops until the test opens it.

    The fake calls `passing()`; the test awaits `reached()`, does what it wants to do in that
    phase, then `open()`s the gate (or leaves it closed when the loop is expected to cancel it).
    """

    def __init__(self, name: str = "gate") -> None:
        self.name = name
        self._reached = asyncio.Event()
        self._open = asyncio.Event()
        self.cancelled = False

    async def passing(self) -> None:
        self._reached.set()
        try:
            await self._open.wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise

    async def reached(self, within: float = 5.0) -> None:
        """Wait until the loop is at the gate (bounded, so a wrong script fails instead of hanging)."""
        async with asyncio.timeout(within):
            await self._reached.wait()

    def open(self) -> None:
        self._open.set()


# --- the model --------------------------------------------------------------------------


@dataclass(frozen=True)
class Text:
    """A text delta."""

    text: str


@dataclass(frozen=True)
class Reasoning:
    """A reasoning delta (the signature and redacted data come once, as providers send them)."""

    text: str = ""
    signature: str = ""
    redacted_data: bytes = b""


@dataclass(frozen=True)
class Call:
    """A complete tool call; `arguments` is JSON text as given, or an object to encode."""

    name: str
    arguments: Any = field(default_factory=dict)
    id: str = ""

    def arguments_json(self) -> str:
        return self.arguments if isinstance(self.arguments, str) else json.dumps(self.arguments)


@dataclass(frozen=True)
class Usage:
    """The generation's usage event."""

    input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    cost_micros: int | None = None


@dataclass(frozen=True)
class Retry:
    """A retry notice from inference."""

    attempt: int = 2
    max_attempts: int = 3
    delay_ms: int = 500
    reason: str = "RATE_LIMITED"
    message: str = "the provider is rate limiting"


@dataclass(frozen=True)
class Fail:
    """The generation fails: `ModelError(reason, message)` is raised at this point of the stream."""

    reason: str
    message: str = "the model failed"


Item = Text | Reasoning | Call | Usage | Retry | Fail | Gate
Reply = Sequence[Item] | Callable[[inference_service_pb2.GenerateRequest], Sequence[Item]]


def summary_reply(text: str = "The summary.", *items: Item) -> list[Item]:
    """A reply to a compaction request."""
    return [*items, Text(text), Usage(input_tokens=50, output_tokens=10)]


def is_summary_request(request: inference_service_pb2.GenerateRequest) -> bool:
    """True for the request `compact` sends (no tools, ending with the summary instruction)."""
    if not request.messages:
        return False
    last = request.messages[-1]
    return any(p.text.text.endswith(loop_mod.SUMMARY_PROMPT) for p in last.parts)


class FakeModel:
    """`loop.Model` playing scripted replies in order."""

    def __init__(self, *replies: Reply) -> None:
        self.replies: list[Reply] = list(replies)
        self.requests: list[inference_service_pb2.GenerateRequest] = []
        self.closed_early = 0  # streams the consumer stopped before their end (interrupts)
        self._ids = itertools.count(1)

    def add(self, *replies: Reply) -> None:
        self.replies.extend(replies)

    async def generate(
        self, request: inference_service_pb2.GenerateRequest
    ) -> AsyncIterator[inference_service_pb2.GenerateResponse]:
        """Play the next reply; fails the test (AssertionError) when the script is exhausted."""
        self.requests.append(request)
        if not self.replies:
            raise AssertionError(f"the model was asked for generation {len(self.requests)}, not scripted")
        reply = self.replies.pop(0)
        items = reply(request) if callable(reply) else reply
        finished = False
        try:
            for item in items:
                if isinstance(item, Gate):
                    await item.passing()
                elif isinstance(item, Fail):
                    finished = True
                    raise ModelError(item.reason, item.message)
                else:
                    yield self._event(item)
            finished = True
            yield inference_service_pb2.GenerateResponse(
                finish=inference_pb2.Finish(reason=inference_pb2.FINISH_REASON_STOP)
            )
        finally:
            if not finished:
                self.closed_early += 1

    def _event(self, item: Item) -> inference_service_pb2.GenerateResponse:
        R = inference_service_pb2.GenerateResponse
        if isinstance(item, Text):
            return R(text_delta=inference_pb2.TextDelta(text=item.text))
        if isinstance(item, Reasoning):
            return R(
                reasoning_delta=inference_pb2.ReasoningDelta(
                    text=item.text, signature=item.signature, redacted_data=item.redacted_data
                )
            )
        if isinstance(item, Call):
            call_id = item.id or f"call-{next(self._ids)}"
            return R(
                tool_call=inference_pb2.ToolCallPart(
                    id=call_id, name=item.name, arguments_json=item.arguments_json()
                )
            )
        if isinstance(item, Usage):
            usage = inference_pb2.Usage(
                input_tokens=item.input_tokens,
                output_tokens=item.output_tokens,
                reasoning_tokens=item.reasoning_tokens,
                cache_read_tokens=item.cache_read_tokens,
                cache_write_tokens=item.cache_write_tokens,
            )
            if item.cost_micros is not None:
                usage.cost_micros = item.cost_micros
            return R(usage=usage)
        if isinstance(item, Retry):
            return R(
                retry=inference_pb2.RetryNotice(
                    attempt=item.attempt,
                    max_attempts=item.max_attempts,
                    delay_ms=item.delay_ms,
                    reason=item.reason,
                    message=item.message,
                )
            )
        raise TypeError(f"not a script item: {item!r}")


# --- tools ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToolCallRecord:
    """One call the loop made through `Tools.call`."""

    user_id: str
    workspace_id: str
    tool_call_id: str
    name: str
    arguments: dict[str, Any]
    # The on-behalf-of user outgoing calls would carry from ambient context at the time (the loop
    # passes identity explicitly, so this is expected to be None).
    ambient_user: str | None

    @property
    def model_id(self) -> str:
        """The model's id of the call, after the chat's namespace (see services/chat/tool_ids.py)."""
        return self.tool_call_id.split("/", 3)[-1]


Handler = Callable[[dict[str, Any]], ToolOutcome | str | Awaitable[ToolOutcome | str]]


class FakeTools:
    """`loop.Tools`: `read_file` / `write_file` over `files`, `echo`, plus any handlers given."""

    def __init__(
        self, files: dict[str, str] | None = None, handlers: dict[str, Handler] | None = None
    ) -> None:
        self.files: dict[str, str] = dict(files or {})
        self.handlers: dict[str, Handler] = {
            "read_file": self._read_file,
            "write_file": self._write_file,
            "echo": lambda args: json.dumps(args, sort_keys=True),
            **(handlers or {}),
        }
        self.calls: list[ToolCallRecord] = []
        self.finished: list[str] = []  # tool_call_ids whose handler returned
        self.list_calls = 0
        self.listing_errors: list[ModelError] = []  # raised by the next list_tools calls
        self._gates: dict[str, list[Gate]] = {}

    @property
    def model_calls(self) -> list[ToolCallRecord]:
        """The calls the model made (without the loop's own read of AGENTS.md)."""
        return [c for c in self.calls if not c.tool_call_id.startswith("agentplane-agents-md-")]

    def gate(self, name: str) -> Gate:
        """The next call of tool `name` stops at the returned gate before it answers."""
        g = Gate(f"tool {name}")
        self._gates.setdefault(name, []).append(g)
        return g

    async def list_tools(self) -> list[inference_pb2.ToolDefinition]:
        self.list_calls += 1
        if self.listing_errors:
            raise self.listing_errors.pop(0)
        return [
            inference_pb2.ToolDefinition(name=n, description=f"The {n} tool.", input_schema_json="{}")
            for n in sorted(self.handlers)
        ]

    async def call(
        self, workspace_id: str, tool_call_id: str, name: str, arguments_json: str, *, user_id: str
    ) -> ToolOutcome:
        args = json.loads(arguments_json or "{}")
        self.calls.append(
            ToolCallRecord(user_id, workspace_id, tool_call_id, name, args, auth.outgoing_on_behalf_of())
        )
        gates = self._gates.get(name)
        if gates:
            await gates.pop(0).passing()
        handler = self.handlers.get(name)
        if handler is None:
            return ToolOutcome(f"no tool {name}", True)
        out = handler(args)
        if inspect.isawaitable(out):
            out = await out
        self.finished.append(tool_call_id)
        return ToolOutcome(out, False) if isinstance(out, str) else out

    def _read_file(self, args: dict[str, Any]) -> ToolOutcome:
        path = str(args.get("path", ""))
        if path not in self.files:
            return ToolOutcome(f"{path}: no such file", True)
        return ToolOutcome(self.files[path], False)

    def _write_file(self, args: dict[str, Any]) -> ToolOutcome:
        self.files[str(args["path"])] = str(args.get("content", ""))
        return ToolOutcome(f"wrote {args['path']}", False)


# --- prompts ----------------------------------------------------------------------------


class FakePrompts:
    """`loop.Prompts` from plain values."""

    def __init__(
        self,
        *,
        context_limit: int = 0,
        threshold_percent: int = 0,
        system: str = "You are a test agent.",
        user_prompts: dict[str, str] | None = None,
    ) -> None:
        self.context_limit = context_limit
        self.threshold_percent = threshold_percent
        self.system = system
        self.user_prompts = dict(user_prompts or {})
        self.user_prompt_calls: list[str] = []

    async def model(self, model_config_id: str) -> ModelLimits:
        return ModelLimits(model_config_id, self.context_limit, self.threshold_percent)

    async def system_prompt(self) -> str:
        return self.system

    async def user_prompt(self, user_id: str) -> str:
        self.user_prompt_calls.append(user_id)
        return self.user_prompts.get(user_id, "")


# --- the store --------------------------------------------------------------------------

_ROLES = {
    "user": chat_pb2.MESSAGE_ROLE_USER,
    "assistant": chat_pb2.MESSAGE_ROLE_ASSISTANT,
    "tool": chat_pb2.MESSAGE_ROLE_TOOL,
    "summary": chat_pb2.MESSAGE_ROLE_SUMMARY,
}
_STATUSES = {
    "pending": chat_pb2.CHAT_STATUS_PENDING,
    "running": chat_pb2.CHAT_STATUS_RUNNING,
    "waiting": chat_pb2.CHAT_STATUS_WAITING,
    "error": chat_pb2.CHAT_STATUS_ERROR,
}


@dataclass
class FakeChat:
    """One chat's row, messages and queue."""

    id: str
    owner_id: str
    model_config_id: str
    workspace_id: str
    agents_md: str | None = None
    status: str = "waiting"
    worker_id: str | None = None
    generation: int = 0
    last_seq: int = 0
    last_error: tuple[str, str] | None = None
    usage: chat_pb2.Usage = field(default_factory=chat_pb2.Usage)
    messages: list[chat_pb2.Message] = field(default_factory=list)
    queue: list[str] = field(default_factory=list)
    # The reply whose deltas were numbered and which is not persisted yet (streaming_message_id).
    streaming: str | None = None


@dataclass(frozen=True)
class Write:
    """One store call that changed something (what tests assert on besides events)."""

    method: str
    chat_id: str
    role: str = ""
    agents_md: str | None = None
    fenced: bool = True


_USAGE_FIELDS = (
    "input_tokens",
    "output_tokens",
    "reasoning_tokens",
    "cache_read_tokens",
    "cache_write_tokens",
    "cost_micros",
)


class FakeStore:
    """`loop.Store` in memory, fenced and numbered like `ChatStore`."""

    def __init__(self) -> None:
        self.chats: dict[str, FakeChat] = {}
        self.events: list[chat_pb2.ChatEvent] = []
        self.writes: list[Write] = []
        self.turns_began: dict[str, list[float]] = {}  # per chat, when each turn's start committed
        self._gates: list[tuple[str, str | None, Gate]] = []

    # -- set-up and inspection used by tests --

    def create_chat(
        self,
        text: str = "hello",
        *,
        owner_id: str = OWNER,
        model_config_id: str = MODEL,
        workspace_id: str = WORKSPACE,
        agents_md: str | None = None,
        history: Sequence[NewMessage] = (),
    ) -> str:
        """A PENDING chat whose history is `history` followed by the user's `text`."""
        chat = FakeChat(str(uuid.uuid4()), owner_id, model_config_id, workspace_id, agents_md)
        self.chats[chat.id] = chat
        for msg in [*history, NewMessage("user", [parts_mod.text_part(text)], owner_id)]:
            self._append(chat, msg, str(uuid.uuid4()))
        chat.status = "pending"
        return chat.id

    def claim(self, chat_id: str, worker_id: str = "worker-1") -> Fence:
        """Take the chat for a run (new generation); the run's `start_run` announces it."""
        chat = self.chats[chat_id]
        chat.worker_id, chat.generation, chat.status = worker_id, chat.generation + 1, "running"
        return Fence(worker_id, chat.generation)

    def take_away(self, chat_id: str) -> None:
        """What a sweep, an edit or a delete does to a run: every later fenced write is LeaseLost."""
        chat = self.chats[chat_id]
        chat.worker_id, chat.generation, chat.status = None, chat.generation + 1, "pending"

    def send(self, chat_id: str, text: str) -> None:
        """A user message to an idle chat: stored at once, the chat becomes PENDING."""
        chat = self.chats[chat_id]
        assert chat.worker_id is None, "the chat is running: queue the message instead"
        self._append(chat, NewMessage("user", [parts_mod.text_part(text)], chat.owner_id), str(uuid.uuid4()))
        chat.status = "pending"

    def add_message(self, chat_id: str, msg: NewMessage) -> chat_pb2.Message:
        """A message as an earlier run (or a client) persisted it."""
        return self._append(self.chats[chat_id], msg, str(uuid.uuid4()))

    def queue(self, chat_id: str, text: str) -> None:
        """A user message to a running chat: delivered by `finish_turn` as the next turn."""
        self.chats[chat_id].queue.append(text)

    def gate(self, method: str, *, role: str | None = None) -> Gate:
        """The next `method` call (a persist of `role`, when given) stops at the returned gate
        after it took effect, like a commit whose answer is slow to come back."""
        g = Gate(f"store {method} {role or ''}".strip())
        self._gates.append((method, role, g))
        return g

    def messages(self, chat_id: str) -> list[chat_pb2.Message]:
        """Every message of the chat, summaries and what they replaced included."""
        return list(self.chats[chat_id].messages)

    def roles(self, chat_id: str) -> list[str]:
        names = {v: k for k, v in _ROLES.items()}
        return [names[m.role] for m in self.chats[chat_id].messages]

    def events_of(self, chat_id: str, kind: str | None = None) -> list[chat_pb2.ChatEvent]:
        return [
            e for e in self.events if e.chat_id == chat_id and (kind is None or e.WhichOneof("event") == kind)
        ]

    def statuses(self, chat_id: str) -> list[str]:
        names = {v: k for k, v in _STATUSES.items()}
        return [names[e.status_changed.status] for e in self.events_of(chat_id, "status_changed")]

    # -- the Store protocol --

    async def start_run(self, chat_id: str, fence: Fence) -> StartedRun:
        chat = self._fenced(chat_id, fence)
        self._number(chat, [self._status("running")])
        self.writes.append(Write("start_run", chat_id))
        began = self._committed(chat_id)
        await self._after("start_run", None)
        info = RunInfo(
            chat.id, chat.owner_id, chat.model_config_id, chat.workspace_id, chat.agents_md, chat.streaming
        )
        return StartedRun(info, began)

    async def history(self, chat_id: str) -> list[chat_pb2.Message]:
        msgs = self.chats[chat_id].messages
        start = max((i for i, m in enumerate(msgs) if m.role == chat_pb2.MESSAGE_ROLE_SUMMARY), default=0)
        return [_copy(m) for m in msgs[start:]]

    async def emit(self, chat_id: str, fence: Fence | None, events: Sequence[chat_pb2.ChatEvent]) -> None:
        chat = self._fenced(chat_id, fence)
        self._number(chat, events)
        for ev in events:
            if ev.WhichOneof("event") == "part_delta" and fence is not None:
                chat.streaming = ev.part_delta.message_id
        self.writes.append(Write("emit", chat_id, fenced=fence is not None))
        await self._after("emit", None)

    async def persist(
        self,
        chat_id: str,
        fence: Fence | None,
        msg: NewMessage,
        *,
        pre_events: Sequence[chat_pb2.ChatEvent] = (),
        extra_events: Sequence[chat_pb2.ChatEvent] = (),
        message_id: str | None = None,
        guard_idle: bool = False,
        agents_md: str | None = None,
    ) -> chat_pb2.Message:
        chat = self._fenced(chat_id, fence)
        if guard_idle and (chat.worker_id is not None or chat.status == "pending"):
            raise FailedPrecondition(f"chat {chat_id} started running", reason="CHAT_BUSY")
        for ev in pre_events:
            self._number(chat, [ev])
        persisted = self._append(chat, msg, message_id or str(uuid.uuid4()))
        if chat.streaming == persisted.id:
            chat.streaming = None
        self._number(chat, extra_events)
        if agents_md is not None:
            chat.agents_md = agents_md
        self.writes.append(Write("persist", chat_id, msg.role, agents_md, fence is not None))
        await self._after("persist", msg.role)
        return persisted

    async def finish_turn(self, chat_id: str, fence: Fence) -> float | None:
        chat = self._fenced(chat_id, fence)
        self.writes.append(Write("finish_turn", chat_id))
        began: float | None = None
        if chat.queue:
            text = chat.queue.pop(0)
            self._append(
                chat, NewMessage("user", [parts_mod.text_part(text)], chat.owner_id), str(uuid.uuid4())
            )
            self._number(chat, [chat_pb2.ChatEvent(queue_changed=chat_pb2.QueueChanged())])
            began = self._committed(chat_id)
        else:
            chat.status, chat.worker_id = "waiting", None
            self._number(chat, [self._status("waiting")])
        await self._after("finish_turn", None)
        return began

    async def fail_run(self, chat_id: str, fence: Fence, reason: str, message: str) -> None:
        chat = self._fenced(chat_id, fence)
        chat.status, chat.worker_id, chat.last_error = "error", None, (reason, message)
        error = chat_pb2.ChatError(reason=reason, message=message)
        status = self._status("error")
        status.status_changed.error.CopyFrom(error)
        self._number(chat, [chat_pb2.ChatEvent(error=error), status])
        self.writes.append(Write("fail_run", chat_id))
        await self._after("fail_run", None)

    async def discard_reply(
        self,
        chat_id: str,
        fence: Fence,
        message_id: str,
        *,
        reason: str,
        retrying: bool,
        then: Sequence[chat_pb2.ChatEvent] = (),
    ) -> None:
        chat = self._fenced(chat_id, fence)
        discarded = chat_pb2.ReplyDiscarded(message_id=message_id, reason=reason, retrying=retrying)
        self._number(chat, [chat_pb2.ChatEvent(reply_discarded=discarded), *then])
        if chat.streaming == message_id:
            chat.streaming = None
        self.writes.append(Write("discard_reply", chat_id))
        await self._after("discard_reply", None)

    # -- internals --

    def _committed(self, chat_id: str) -> float:
        """The instant a turn's start is committed (before the gate that stands for publishing)."""
        at = time.monotonic()
        self.turns_began.setdefault(chat_id, []).append(at)
        return at

    def _fenced(self, chat_id: str, fence: Fence | None) -> FakeChat:
        chat = self.chats.get(chat_id)
        if chat is None:
            raise LeaseLost(chat_id) if fence is not None else AssertionError(f"no chat {chat_id}")
        if fence is not None and (chat.worker_id, chat.generation) != (fence.worker_id, fence.generation):
            raise LeaseLost(chat_id)
        return chat

    @staticmethod
    def _status(status: str) -> chat_pb2.ChatEvent:
        return chat_pb2.ChatEvent(status_changed=chat_pb2.StatusChanged(status=_STATUSES[status]))

    def _number(self, chat: FakeChat, events: Sequence[chat_pb2.ChatEvent]) -> None:
        for ev in events:
            chat.last_seq += 1
            ev.seq, ev.chat_id = chat.last_seq, chat.id
            if ev.WhichOneof("event") == "message_persisted":
                ev.message_persisted.seq = ev.seq
            self.events.append(_copy(ev))

    def _append(self, chat: FakeChat, msg: NewMessage, message_id: str) -> chat_pb2.Message:
        usage = msg.usage or chat_pb2.Usage()
        m = chat_pb2.Message(
            id=message_id,
            chat_id=chat.id,
            role=_ROLES[msg.role],
            parts=list(msg.parts),
            visibility=msg.visibility,  # type: ignore[arg-type]
            usage=usage,
            model_config_id=msg.model_config_id,
            sender_id=msg.sender_id,
        )
        m.runtime.FromMilliseconds(msg.runtime_ms)
        for f in _USAGE_FIELDS:
            setattr(chat.usage, f, getattr(chat.usage, f) + getattr(usage, f))
        ev = chat_pb2.ChatEvent(message_persisted=m)
        self._number(chat, [ev])
        m.seq = ev.seq
        chat.messages.append(m)
        return _copy(m)

    async def _after(self, method: str, role: str | None) -> None:
        for i, (m, r, g) in enumerate(self._gates):
            if m == method and (r is None or r == role):
                del self._gates[i]
                await g.passing()
                return


_P = TypeVar("_P", chat_pb2.Message, chat_pb2.ChatEvent)


def _copy(m: _P) -> _P:
    out = type(m)()
    out.CopyFrom(m)
    return out


# --- the whole kit ----------------------------------------------------------------------


@dataclass
class LoopKit:
    """The loop's four dependencies in memory, and helpers to run chats through `run_chat`."""

    model: FakeModel = field(default_factory=FakeModel)
    tools: FakeTools = field(default_factory=FakeTools)
    prompts: FakePrompts = field(default_factory=FakePrompts)
    store: FakeStore = field(default_factory=FakeStore)
    config: LoopConfig = field(default_factory=lambda: LoopConfig(delta_flush_ms=0, stream_retry_delay_ms=0))

    def create_chat(self, text: str = "hello", **kwargs: Any) -> str:
        return self.store.create_chat(text, **kwargs)

    def context(self, chat_id: str, *, worker_id: str = "worker-1") -> RunContext:
        """A claimed chat's run context, as the worker builds it."""
        return RunContext(
            chat_id=chat_id,
            fence=self.store.claim(chat_id, worker_id),
            store=self.store,
            model=self.model,
            tools=self.tools,
            prompts=self.prompts,
            config=self.config,
        )

    async def run(self, chat_id: str, *, within: float = 10.0) -> RunContext:
        """Claim the chat and run it until it waits (or fails); LeaseLost propagates."""
        ctx = self.context(chat_id)
        async with asyncio.timeout(within):
            await loop_mod.run_chat(ctx)
        return ctx

    def start(self, chat_id: str) -> tuple[RunContext, asyncio.Task[None]]:
        """Claim the chat and run it in a task (for tests that steer it through gates)."""
        ctx = self.context(chat_id)
        return ctx, asyncio.create_task(loop_mod.run_chat(ctx))

    @staticmethod
    def interrupt(ctx: RunContext) -> None:
        """What the worker does when a renewal that began now reports the chat's interrupt flag."""
        ctx.interrupt(seen_at=time.monotonic())


async def finish(task: asyncio.Task[None], within: float = 5.0) -> None:
    """Await a started run, bounded."""
    async with asyncio.timeout(within):
        await task
