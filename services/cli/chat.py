"""`agentplane chat new|send|watch|list|show|interrupt`: talk to agents from a terminal.

`new` and `send` take the message as an argument, from stdin (`-`) or from a file (`--file PATH`);
`--model` takes a model config id or name. `watch` follows a chat live (streaming text, tool calls
with a one-line summary of their arguments, results, status; a reply that will never be persisted,
its run having crashed or its provider stream broken, is followed by a "[reply discarded ...]" note)
and reconnects by itself from the last sequence number it saw: after `--retries` failed attempts
in a row (default 10, backoff 0.2 s doubling to 5 s, each announced on stderr with its cause) it
gives up with an error, exit 1.
`watch --until-idle` on a chat that is not running prints its state and exits at once (0 when
waiting, 1 when its last turn failed). Every command takes `--output json` (`watch` then prints
one JSON event per line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from agentplane.chat.v1 import chat_pb2, chat_service_pb2, chat_service_pb2_grpc

from services.cli.configrpc import read_input, resolve_model
from services.cli.connect import (
    add_connection_arguments,
    call,
    describe,
    open_channel,
    report_rpc_error,
    service_address,
    to_dict,
)
from services.cli.output import CliError, add_output_argument, emit, notice, table
from services.common.settings import Settings

IDLE = (chat_pb2.CHAT_STATUS_WAITING, chat_pb2.CHAT_STATUS_ERROR)
RECONNECT_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL)
DEFAULT_RETRIES = 10
FIRST_BACKOFF_SECONDS = 0.2
MAX_BACKOFF_SECONDS = 5.0


def register(subparsers: Any) -> None:
    """Add the `chat` command group."""
    chat = subparsers.add_parser("chat", help="create, follow and steer chats")
    actions = chat.add_subparsers(dest="chat_action", required=True)

    new = actions.add_parser("new", help="start a chat with a prompt")
    new.add_argument("prompt", nargs="?", help="the first message ('-' reads it from stdin)")
    new.add_argument("--file", help="read the first message from this file ('-' for stdin)")
    new.add_argument("--model", default="", help="model config id or name (default: the deployment default)")
    new.add_argument(
        "--config-address",
        help="config service host:port, to look up a model name (default AGENTPLANE_CONFIG_ADDR)",
    )
    new.add_argument("--workspace", default="", help="workspace id the agent's tools act in")
    new.add_argument("--title", default="")
    new.add_argument("--wait", action="store_true", help="follow the chat until the turn ends")
    new.set_defaults(func=cmd_new)

    send = actions.add_parser("send", help="send a message (queued while the chat runs)")
    send.add_argument("chat_id")
    send.add_argument("text", nargs="?", help="the message ('-' reads it from stdin)")
    send.add_argument("--file", help="read the message from this file ('-' for stdin)")
    send.add_argument("--interrupt", action="store_true", help="interrupt the current turn, run this next")
    send.add_argument("--wait", action="store_true", help="follow the chat until the turn ends")
    send.set_defaults(func=cmd_send)

    watch = actions.add_parser("watch", help="follow a chat live; reconnects by itself")
    watch.add_argument("chat_id")
    watch.add_argument("--after-seq", type=int, default=0, help="start after this sequence number")
    watch.add_argument("--until-idle", action="store_true", help="exit when the current turn ends")
    watch.set_defaults(func=cmd_watch)

    lst = actions.add_parser("list", help="list your chats, newest activity first")
    lst.add_argument("--status", choices=["pending", "running", "waiting", "error"])
    lst.add_argument("--archived", action="store_true", help="list archived chats")
    lst.add_argument("--limit", type=int, default=50)
    lst.set_defaults(func=cmd_list)

    show = actions.add_parser("show", help="show a chat and its messages")
    show.add_argument("chat_id")
    show.set_defaults(func=cmd_show)

    interrupt = actions.add_parser("interrupt", help="stop the current turn")
    interrupt.add_argument("chat_id")
    interrupt.set_defaults(func=cmd_interrupt)

    for parser in (new, send, watch):
        parser.add_argument(
            "--retries",
            type=int,
            default=DEFAULT_RETRIES,
            help=f"give up after this many failed reconnection attempts in a row (default {DEFAULT_RETRIES})",
        )
    for parser in (new, send, watch, lst, show, interrupt):
        add_output_argument(parser)
        add_connection_arguments(parser)


def _text(text: str) -> list[chat_pb2.ContentPart]:
    return [chat_pb2.ContentPart(text=chat_pb2.TextPart(text=text))]


def message_text(given: str | None, file: str | None) -> str:
    """The message of `new`/`send`: the argument, stdin for ``-``, or the file; exactly one."""
    if (given is None) == (file is None):
        raise CliError("give the message as TEXT, as '-' (read from stdin) or with --file PATH; exactly one")
    text = read_input(file) if file is not None else read_input("-") if given == "-" else str(given)
    if not text.strip():
        raise CliError("the message is empty")
    return text


async def cmd_new(args: argparse.Namespace) -> int:
    """CreateChat, optionally following it."""
    text = message_text(args.prompt, args.file)
    model_id = await resolve_model(args, args.model, admin=False, address=_config_address(args))
    if model_id is None:
        return 1
    async with open_channel(args, "chat") as channel:
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        request = chat_service_pb2.CreateChatRequest(
            request_id=str(uuid.uuid4()),
            content=_text(text),
            model_config_id=model_id,
            workspace_id=args.workspace,
            title=args.title,
        )
        reply = await call(args, lambda: stub.CreateChat(request))
        if reply is None:
            return 1
        if not args.wait:
            emit(args, to_dict(reply.chat), f"{reply.chat.id}  {reply.chat.title}")
            return 0
        if args.output != "json":
            print(f"chat {reply.chat.id}: {reply.chat.title}")
        return await follow(stub, args, reply.chat.id, after_seq=0, idle_after=reply.message.seq)


def _config_address(args: argparse.Namespace) -> str:
    """Where to look a model name up: `--config-address`, else AGENTPLANE_CONFIG_ADDR (never the
    chat service's `--address`)."""
    return str(getattr(args, "config_address", None) or Settings.from_env().address("config"))


async def cmd_send(args: argparse.Namespace) -> int:
    """SendMessage, optionally following the chat."""
    text = message_text(args.text, args.file)
    async with open_channel(args, "chat") as channel:
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        behavior = chat_pb2.BUSY_BEHAVIOR_INTERRUPT if args.interrupt else chat_pb2.BUSY_BEHAVIOR_QUEUE
        request = chat_service_pb2.SendMessageRequest(
            chat_id=args.chat_id,
            request_id=str(uuid.uuid4()),
            content=_text(text),
            busy_behavior=behavior,
        )
        reply = await call(args, lambda: stub.SendMessage(request))
        if reply is None:
            return 1
        if not args.wait:
            queued = reply.HasField("queued_message")
            summary = f"queued at position {reply.queued_message.position}" if queued else "sent"
            emit(args, to_dict(reply), summary)
            return 0
        floor = reply.message.seq if reply.HasField("message") else reply.chat.last_seq
        return await follow(stub, args, args.chat_id, after_seq=reply.chat.last_seq, idle_after=floor)


async def cmd_watch(args: argparse.Namespace) -> int:
    """Follow a chat's events live."""
    async with open_channel(args, "chat") as channel:
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        idle_after: int | None = None
        if args.until_idle:
            retry = _Retry(args)
            request = chat_service_pb2.GetChatRequest(chat_id=args.chat_id)
            while True:
                try:
                    got = await stub.GetChat(request, timeout=30)
                    break
                except grpc.aio.AioRpcError as exc:
                    if not await retry.after(exc, "looking the chat up"):
                        return 1
            if got.chat.status in IDLE:
                emit(args, to_dict(got.chat), _idle_state(got.chat))
                return 0 if got.chat.status == chat_pb2.CHAT_STATUS_WAITING else 1
            idle_after = got.chat.last_seq
        return await follow(stub, args, args.chat_id, after_seq=args.after_seq, idle_after=idle_after)


def _idle_state(chat: chat_pb2.Chat) -> str:
    """What `watch --until-idle` says about a chat with no turn running."""
    title = f" ({chat.title})" if chat.title else ""
    if chat.status == chat_pb2.CHAT_STATUS_ERROR:
        state = f"in error, its last turn failed: {chat.last_error.reason}: {chat.last_error.message}"
    else:
        state = "waiting for a message: no turn is running"
    return f"chat {chat.id}{title} is {state} (last event seq {chat.last_seq}); nothing to wait for"


class _Retry:
    """Bounded reconnection: `after(exc)` sleeps and says so when another attempt is allowed,
    else prints the final error; `succeeded()` starts the count again."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.limit = max(0, int(getattr(args, "retries", DEFAULT_RETRIES)))
        self.failures = 0
        self.address = service_address(args, "chat")

    def succeeded(self) -> None:
        self.failures = 0

    def delay(self) -> float:
        return float(min(FIRST_BACKOFF_SECONDS * 2 ** max(0, self.failures - 1), MAX_BACKOFF_SECONDS))

    async def after(self, exc: grpc.aio.AioRpcError, doing: str) -> bool:
        """True after waiting out the backoff when `exc` is worth another attempt."""
        address = self.address
        if exc.code() not in RECONNECT_CODES:
            report_rpc_error(self.args, exc)
            return False
        self.failures += 1
        if self.failures > self.limit:
            report_rpc_error(
                self.args,
                exc,
                prefix=f"giving up: the chat service at {address} failed {self.failures} times in a row "
                f"while {doing}; last error: ",
            )
            return False
        delay = self.delay()
        how = "unreachable" if exc.code() == grpc.StatusCode.UNAVAILABLE else "failed"
        notice(
            self.args,
            f"[chat service at {address} {how} while {doing} ({describe(exc)}); "
            f"retrying in {delay:.1f} s, attempt {self.failures} of {self.limit}]",
        )
        await asyncio.sleep(delay)
        return True


async def cmd_list(args: argparse.Namespace) -> int:
    """ListChats."""
    async with open_channel(args, "chat") as channel:
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        status = chat_pb2.ChatStatus.Value(f"CHAT_STATUS_{(args.status or 'unspecified').upper()}")
        request = chat_service_pb2.ListChatsRequest(
            page_size=args.limit, status=status, archived=args.archived
        )
        reply = await call(args, lambda: stub.ListChats(request))
        if reply is None:
            return 1
        rows = [
            [c.id, _status(c.status), c.update_time.ToDatetime().isoformat(timespec="seconds") + "Z", c.title]
            for c in reply.chats
        ]
        text = table(["ID", "STATUS", "UPDATED", "TITLE"], rows, "no chats")
        emit(args, [to_dict(c) for c in reply.chats], text)
        return 0


async def cmd_show(args: argparse.Namespace) -> int:
    """GetChat plus every message."""
    async with open_channel(args, "chat") as channel:
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        got = await call(args, lambda: stub.GetChat(chat_service_pb2.GetChatRequest(chat_id=args.chat_id)))
        if got is None:
            return 1
        messages: list[chat_pb2.Message] = []
        token = ""
        while True:
            request = chat_service_pb2.ListMessagesRequest(
                chat_id=args.chat_id, page_size=1000, page_token=token
            )
            page = await call(args, lambda r=request: stub.ListMessages(r))  # type: ignore[misc]
            if page is None:
                return 1
            messages.extend(page.messages)
            token = page.next_page_token
            if not token:
                break
        chat = got.chat
        header = f"{chat.id}  {chat.title}  [{_status(chat.status)}]"
        if chat.status == chat_pb2.CHAT_STATUS_ERROR:
            header += f"  {chat.last_error.reason}: {chat.last_error.message}"
        text = "\n".join([header, *(_render_message(m) for m in messages)])
        emit(args, {"chat": to_dict(chat), "messages": [to_dict(m) for m in messages]}, text)
        return 0


async def cmd_interrupt(args: argparse.Namespace) -> int:
    """InterruptChat."""
    async with open_channel(args, "chat") as channel:
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        request = chat_service_pb2.InterruptChatRequest(chat_id=args.chat_id)
        reply = await call(args, lambda: stub.InterruptChat(request))
        if reply is None:
            return 1
        emit(args, to_dict(reply.chat), f"chat is {_status(reply.chat.status)}")
        return 0


@dataclass
class _Follow:
    last_seq: int
    idle_after: int | None
    mid_line: bool = False
    # Replies announced discarded (reply_discarded): a late delta of one is not printed.
    discarded: set[str] = field(default_factory=set)


async def follow(
    stub: chat_service_pb2_grpc.ChatServiceStub,
    args: argparse.Namespace,
    chat_id: str,
    *,
    after_seq: int,
    idle_after: int | None,
) -> int:
    """Stream events, reconnecting from the last seq (bounded: `_Retry`); with `idle_after`, stop
    at the first idle status after that seq. Returns 0, or 1 when the turn ended in ERROR or the
    stream failed for good."""
    state = _Follow(last_seq=after_seq, idle_after=idle_after)
    retry = _Retry(args)
    while True:
        try:
            stream = stub.StreamChat(
                chat_service_pb2.StreamChatRequest(chat_id=chat_id, after_seq=state.last_seq)
            )
            async for reply in stream:
                retry.succeeded()
                event = reply.event
                if event.seq <= state.last_seq:
                    continue  # never print an event twice, whatever the server resends
                state.last_seq = event.seq
                _print_event(args, state, event)
                if _turn_done(state, event):
                    _end_line(state)
                    ok = event.status_changed.status != chat_pb2.CHAT_STATUS_ERROR
                    return 0 if ok else 1
            # The server ended the stream (shutting down): resume from where we are.
            retry.succeeded()
            _end_line(state)
            notice(args, f"[the server ended the stream; reconnecting after seq {state.last_seq}]")
            await asyncio.sleep(FIRST_BACKOFF_SECONDS)
        except grpc.aio.AioRpcError as exc:
            _end_line(state)
            if not await retry.after(exc, f"following the chat after seq {state.last_seq}"):
                return 1


def _turn_done(state: _Follow, event: chat_pb2.ChatEvent) -> bool:
    return (
        state.idle_after is not None
        and event.seq > state.idle_after
        and event.WhichOneof("event") == "status_changed"
        and event.status_changed.status in IDLE
    )


def _status(status: chat_pb2.ChatStatus.ValueType) -> str:
    return str(chat_pb2.ChatStatus.Name(status)).removeprefix("CHAT_STATUS_").lower()


def _end_line(state: _Follow) -> None:
    if state.mid_line:
        print()
        state.mid_line = False


def _print_event(args: argparse.Namespace, state: _Follow, event: chat_pb2.ChatEvent) -> None:
    if args.output == "json":
        print(json.dumps(to_dict(event)), flush=True)
        return
    kind = event.WhichOneof("event")
    if kind == "reply_discarded":
        # The text printed for it stays on the terminal: say that it does not count.
        state.discarded.add(event.reply_discarded.message_id)
    if kind == "part_delta":
        delta = event.part_delta
        if delta.message_id in state.discarded:
            return
        text = delta.text if delta.WhichOneof("delta") == "text" else delta.reasoning
        sys.stdout.write(text)
        sys.stdout.flush()
        state.mid_line = not text.endswith("\n")
        return
    _end_line(state)
    line = _event_line(event, kind)
    if line:
        print(line, flush=True)


def _event_line(event: chat_pb2.ChatEvent, kind: str | None) -> str:
    if kind == "status_changed":
        change = event.status_changed
        extra = f" {change.error.reason}: {change.error.message}" if change.HasField("error") else ""
        return f"[{_status(change.status)}{extra}]"
    if kind == "tool_call_started":
        call = event.tool_call_started.tool_call
        return f"→ {call.name}({summarize_arguments(call.arguments_json)})"
    if kind == "tool_call_finished":
        result = event.tool_call_finished.tool_result
        mark = "✗" if result.is_error else "✓"
        return f"  {mark} {_first_line(result.content)}"
    if kind == "message_persisted" and event.message_persisted.role == chat_pb2.MESSAGE_ROLE_USER:
        return "> " + _first_line(_message_text(event.message_persisted), 200)
    if kind == "queue_changed":
        return f"[queue: {len(event.queue_changed.queued_messages)} waiting]"
    if kind == "retry_scheduled":
        retry = event.retry_scheduled
        return f"[provider failed ({retry.reason}); retry {retry.attempt} in {retry.delay_ms} ms]"
    if kind == "error":
        return f"[error {event.error.reason}: {event.error.message}]"
    if kind == "reply_discarded":
        return discarded_note(event.reply_discarded)
    return ""


def discarded_note(discarded: chat_pb2.ReplyDiscarded) -> str:
    """The line that follows the partial text of a reply that will never be persisted."""
    then = "; retrying" if discarded.retrying else ""
    return f"[reply discarded ({discarded.reason or 'unknown reason'}): the text above is not kept{then}]"


def summarize_arguments(arguments_json: str, width: int = 40) -> str:
    """`key=value, ...` with long values shortened, for a one-line view of a tool call."""
    try:
        arguments = json.loads(arguments_json or "{}")
    except json.JSONDecodeError:
        return _clip(arguments_json, width)
    if not isinstance(arguments, dict):
        return _clip(json.dumps(arguments), width)
    parts = []
    for key, value in arguments.items():
        shown = value if isinstance(value, str) else json.dumps(value)
        parts.append(f"{key}={_clip(shown, width)}")
    return ", ".join(parts)


def _clip(text: str, width: int) -> str:
    text = text.replace("\n", "⏎")
    return text if len(text) <= width else text[: width - 1] + "…"


def _first_line(text: str, width: int = 120) -> str:
    lines = text.strip().splitlines()
    first = lines[0] if lines else ""
    more = f" (+{len(lines) - 1} lines)" if len(lines) > 1 else ""
    return _clip(first, width) + more


def _message_text(message: chat_pb2.Message) -> str:
    return "".join(p.text.text for p in message.parts if p.WhichOneof("part") == "text")


def _render_message(message: chat_pb2.Message) -> str:
    role = str(chat_pb2.MessageRole.Name(message.role)).removeprefix("MESSAGE_ROLE_").lower()
    lines = []
    for part in message.parts:
        kind = part.WhichOneof("part")
        if kind == "text":
            lines.append(part.text.text)
        elif kind == "reasoning":
            lines.append(f"(thinking) {_first_line(part.reasoning.text)}")
        elif kind == "tool_call":
            lines.append(f"→ {part.tool_call.name}({summarize_arguments(part.tool_call.arguments_json)})")
        elif kind == "tool_result":
            mark = "✗" if part.tool_result.is_error else "✓"
            lines.append(f"  {mark} {_first_line(part.tool_result.content)}")
        elif kind == "image":
            lines.append(f"[image {part.image.mime_type}, {len(part.image.data)} bytes]")
    body = "\n".join(lines)
    return f"--- {role}\n{body}"
