"""The agent loop: a plain function over interfaces (model, tools, prompts, store).

`run_chat` drives one claimed chat until no turn is left: each step builds the prompt,
streams a generation (deltas go out coalesced), persists the assistant message, runs its
tool calls in parallel and persists their results in call order. It never imports grpc:
the worker wires real clients in, tests may wire anything that honours the protocols.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agentplane.chat.v1 import chat_pb2
from agentplane.inference.v1 import inference_pb2, inference_service_pb2

from services.chat import parts as parts_mod
from services.chat.domain import Fence, NewMessage, RunInfo
from services.common import auth

log = logging.getLogger(__name__)
# One JSON line per finished step (`duration_ms`) at DEBUG, enabled by AGENTPLANE_CHAT_STEP_LOG:
# the loop benchmark reads exact per-step wall times from the chat process's log.
step_log = logging.getLogger("agentplane.chat.steps")

SUMMARY_PROMPT = (
    "Summarize the conversation so far for your own later use: the user's goals, decisions made, "
    "files and commands involved, the current state of the work and what remains to be done. "
    "Be complete but concise; this summary replaces the history."
)
AGENTS_MD_PATH = "AGENTS.md"


class ModelError(Exception):
    """A generation failed after the inference service's retries."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ModelLimits:
    """What the loop needs to know about a model config."""

    model_config_id: str
    context_limit: int
    compaction_threshold_percent: int


@dataclass(frozen=True)
class ToolOutcome:
    """The result of one tool call."""

    content: str
    is_error: bool
    structured_json: str = ""
    duration_ms: int = 0


class Model(Protocol):
    """Streams one generation; raises ModelError on failure."""

    def generate(
        self, request: inference_service_pb2.GenerateRequest
    ) -> AsyncIterator[inference_service_pb2.GenerateResponse]:
        """Stream the generation's events."""
        ...


class Tools(Protocol):
    """The workspace tools."""

    async def list_tools(self) -> list[inference_pb2.ToolDefinition]:
        """Tool definitions, passed to the model unchanged."""
        ...

    async def call(self, workspace_id: str, tool_call_id: str, name: str, arguments_json: str) -> ToolOutcome:
        """Run one call (idempotent by tool_call_id)."""
        ...


class Prompts(Protocol):
    """Deployment configuration read through the config client's cache."""

    async def model(self, model_config_id: str) -> ModelLimits:
        """The model config's limits."""
        ...

    async def system_prompt(self) -> str:
        """The deployment system prompt."""
        ...

    async def user_prompt(self, user_id: str) -> str:
        """The user's own prompt ('' when none)."""
        ...


class Store(Protocol):
    """The fenced writes a run makes (implemented by ChatStore)."""

    async def start_run(
        self, chat_id: str, fence: Fence, *, committed: Callable[[], None] | None = None
    ) -> RunInfo: ...
    async def history(self, chat_id: str) -> list[chat_pb2.Message]: ...
    async def emit(self, chat_id: str, fence: Fence | None, events: Sequence[chat_pb2.ChatEvent]) -> None: ...
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
    ) -> chat_pb2.Message: ...
    async def finish_turn(
        self, chat_id: str, fence: Fence, *, committed: Callable[[], None] | None = None
    ) -> bool: ...
    async def fail_run(self, chat_id: str, fence: Fence, reason: str, message: str) -> None: ...


@dataclass
class LoopConfig:
    """Knobs of the loop."""

    step_limit: int = 200
    delta_flush_ms: int = 50
    sender_id: str = "service:chat"


@dataclass
class RunContext:
    """One run of one chat: its fence, dependencies and the interrupt signal."""

    chat_id: str
    fence: Fence
    store: Store
    model: Model
    tools: Tools
    prompts: Prompts
    config: LoopConfig = field(default_factory=LoopConfig)
    interrupted: asyncio.Event = field(default_factory=asyncio.Event)
    steps_run: int = 0
    turn_started: float = 0.0
    # Set when the claim already started the run (see ChatStore.claim): no start_run needed.
    started: RunInfo | None = None
    step_seconds: list[float] = field(default_factory=list)


class TurnEnd(enum.Enum):
    """How a turn ended."""

    DONE = "done"
    INTERRUPTED = "interrupted"
    FAILED = "failed"


