"""The agent loop: a plain function over interfaces (model, tools, prompts, store: `loop_types`).

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
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from agentplane.chat.v1 import chat_pb2
from agentplane.inference.v1 import inference_pb2, inference_service_pb2

from services.chat import loop_replies, tool_ids
from services.chat import parts as parts_mod
from services.chat.domain import Fence, NewMessage, RunInfo
from services.chat.loop_coalesce import Coalescer
from services.chat.loop_messages import interrupted_result, to_model_messages, tool_calls
from services.chat.loop_types import (
    LoopConfig,
    Model,
    ModelError,
    ModelLimits,
    Prompts,
    Store,
    ToolOutcome,
    Tools,
)
from services.chat.metrics import UNEXPORTED, UNKNOWN_TOOL, ChatMetrics, StepTimer
from services.common import tracing

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
    # When the current turn's start was committed (time.monotonic()); see `interrupt`.
    turn_started: float = 0.0
    # When the latest renewal that reported the chat's interrupt flag began.
    interrupt_seen_at: float = float("-inf")
    # Set when the claim already started the run (see ChatStore.claim): no start_run needed.
    started: RunInfo | None = None
    step_seconds: list[float] = field(default_factory=list)
    # The workspace's AGENTS.md once this run read it (see `_agents_md`), and the same text while
    # the chat row does not have it yet: the run's next persisted message stores it.
    agents_md: str | None = None
    agents_md_unsaved: str | None = None
    # The reply of the generation in progress once some of its deltas were emitted.
    unpersisted_reply: str | None = None
    metrics: ChatMetrics = UNEXPORTED
    # The phases of the step in progress (None between steps).
    step: StepTimer | None = None

    def interrupt(self, seen_at: float) -> None:
        """A renewal that began at `seen_at` (time.monotonic()) read the chat's interrupt flag.

        A renewal that began before the turn's start was committed may have read a flag that
        start consumed (an interrupt of the previous turn): that one is not this turn's.
        """
        self.interrupt_seen_at = max(self.interrupt_seen_at, seen_at)
        if seen_at > self.turn_started:
            self.interrupted.set()

    def begin_turn(self, committed_at: float) -> None:
        """A turn's start was committed at `committed_at`: interrupts seen before it are spent.

        The store answers after it published the turn's events, and clients may have reacted
        with an interrupt meanwhile: one seen by a renewal begun after the commit stays set.
        """
        self.turn_started = committed_at
        if self.interrupt_seen_at <= committed_at:
            self.interrupted.clear()


class TurnEnd(enum.Enum):
    """How a turn ended."""

    DONE = "done"
    INTERRUPTED = "interrupted"
    FAILED = "failed"


async def run_chat(ctx: RunContext) -> None:
    """Run turns until the chat waits for the user (or errors); LeaseLost propagates."""
    if ctx.started is not None:
        info = ctx.started  # the claim's statement started it; the worker set turn_started
    else:
        started = await ctx.store.start_run(ctx.chat_id, ctx.fence)
        ctx.begin_turn(started.turn_began)
        info = started.info
    if info.abandoned_reply is not None:
        await loop_replies.discard_abandoned(ctx.store, ctx.chat_id, ctx.fence, info.abandoned_reply)
    # Every call to another service names the chat's owner itself (the request's user_id, the
    # tools' user_id): nothing depends on an identity set around the run.
    while True:
        # One trace per turn: its spans (generate, tools, persist) and the other services' spans
        # of the calls made for it are its descendants.
        with tracing.span("chat.turn", attributes=_turn_attributes(ctx, info)):
            end = await _logged_turn(ctx, info)
            if end is TurnEnd.FAILED:
                return
            next_turn = await ctx.store.finish_turn(ctx.chat_id, ctx.fence)
        if next_turn is None:
            return
        ctx.begin_turn(next_turn)


def _turn_attributes(ctx: RunContext, info: RunInfo) -> dict[str, str]:
    return {
        "agentplane.chat_id": ctx.chat_id,
        "agentplane.model_config_id": info.model_config_id,
        "agentplane.workspace_id": info.workspace_id,
    }


async def _logged_turn(ctx: RunContext, info: RunInfo) -> TurnEnd:
    """`run_turn`, counted and logged (a turn that raises, its lease lost, is the worker's to count)."""
    began = time.monotonic()
    steps_before = ctx.steps_run
    log.info("turn started", extra={"chat_id": ctx.chat_id, "step": ctx.steps_run + 1})
    end = await run_turn(ctx, info)
    ctx.metrics.turn_outcome[end.value].inc()
    log.info(
        "turn finished",
        extra={
            "chat_id": ctx.chat_id,
            "outcome": end.value,
            "steps": ctx.steps_run - steps_before,
            "duration_ms": round((time.monotonic() - began) * 1000, 1),
        },
    )
    return end


async def _fail(ctx: RunContext, reason: str, message: str) -> TurnEnd:
    """Put the chat in ERROR with `reason` (counted by reason); the turn ends FAILED."""
    ctx.metrics.turn_errors.labels(reason).inc()
    await ctx.store.fail_run(ctx.chat_id, ctx.fence, reason, message)
    return TurnEnd.FAILED


async def run_turn(ctx: RunContext, info: RunInfo) -> TurnEnd:
    """Steps until a reply without tool calls, an interrupt, a failure or the step limit."""
    history = await ctx.store.history(ctx.chat_id)
    steps = 0
    compacted_for_overflow = False
    broken_streams = 0  # provider streams of this step that broke mid-reply (loop_replies.py)
    while True:
        visible = [m for m in history if m.visibility != chat_pb2.VISIBILITY_USER]
        last = visible[-1] if visible else None
        if last is not None and last.role == chat_pb2.MESSAGE_ROLE_ASSISTANT:
            calls = tool_calls(last)
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
            msg = await _persist(
                ctx,
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
            summary = await _compact_in_turn(ctx, info, history, "threshold")
            if isinstance(summary, TurnEnd):
                return summary
            history = [summary]
        started = time.monotonic()
        ctx.step = StepTimer(started)
        try:
            generated, interrupted = await _generate(ctx, info, history)
        except ModelError as exc:
            ctx.metrics.step_outcome["failed"].inc()
            if exc.reason == "CONTEXT_LENGTH_EXCEEDED" and not compacted_for_overflow:
                compacted_for_overflow = True
                summary = await _compact_in_turn(ctx, info, history, "overflow")
                if isinstance(summary, TurnEnd):
                    return summary
                history = [summary]
                continue
            delay = await loop_replies.failed_generation(
                ctx.store, ctx.chat_id, ctx.fence, ctx.config, exc, ctx.unpersisted_reply, broken_streams
            )
            if delay is None:
                return await _fail(ctx, exc.reason or "MODEL_ERROR", exc.message)
            broken_streams += 1
            if await _race_interrupt(ctx, asyncio.sleep(delay)):
                return TurnEnd.INTERRUPTED
            continue
        broken_streams = 0
        steps += 1
        ctx.steps_run += 1
        if generated is not None:
            history.append(generated)
        calls = tool_calls(generated) if generated is not None else []
        ctx.metrics.step_outcome["interrupted" if interrupted else "tool_calls" if calls else "answer"].inc()
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
    """Note one step's wall time (generate + persist + tools + persist results) and its phases."""
    seconds = time.monotonic() - started
    ctx.step_seconds.append(seconds)
    m = ctx.metrics
    m.step_seconds.observe(seconds)
    if ctx.step is not None:
        for phase, phase_seconds in ctx.step.phases():
            m.phase[phase].observe(phase_seconds)
        ctx.step = None
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
    ctx: RunContext,
    info: RunInfo,
    history: Sequence[chat_pb2.Message],
    *,
    with_tools: bool = True,
    fenced: bool = True,
) -> inference_service_pb2.GenerateRequest:
    """System prompt (deployment + user + AGENTS.md), tools, and the model-visible history."""
    system_parts = [await ctx.prompts.system_prompt(), await ctx.prompts.user_prompt(info.owner_id)]
    tools: list[inference_pb2.ToolDefinition] = []
    if info.workspace_id:
        agents_md = await _agents_md(ctx, info, fenced=fenced)
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


async def _agents_md(ctx: RunContext, info: RunInfo, *, fenced: bool) -> str:
    """The workspace's AGENTS.md: cached in the chat row, else read through the tools once per chat.

    Only a run reads it (`fenced`): the text is cached by the run's next persisted message (see
    `_persist`, no statement of its own); a run that ends before persisting anything reads it
    again, and toolexec's ledger replays the read. Outside a run (CompactChat) an unknown
    AGENTS.md counts as empty.
    """
    if ctx.agents_md is not None:
        return ctx.agents_md
    if info.agents_md is not None or not fenced:
        return info.agents_md or ""
    outcome = await ctx.tools.call(
        info.workspace_id,
        f"agentplane-agents-md-{info.chat_id}",
        "read_file",
        json.dumps({"path": AGENTS_MD_PATH}),
        user_id=info.owner_id,
    )
    text = "" if outcome.is_error else outcome.content
    ctx.agents_md = ctx.agents_md_unsaved = text
    return text


async def _persist(
    ctx: RunContext,
    msg: NewMessage,
    *,
    fenced: bool = True,
    pre_events: Sequence[chat_pb2.ChatEvent] = (),
    extra_events: Sequence[chat_pb2.ChatEvent] = (),
    message_id: str | None = None,
) -> chat_pb2.Message:
    """Persist a message: fenced by the run, or (CompactChat) only while no run owns the chat.

    The run's first message after it read AGENTS.md caches that text on the chat row too.
    """
    unsaved = ctx.agents_md_unsaved if fenced else None
    began = time.monotonic()
    with tracing.span("chat.persist", attributes={"agentplane.role": msg.role}):
        persisted = await ctx.store.persist(
            ctx.chat_id,
            ctx.fence if fenced else None,
            msg,
            pre_events=pre_events,
            extra_events=extra_events,
            message_id=message_id,
            guard_idle=not fenced,
            agents_md=unsaved,
        )
    if ctx.step is not None:
        ctx.step.persist += time.monotonic() - began
    if unsaved is not None:
        ctx.agents_md_unsaved = None
    return persisted


async def _generate(
    ctx: RunContext, info: RunInfo, history: Sequence[chat_pb2.Message]
) -> tuple[chat_pb2.Message | None, bool]:
    """Stream one generation and persist it; returns (message, interrupted)."""
    begun = time.monotonic()
    with tracing.span("chat.generate", attributes={"agentplane.step": ctx.steps_run + 1}):
        stream = await _stream(ctx, info, history, begun)
    if ctx.step is not None:
        ctx.step.generate += time.monotonic() - begun
    co, tail, interrupted = stream.coalescer, stream.tail, stream.interrupted
    if interrupted and not co.parts:
        if tail:
            await ctx.store.emit(ctx.chat_id, ctx.fence, tail)
        return None, True
    # Results answer calls by id: a provider's empty or repeated ids are replaced before anyone sees them.
    tool_ids.make_unique(co.parts)
    calls = [p.tool_call for p in co.parts if p.WhichOneof("part") == "tool_call"]
    started_events = [
        chat_pb2.ChatEvent(
            tool_call_started=chat_pb2.ToolCallStarted(message_id=stream.message_id, tool_call=c)
        )
        for c in calls
    ]
    msg = await _persist(
        ctx,
        NewMessage(
            role="assistant",
            parts=co.parts,
            sender_id=ctx.config.sender_id,
            model_config_id=info.model_config_id,
            usage=stream.usage,
            runtime_ms=int((time.monotonic() - stream.started) * 1000),
        ),
        pre_events=tail,
        extra_events=[] if interrupted else started_events,
        message_id=stream.message_id,
    )
    return msg, interrupted


@dataclass
class _Streamed:
    """What one generation's stream left: the coalesced parts, the events not yet emitted, usage."""

    message_id: str
    coalescer: Coalescer
    usage: chat_pb2.Usage
    interrupted: bool
    tail: list[chat_pb2.ChatEvent]
    started: float


async def _stream(
    ctx: RunContext, info: RunInfo, history: Sequence[chat_pb2.Message], begun: float
) -> _Streamed:
    """Build the prompt and consume the model's stream (deltas go out coalesced) until it ends or
    the run is interrupted; `begun` is when the step's generation began (time to first delta)."""
    # Before anything can fail: a failure names the reply of this generation, never an earlier one.
    ctx.unpersisted_reply = None
    request = await build_request(ctx, info, history)
    message_id = str(uuid.uuid4())

    async def emit(events: list[chat_pb2.ChatEvent]) -> None:
        ctx.unpersisted_reply = message_id  # its deltas may be out: a failure must discard them
        await ctx.store.emit(ctx.chat_id, ctx.fence, events)

    co = Coalescer(emit, message_id, ctx.config.delta_flush_ms)
    usage = chat_pb2.Usage()
    started = time.monotonic()
    ttfd = ctx.metrics.time_to_first_delta

    async def consume() -> None:
        first = True
        async for ev in ctx.model.generate(request):
            kind = ev.WhichOneof("event")
            if first and kind in _OUTPUT_EVENTS:
                first = False
                ttfd.observe(time.monotonic() - begun)
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
                await ctx.store.emit(ctx.chat_id, ctx.fence, [_retry_event(ev.retry)])

    try:
        interrupted = await _race_interrupt(ctx, consume())
    finally:
        # Also on failure: a pending flush timer would otherwise emit after the run ended.
        tail = await co.finish()
    return _Streamed(message_id, co, usage, interrupted, tail, started)


# The events that are output of the model (the first one ends "time to first delta").
_OUTPUT_EVENTS = frozenset({"text_delta", "reasoning_delta", "tool_call"})


def _retry_event(r: inference_pb2.RetryNotice) -> chat_pb2.ChatEvent:
    return chat_pb2.ChatEvent(
        retry_scheduled=chat_pb2.RetryScheduled(
            attempt=r.attempt, delay_ms=r.delay_ms, reason=r.reason, message=r.message
        )
    )


async def _race_interrupt(ctx: RunContext, work: Coroutine[Any, Any, None]) -> bool:
    """Run `work` until it ends or the run is interrupted (then cancel it); True when interrupted."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(ctx.interrupted.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        # The run itself is cancelled (its replica stopping): the work goes with it, or it would
        # stream on in an orphaned task and write after the run (and the pool) ended.
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise
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
    started = time.monotonic()
    with tracing.span(
        "chat.tools", attributes={"agentplane.step": ctx.steps_run, "agentplane.calls": len(calls)}
    ):
        results = await _call_all(ctx, info, message_id, calls)
    if ctx.step is not None:
        ctx.step.tools += time.monotonic() - started
    parts = []
    for i, c in enumerate(calls):
        r = results.finished.get(i)
        if r is None:
            r = interrupted_result(c)
            _tool_finished(ctx, c, results.label(c.name), "interrupted", time.monotonic() - started)
        parts.append(chat_pb2.ContentPart(tool_result=r))
    return await _persist(
        ctx,
        NewMessage(
            role="tool",
            parts=parts,
            sender_id=ctx.config.sender_id,
            runtime_ms=int((time.monotonic() - started) * 1000),
        ),
        pre_events=results.last_finished,
    )


@dataclass
class _ToolResults:
    """The results of the calls that finished, and the event of the last one (sent with the persist)."""

    known: set[str] | None
    # By the call's position in its message (ids of messages stored before they were made unique
    # may repeat).
    finished: dict[int, chat_pb2.ToolResultPart] = field(default_factory=dict)
    last_finished: list[chat_pb2.ChatEvent] = field(default_factory=list)

    def label(self, name: str) -> str:
        """The tool's metric label: its name when the workspace has it (names are the model's)."""
        return name if self.known is not None and name in self.known else UNKNOWN_TOOL


async def _call_all(
    ctx: RunContext, info: RunInfo, message_id: str, calls: Sequence[chat_pb2.ToolCallPart]
) -> _ToolResults:
    """Run the calls of the stored message `message_id` in parallel until they finish or the run is
    interrupted."""
    known: set[str] | None = None
    unlisted = ""
    if info.workspace_id:
        try:
            known = {t.name for t in await ctx.tools.list_tools()}
        except ModelError as exc:  # a tool failure is a result the model sees, never a crash
            unlisted = f"The workspace's tools could not be listed ({exc.message}); the call did not run."
    results = _ToolResults(known)

    async def one(index: int, call: chat_pb2.ToolCallPart) -> None:
        begun = time.monotonic()
        ledger = tool_ids.ledger_id(ctx.chat_id, message_id, index, call.id)
        with tracing.span(
            "chat.tool", attributes={"agentplane.tool": call.name[:128], "agentplane.tool_call_id": call.id}
        ):
            outcome = (
                ToolOutcome(unlisted, True) if unlisted else await _call_one(ctx, info, known, call, ledger)
            )
            seconds = time.monotonic() - begun
            _tool_finished(
                ctx, call, results.label(call.name), "error" if outcome.is_error else "ok", seconds
            )
        result = chat_pb2.ToolResultPart(
            tool_call_id=call.id,
            tool_name=call.name,
            content=outcome.content,
            is_error=outcome.is_error,
            structured_json=outcome.structured_json,
        )
        result.duration.FromMilliseconds(outcome.duration_ms or int(seconds * 1000))
        results.finished[index] = result
        event = chat_pb2.ChatEvent(tool_call_finished=chat_pb2.ToolCallFinished(tool_result=result))
        if len(results.finished) == len(calls):
            # The last call to finish is announced together with the persisted results.
            results.last_finished.append(event)
        else:
            await ctx.store.emit(ctx.chat_id, ctx.fence, [event])

    async def all_calls() -> None:
        await asyncio.gather(*(one(i, c) for i, c in enumerate(calls)))

    await _race_interrupt(ctx, all_calls())
    return results


def _tool_finished(
    ctx: RunContext, call: chat_pb2.ToolCallPart, label: str, outcome: str, seconds: float
) -> None:
    ctx.metrics.tool_call(label, outcome, seconds)
    log.info(
        "tool call finished",
        extra={
            "chat_id": ctx.chat_id,
            "step": ctx.steps_run,
            "tool": call.name[:128],
            "tool_call_id": call.id,
            "outcome": outcome,
            "duration_ms": round(seconds * 1000, 1),
        },
    )


async def _synthetic_results(ctx: RunContext, calls: Sequence[chat_pb2.ToolCallPart]) -> chat_pb2.Message:
    parts = [chat_pb2.ContentPart(tool_result=interrupted_result(c)) for c in calls]
    return await _persist(ctx, NewMessage(role="tool", parts=parts, sender_id=ctx.config.sender_id))


async def _call_one(
    ctx: RunContext, info: RunInfo, known: set[str] | None, call: chat_pb2.ToolCallPart, ledger_id: str
) -> ToolOutcome:
    """One call, with the mistakes a model can make turned into results it can correct; sent to
    toolexec under `ledger_id` (see services/chat/tool_ids.py)."""
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
    except RecursionError:  # nested deeper than the parser goes: a model's output, not our bug
        return ToolOutcome(
            f"The arguments of {call.name} are nested too deeply to read; "
            "send a JSON object matching the tool's schema.",
            True,
        )
    if not isinstance(args, dict):
        return ToolOutcome(f"The arguments of {call.name} must be a JSON object.", True)
    try:
        return await ctx.tools.call(
            info.workspace_id, ledger_id, call.name, call.arguments_json or "{}", user_id=info.owner_id
        )
    except ModelError as exc:  # the tools adapter reports its transport failures this way
        return ToolOutcome(f"The tool call failed: {exc.message}", True)


async def compact(
    ctx: RunContext, info: RunInfo, history: Sequence[chat_pb2.Message], *, fenced: bool = True
) -> chat_pb2.Message:
    """Summarize `history` with a generation and persist the summary message (CompactChat)."""
    with tracing.span("chat.compact", attributes={"agentplane.trigger": "manual"}):
        try:
            summary = await _summarize(ctx, info, history, fenced=fenced)
        except ModelError:
            ctx.metrics.compactions.labels("manual", "failed").inc()
            raise
        message = await _persist_summary(ctx, info, summary, fenced=fenced)
    ctx.metrics.compactions.labels("manual", "ok").inc()
    return message


async def _compact_in_turn(
    ctx: RunContext, info: RunInfo, history: Sequence[chat_pb2.Message], trigger: str
) -> chat_pb2.Message | TurnEnd:
    """`_compact_in_turn_once`, counted by `trigger` (threshold, overflow) and outcome."""
    with tracing.span("chat.compact", attributes={"agentplane.trigger": trigger}):
        result = await _compact_in_turn_once(ctx, info, history)
    outcome = "ok" if not isinstance(result, TurnEnd) else result.value
    ctx.metrics.compactions.labels(trigger, outcome).inc()
    return result


async def _compact_in_turn_once(
    ctx: RunContext, info: RunInfo, history: Sequence[chat_pb2.Message]
) -> chat_pb2.Message | TurnEnd:
    """Compaction inside a run: the summary, or how the turn ends instead.

    An interrupt cancels the summary's generation (nothing is persisted; the next turn compacts
    again). A failed generation ends the run with the model's own reason, like a failed step.
    """
    summaries: list[_Summary] = []

    async def summarize() -> None:
        summaries.append(await _summarize(ctx, info, history, fenced=True))

    try:
        if await _race_interrupt(ctx, summarize()):
            return TurnEnd.INTERRUPTED
    except ModelError as exc:
        message = f"Summarizing the conversation to fit the model's context failed: {exc.message}"
        return await _fail(ctx, exc.reason or "MODEL_ERROR", message)
    return await _persist_summary(ctx, info, summaries[0], fenced=True)


@dataclass(frozen=True)
class _Summary:
    text: str
    usage: chat_pb2.Usage
    runtime_ms: int


async def _summarize(
    ctx: RunContext, info: RunInfo, history: Sequence[chat_pb2.Message], *, fenced: bool
) -> _Summary:
    """Generate the summary of `history` (raises ModelError)."""
    request = await build_request(ctx, info, history, with_tools=False, fenced=fenced)
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
        elif kind == "retry":
            await ctx.store.emit(ctx.chat_id, ctx.fence if fenced else None, [_retry_event(ev.retry)])
    summary = "".join(text).strip() or "(The model returned an empty summary.)"
    return _Summary(summary, usage, int((time.monotonic() - started) * 1000))


async def _persist_summary(
    ctx: RunContext, info: RunInfo, summary: _Summary, *, fenced: bool
) -> chat_pb2.Message:
    return await _persist(
        ctx,
        NewMessage(
            role="summary",
            parts=[parts_mod.text_part(summary.text)],
            sender_id=ctx.config.sender_id,
            model_config_id=info.model_config_id,
            usage=summary.usage,
            runtime_ms=summary.runtime_ms,
        ),
        fenced=fenced,
    )


def _merge_user_turns(messages: list[inference_pb2.Message]) -> list[inference_pb2.Message]:
    out: list[inference_pb2.Message] = []
    for m in messages:
        if out and m.role == inference_pb2.ROLE_USER and out[-1].role == inference_pb2.ROLE_USER:
            out[-1].parts.extend(m.parts)
        else:
            out.append(m)
    return out