async def run_chat(ctx: RunContext) -> None:
    """Run turns until the chat waits for the user (or errors); LeaseLost propagates."""

    def begin_turn() -> None:
        # Called the moment the transaction that consumed the chat's interrupt flag commits,
        # before its events are published (clients may react to them at once). A renewal that
        # began after this point reads the committed flag, so an interrupt sent from here on is
        # honoured; resetting any later (as we once did, after publishing) could swallow one.
        ctx.turn_started = time.monotonic()
        ctx.interrupted.clear()

    if ctx.started is not None:
        info = ctx.started  # the claim's statement started it; the worker set turn_started
    else:
        info = await ctx.store.start_run(ctx.chat_id, ctx.fence, committed=begin_turn)
    # Background work: every call to another service acts for the chat's owner explicitly.
    with auth.acting_for(info.owner_id):
        while True:
            end = await run_turn(ctx, info)
            if end is TurnEnd.FAILED:
                return
            if not await ctx.store.finish_turn(ctx.chat_id, ctx.fence, committed=begin_turn):
                return


async def run_turn(ctx: RunContext, info: RunInfo) -> TurnEnd:
    """Steps until a reply without tool calls, an interrupt, a failure or the step limit."""
    history = await ctx.store.history(ctx.chat_id)
    steps = 0
    compacted_for_overflow = False
    while True:
        visible = [m for m in history if m.visibility != chat_pb2.VISIBILITY_USER]
        last = visible[-1] if visible else None
        if last is not None and last.role == chat_pb2.MESSAGE_ROLE_ASSISTANT:
            calls = [p.tool_call for p in last.parts if p.WhichOneof("part") == "tool_call"]
            if not calls:
                return TurnEnd.DONE
            # Also the recovery path: a run that died after persisting calls runs them now;
            # toolexec's ledger returns recorded results instead of running a call twice.
            tool_msg = await _run_tools(ctx, info, last.id, calls)
            history.append(tool_msg)
            if ctx.interrupted.is_set():
                return TurnEnd.INTERRUPTED
            continue
        if ctx.interrupted.is_set():
            return TurnEnd.INTERRUPTED
        if steps >= ctx.config.step_limit:
            text = (
                f"Stopped after {ctx.config.step_limit} model steps, the step limit of one turn. "
                "Send a message to continue."
            )
            msg = await ctx.store.persist(
                ctx.chat_id,
                ctx.fence,
                NewMessage(
                    role="assistant",
                    parts=[parts_mod.text_part(text)],
                    sender_id=ctx.config.sender_id,
                    visibility=chat_pb2.VISIBILITY_USER,
                ),
            )
            history.append(msg)
            return TurnEnd.DONE
        limits = await ctx.prompts.model(info.model_config_id)
        if _over_threshold(history, limits):
            history = [await compact(ctx, info, history)]
        started = time.monotonic()
        try:
            generated, interrupted = await _generate(ctx, info, history)
        except ModelError as exc:
            if exc.reason == "CONTEXT_LENGTH_EXCEEDED" and not compacted_for_overflow:
                compacted_for_overflow = True
                history = [await compact(ctx, info, history)]
                continue
            await ctx.store.fail_run(ctx.chat_id, ctx.fence, exc.reason or "MODEL_ERROR", exc.message)
            return TurnEnd.FAILED
        steps += 1
        ctx.steps_run += 1
        if generated is not None:
            history.append(generated)
        calls = (
            [p.tool_call for p in generated.parts if p.WhichOneof("part") == "tool_call"]
            if generated is not None
            else []
        )
        if interrupted:
            if calls:
                history.append(await _synthetic_results(ctx, calls))
            return TurnEnd.INTERRUPTED
        if calls:
            # The step includes its tool calls and their persisted results.
            history.append(await _run_tools(ctx, info, generated.id if generated else "", calls))
        _record_step(ctx, started)
        if ctx.interrupted.is_set():
            return TurnEnd.INTERRUPTED


def _record_step(ctx: RunContext, started: float) -> None:
    """Note one step's wall time (generate + persist + tools + persist results)."""
    seconds = time.monotonic() - started
    ctx.step_seconds.append(seconds)
    if step_log.isEnabledFor(logging.DEBUG):
        step_log.debug(
            "step", extra={"chat_id": ctx.chat_id, "step": ctx.steps_run, "duration_ms": seconds * 1000}
        )


def _over_threshold(history: Sequence[chat_pb2.Message], limits: ModelLimits) -> bool:
    if limits.context_limit <= 0 or limits.compaction_threshold_percent <= 0:
        return False
    for m in reversed(history):
        if m.role == chat_pb2.MESSAGE_ROLE_ASSISTANT and (m.usage.input_tokens or m.usage.output_tokens):
            used = m.usage.input_tokens + m.usage.cache_read_tokens + m.usage.cache_write_tokens
            used += m.usage.output_tokens
            return used * 100 >= limits.context_limit * limits.compaction_threshold_percent
    return False


async def build_request(
    ctx: RunContext, info: RunInfo, history: Sequence[chat_pb2.Message], *, with_tools: bool = True
) -> inference_service_pb2.GenerateRequest:
    """System prompt (deployment + user + AGENTS.md), tools, and the model-visible history."""
    system_parts = [await ctx.prompts.system_prompt(), await ctx.prompts.user_prompt(info.owner_id)]
    tools: list[inference_pb2.ToolDefinition] = []
    if info.workspace_id:
        agents_md = await _agents_md(ctx, info)
        if agents_md:
            system_parts.append(f"Instructions from the workspace's {AGENTS_MD_PATH}:\n\n{agents_md}")
        if with_tools:
            tools = await ctx.tools.list_tools()
    return inference_service_pb2.GenerateRequest(
        model_config_id=info.model_config_id,
        system_prompt="\n\n".join(p for p in system_parts if p.strip()),
        messages=to_model_messages(history),
        tools=tools,
        user_id=info.owner_id,
        chat_id=info.chat_id,
    )


async def _agents_md(ctx: RunContext, info: RunInfo) -> str:
    """The workspace's AGENTS.md, read through the tools once per chat and cached in the chat row."""
    if info.agents_md is not None:
        return info.agents_md
    outcome = await ctx.tools.call(
        info.workspace_id,
        f"agentplane-agents-md-{info.chat_id}",
        "read_file",
        json.dumps({"path": AGENTS_MD_PATH}),
    )
    text = "" if outcome.is_error else outcome.content
    # Cached on the chat row by the run's next persisted message (no statement of its own); a
    # run that ends before persisting anything reads it again, and toolexec's ledger replays it.
    info.agents_md = text
    info.agents_md_unsaved = True
    return text


def _take_unsaved_agents_md(info: RunInfo) -> str | None:
    """AGENTS.md text read in this run and not cached yet, for the next persist to store."""
    if not info.agents_md_unsaved:
        return None
    info.agents_md_unsaved = False
    return info.agents_md


def to_model_messages(history: Sequence[chat_pb2.Message]) -> list[inference_pb2.Message]:
    """Model-visible history as inference messages; unanswered tool calls get synthetic results."""
    out: list[inference_pb2.Message] = []
    visible = [m for m in history if m.visibility != chat_pb2.VISIBILITY_USER]
    for i, m in enumerate(visible):
        if m.role == chat_pb2.MESSAGE_ROLE_SUMMARY:
            text = parts_mod.text_of(m.parts)
            out.append(
                inference_pb2.Message(
                    role=inference_pb2.ROLE_USER,
                    parts=[
                        inference_pb2.ContentPart(
                            text=inference_pb2.TextPart(text=f"Summary of the conversation so far:\n\n{text}")
                        )
                    ],
                )
            )
            continue
        role = {
            chat_pb2.MESSAGE_ROLE_USER: inference_pb2.ROLE_USER,
            chat_pb2.MESSAGE_ROLE_ASSISTANT: inference_pb2.ROLE_ASSISTANT,
            chat_pb2.MESSAGE_ROLE_TOOL: inference_pb2.ROLE_TOOL,
        }[m.role]
        converted = [p for p in (parts_mod.to_inference(p) for p in m.parts) if p is not None]
        if not converted:
            continue
        out.append(inference_pb2.Message(role=role, parts=converted))
        if m.role == chat_pb2.MESSAGE_ROLE_ASSISTANT:
            calls = [p.tool_call for p in m.parts if p.WhichOneof("part") == "tool_call"]
            answered = set()
            nxt = visible[i + 1] if i + 1 < len(visible) else None
            if nxt is not None and nxt.role == chat_pb2.MESSAGE_ROLE_TOOL:
                answered = {
                    p.tool_result.tool_call_id for p in nxt.parts if p.WhichOneof("part") == "tool_result"
                }
            missing = [c for c in calls if c.id not in answered]
            if missing and nxt is not None:
                # Calls cut off by an interrupt or a lost worker still need an answer for the provider.
                results = [
                    inference_pb2.ContentPart(
                        tool_result=inference_pb2.ToolResultPart(
                            tool_call_id=c.id, tool_name=c.name, content=_INTERRUPTED_TEXT, is_error=True
                        )
                    )
                    for c in missing
                ]
                if nxt.role == chat_pb2.MESSAGE_ROLE_TOOL:
                    out.append(inference_pb2.Message(role=inference_pb2.ROLE_TOOL, parts=results))
                else:
                    out.append(inference_pb2.Message(role=inference_pb2.ROLE_TOOL, parts=results))
    return _merge_tool_messages(out)


def _merge_tool_messages(messages: list[inference_pb2.Message]) -> list[inference_pb2.Message]:
    merged: list[inference_pb2.Message] = []
    for m in messages:
        if merged and m.role == inference_pb2.ROLE_TOOL and merged[-1].role == inference_pb2.ROLE_TOOL:
            merged[-1].parts.extend(m.parts)
        else:
            merged.append(m)
    return merged


_INTERRUPTED_TEXT = "The tool call was interrupted before it finished; it may not have run."


class _Coalescer:
    """Collects text/reasoning deltas of the assistant message and emits them at most every flush_ms."""

    def __init__(self, ctx: RunContext, message_id: str) -> None:
        self._ctx = ctx
        self._message_id = message_id
        self.parts: list[chat_pb2.ContentPart] = []
        self._pending: list[chat_pb2.ChatEvent] = []
        self._last_flush = 0.0
        self._timer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def _current(self, kind: str) -> tuple[int, chat_pb2.ContentPart]:
        if self.parts and self.parts[-1].WhichOneof("part") == kind:
            return len(self.parts) - 1, self.parts[-1]
        part = chat_pb2.ContentPart()
        if kind == "text":
            part.text.SetInParent()
        else:
            part.reasoning.SetInParent()
        self.parts.append(part)
        return len(self.parts) - 1, part

    async def text(self, text: str) -> None:
        index, part = self._current("text")
        part.text.text += text
        await self._add(index, "text", text)

    async def reasoning(self, delta: inference_pb2.ReasoningDelta) -> None:
        index, part = self._current("reasoning")
        part.reasoning.text += delta.text
        if delta.signature:
            part.reasoning.signature = delta.signature
        if delta.redacted_data:
            part.reasoning.redacted_data = delta.redacted_data
        if delta.text:
            await self._add(index, "reasoning", delta.text)

    def tool_call(self, call: inference_pb2.ToolCallPart) -> chat_pb2.ToolCallPart:
        part = chat_pb2.ContentPart(
            tool_call=chat_pb2.ToolCallPart(id=call.id, name=call.name, arguments_json=call.arguments_json)
        )
        self.parts.append(part)
        return part.tool_call

    async def _add(self, index: int, kind: str, text: str) -> None:
        if self._pending:
            prev = self._pending[-1].part_delta
            if prev.part_index == index and prev.WhichOneof("delta") == kind:
                setattr(prev, kind, getattr(prev, kind) + text)
            else:
                self._pending.append(self._delta(index, kind, text))
        else:
            self._pending.append(self._delta(index, kind, text))
        wait = self._ctx.config.delta_flush_ms / 1000 - (time.monotonic() - self._last_flush)
        if wait <= 0:
            await self.flush()
        elif self._timer is None:
            self._timer = asyncio.create_task(self._flush_later(wait))

    def _delta(self, index: int, kind: str, text: str) -> chat_pb2.ChatEvent:
        delta = chat_pb2.PartDelta(message_id=self._message_id, part_index=index)
        setattr(delta, kind, text)
        return chat_pb2.ChatEvent(part_delta=delta)

    async def _flush_later(self, wait: float) -> None:
        await asyncio.sleep(wait)
        self._timer = None
        await self.flush()

    async def flush(self) -> None:
        async with self._lock:
            if not self._pending:
                return
            events, self._pending = self._pending, []
            self._last_flush = time.monotonic()
            await self._ctx.store.emit(self._ctx.chat_id, self._ctx.fence, events)

    async def finish(self) -> list[chat_pb2.ChatEvent]:
        """Stop the timer and hand over the deltas not sent yet.

        The caller publishes them with the message it persists next (one statement, seqs
        just before the message's), instead of paying a round trip of their own.
        """
        if self._timer is not None:
            self._timer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._timer
            self._timer = None
        async with self._lock:
            events, self._pending = self._pending, []
            return events


async def _generate(
    ctx: RunContext, info: RunInfo, history: Sequence[chat_pb2.Message]
) -> tuple[chat_pb2.Message | None, bool]:
    """Stream one generation and persist it; returns (message, interrupted)."""
    request = await build_request(ctx, info, history)
    message_id = str(uuid.uuid4())
    co = _Coalescer(ctx, message_id)
    usage = chat_pb2.Usage()
    started = time.monotonic()

    async def consume() -> None:
        async for ev in ctx.model.generate(request):
            kind = ev.WhichOneof("event")
            if kind == "text_delta":
                await co.text(ev.text_delta.text)
            elif kind == "reasoning_delta":
                await co.reasoning(ev.reasoning_delta)
            elif kind == "tool_call":
                await co.flush()
                co.tool_call(ev.tool_call)
            elif kind == "usage":
                u = ev.usage
                usage.CopyFrom(
                    chat_pb2.Usage(
                        input_tokens=u.input_tokens,
                        output_tokens=u.output_tokens,
                        reasoning_tokens=u.reasoning_tokens,
                        cache_read_tokens=u.cache_read_tokens,
                        cache_write_tokens=u.cache_write_tokens,
                        cost_micros=u.cost_micros if u.HasField("cost_micros") else 0,
                    )
                )
            elif kind == "retry":
                r = ev.retry
                await ctx.store.emit(
                    ctx.chat_id,
                    ctx.fence,
                    [
                        chat_pb2.ChatEvent(
                            retry_scheduled=chat_pb2.RetryScheduled(
                                attempt=r.attempt, delay_ms=r.delay_ms, reason=r.reason, message=r.message
                            )
                        )
                    ],
                )

    interrupted = await _race_interrupt(ctx, consume())
    tail = await co.finish()
    if interrupted and not co.parts:
        if tail:
            await ctx.store.emit(ctx.chat_id, ctx.fence, tail)
        return None, True
    calls = [p.tool_call for p in co.parts if p.WhichOneof("part") == "tool_call"]
    started_events = [
        chat_pb2.ChatEvent(tool_call_started=chat_pb2.ToolCallStarted(message_id=message_id, tool_call=c))
        for c in calls
    ]
    msg = await ctx.store.persist(
        ctx.chat_id,
        ctx.fence,
        NewMessage(
            role="assistant",
            parts=co.parts,
            sender_id=ctx.config.sender_id,
            model_config_id=info.model_config_id,
            usage=usage,
            runtime_ms=int((time.monotonic() - started) * 1000),
        ),
        pre_events=tail,
        extra_events=[] if interrupted else started_events,
        message_id=message_id,
        agents_md=_take_unsaved_agents_md(info),
    )
    return msg, interrupted


async def _race_interrupt(ctx: RunContext, work: Coroutine[Any, Any, None]) -> bool:
    """Run `work` until it ends or the run is interrupted (then cancel it); True when interrupted."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(ctx.interrupted.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
    if task.done():
        task.result()  # re-raise ModelError and friends
        return False
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return True


async def _run_tools(
    ctx: RunContext, info: RunInfo, message_id: str, calls: Sequence[chat_pb2.ToolCallPart]
) -> chat_pb2.Message:
    """Run the calls in parallel, persist their results in call order (synthetic ones when interrupted)."""
    known: set[str] | None = None
    if info.workspace_id:
        known = {t.name for t in await ctx.tools.list_tools()}
    results: dict[str, chat_pb2.ToolResultPart] = {}
    last_finished: list[chat_pb2.ChatEvent] = []
    started = time.monotonic()

    async def one(call: chat_pb2.ToolCallPart) -> None:
        begun = time.monotonic()
        outcome = await _call_one(ctx, info, known, call)
        result = chat_pb2.ToolResultPart(
            tool_call_id=call.id,
            tool_name=call.name,
            content=outcome.content,
            is_error=outcome.is_error,
            structured_json=outcome.structured_json,
        )
        result.duration.FromMilliseconds(outcome.duration_ms or int((time.monotonic() - begun) * 1000))
        results[call.id] = result
        event = chat_pb2.ChatEvent(tool_call_finished=chat_pb2.ToolCallFinished(tool_result=result))
        if len(results) == len(calls):
            # The last call to finish is announced together with the persisted results.
            last_finished.append(event)
        else:
            await ctx.store.emit(ctx.chat_id, ctx.fence, [event])

    async def all_calls() -> None:
        await asyncio.gather(*(one(c) for c in calls))

    await _race_interrupt(ctx, all_calls())
    parts = []
    for c in calls:
        r = results.get(c.id) or chat_pb2.ToolResultPart(
            tool_call_id=c.id, tool_name=c.name, content=_INTERRUPTED_TEXT, is_error=True
        )
        parts.append(chat_pb2.ContentPart(tool_result=r))
    return await ctx.store.persist(
        ctx.chat_id,
        ctx.fence,
        NewMessage(
            role="tool",
            parts=parts,
            sender_id=ctx.config.sender_id,
            runtime_ms=int((time.monotonic() - started) * 1000),
        ),
        pre_events=last_finished,
    )


async def _synthetic_results(ctx: RunContext, calls: Sequence[chat_pb2.ToolCallPart]) -> chat_pb2.Message:
    parts = [
        chat_pb2.ContentPart(
            tool_result=chat_pb2.ToolResultPart(
                tool_call_id=c.id, tool_name=c.name, content=_INTERRUPTED_TEXT, is_error=True
            )
        )
        for c in calls
    ]
    return await ctx.store.persist(
        ctx.chat_id, ctx.fence, NewMessage(role="tool", parts=parts, sender_id=ctx.config.sender_id)
    )


async def _call_one(
    ctx: RunContext, info: RunInfo, known: set[str] | None, call: chat_pb2.ToolCallPart
) -> ToolOutcome:
    """One call, with the mistakes a model can make turned into results it can correct."""
    if not info.workspace_id or known is None:
        return ToolOutcome(
            f"Tool {call.name!r} is not available: this chat has no workspace, so no tools can run.", True
        )
    if call.name not in known:
        return ToolOutcome(f"Unknown tool {call.name!r}. Available tools: {', '.join(sorted(known))}.", True)
    try:
        args = json.loads(call.arguments_json or "{}")
    except json.JSONDecodeError as exc:
        return ToolOutcome(
            f"The arguments of {call.name} are not valid JSON ({exc.msg} at position {exc.pos}); "
            "send a JSON object matching the tool's schema.",
            True,
        )
    if not isinstance(args, dict):
        return ToolOutcome(f"The arguments of {call.name} must be a JSON object.", True)
    try:
        return await ctx.tools.call(info.workspace_id, call.id, call.name, call.arguments_json or "{}")
    except ModelError as exc:  # the tools adapter reports its transport failures this way
        return ToolOutcome(f"The tool call failed: {exc.message}", True)


async def compact(
    ctx: RunContext, info: RunInfo, history: Sequence[chat_pb2.Message], *, fenced: bool = True
) -> chat_pb2.Message:
    """Summarize `history` with a generation and persist the summary message."""
    request = await build_request(ctx, info, history, with_tools=False)
    request.messages.append(
        inference_pb2.Message(
            role=inference_pb2.ROLE_USER,
            parts=[inference_pb2.ContentPart(text=inference_pb2.TextPart(text=SUMMARY_PROMPT))],
        )
    )
    merged = _merge_user_turns(list(request.messages))
    del request.messages[:]
    request.messages.extend(merged)
    text: list[str] = []
    usage = chat_pb2.Usage()
    started = time.monotonic()
    async for ev in ctx.model.generate(request):
        kind = ev.WhichOneof("event")
        if kind == "text_delta":
            text.append(ev.text_delta.text)
        elif kind == "usage":
            u = ev.usage
            usage = chat_pb2.Usage(
                input_tokens=u.input_tokens,
                output_tokens=u.output_tokens,
                cost_micros=u.cost_micros if u.HasField("cost_micros") else 0,
            )
    summary = "".join(text).strip() or "(The model returned an empty summary.)"
    return await ctx.store.persist(
        ctx.chat_id,
        ctx.fence if fenced else None,
        NewMessage(
            role="summary",
            parts=[parts_mod.text_part(summary)],
            sender_id=ctx.config.sender_id,
            model_config_id=info.model_config_id,
            usage=usage,
            runtime_ms=int((time.monotonic() - started) * 1000),
        ),
        guard_idle=not fenced,
        agents_md=_take_unsaved_agents_md(info),
    )


def _merge_user_turns(messages: list[inference_pb2.Message]) -> list[inference_pb2.Message]:
    out: list[inference_pb2.Message] = []
    for m in messages:
        if out and m.role == inference_pb2.ROLE_USER and out[-1].role == inference_pb2.ROLE_USER:
            out[-1].parts.extend(m.parts)
        else:
            out.append(m)
    return out
