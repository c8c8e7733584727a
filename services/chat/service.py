"""The chat service's domain API: every RPC's rules, over the store, the event hub and the loop.

No grpc here: requests and responses are protobuf messages, errors are domain errors.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from agentplane.chat.v1 import chat_pb2, chat_service_pb2
from google.protobuf import timestamp_pb2

from services.chat import parts as parts_mod
from services.chat.domain import Fence
from services.chat.events import EventHub
from services.chat.loop import LoopConfig, Model, Prompts, RunContext, Tools, compact
from services.chat.notify import Notifier
from services.chat.store import PB_TO_STATUS, WATCH_CHANNEL, ChatStore, chat_not_found, parse_uuid
from services.common import auth
from services.common.errors import FailedPrecondition, InvalidArgument, PermissionDenied, ResourceExhausted

MAX_TITLE = 200
MAX_REQUEST_ID = 200

# Checks that the caller may use a workspace (toolexec's GetWorkspace on the caller's behalf).
WorkspaceCheck = Callable[[str], Awaitable[None]]
# Resolves a model config id ('' = default) to the id the chat stores; raises InvalidArgument.
ModelResolver = Callable[[str], Awaitable[str]]


def _page_size(field: str, value: int, default: int, maximum: int) -> int:
    if value < 0:
        raise InvalidArgument(field, "must not be negative")
    return default if value == 0 else min(value, maximum)


def _request_id(value: str) -> str:
    if len(value) > MAX_REQUEST_ID:
        raise InvalidArgument("request_id", f"must be at most {MAX_REQUEST_ID} characters")
    return value


def _title(value: str) -> str:
    title = " ".join(value.split())
    if len(title) > MAX_TITLE:
        raise InvalidArgument("title", f"must be at most {MAX_TITLE} characters")
    return title


def _time(field: str, value: timestamp_pb2.Timestamp) -> dt.datetime:
    """A request's timestamp as a datetime; InvalidArgument outside Timestamp's range (years 1-9999)."""
    try:
        return value.ToDatetime(dt.UTC)
    except (ValueError, OverflowError):
        raise InvalidArgument(field, "must be a time between the years 1 and 9999") from None


@dataclass
class ChatDeps:
    """What the API needs besides the store."""

    model: Model
    tools: Tools
    prompts: Prompts
    resolve_model: ModelResolver
    check_workspace: WorkspaceCheck


class ChatAPI:
    """One method per RPC of ChatService."""

    def __init__(
        self,
        store: ChatStore,
        hub: EventHub,
        notifier: Notifier,
        deps: ChatDeps,
        *,
        watch_queue_size: int = 1000,
    ) -> None:
        self.store = store
        self.hub = hub
        self.notifier = notifier
        self.deps = deps
        self._watch_queue_size = watch_queue_size

    async def create_chat(
        self, req: chat_service_pb2.CreateChatRequest
    ) -> chat_service_pb2.CreateChatResponse:
        """Create a chat with its first message; PENDING, so a worker picks it up."""
        owner = auth.require_user_id()
        request_id = _request_id(req.request_id)
        parts_mod.validate_user_content("content", req.content)
        title = _title(req.title) or parts_mod.derive_title(req.content)
        model_id = await self.deps.resolve_model(req.model_config_id)
        if req.workspace_id:
            await self.deps.check_workspace(req.workspace_id)
        chat, message = await self.store.create_chat(
            owner_id=owner,
            request_id=request_id,
            content=req.content,
            model_config_id=model_id,
            workspace_id=req.workspace_id,
            title=title,
        )
        return chat_service_pb2.CreateChatResponse(chat=chat, message=message)

    async def get_chat(self, req: chat_service_pb2.GetChatRequest) -> chat_service_pb2.GetChatResponse:
        """One chat of the caller."""
        owner = auth.require_user_id()
        chat_id = parse_uuid("chat_id", req.chat_id)
        return chat_service_pb2.GetChatResponse(chat=await self.store.get_chat(owner, chat_id))

    async def list_chats(self, req: chat_service_pb2.ListChatsRequest) -> chat_service_pb2.ListChatsResponse:
        """The caller's chats, newest activity first."""
        owner = auth.require_user_id()
        size = _page_size("page_size", req.page_size, 50, 500)
        if req.status not in PB_TO_STATUS and req.status != chat_pb2.CHAT_STATUS_UNSPECIFIED:
            raise InvalidArgument("status", f"unknown status value {req.status}")
        chats, token = await self.store.list_chats(
            owner,
            page_size=size,
            page_token=req.page_token,
            status=PB_TO_STATUS.get(req.status),
            archived=req.archived if req.HasField("archived") else False,
        )
        return chat_service_pb2.ListChatsResponse(chats=chats, next_page_token=token)

    async def update_chat(
        self, req: chat_service_pb2.UpdateChatRequest
    ) -> chat_service_pb2.UpdateChatResponse:
        """Change title and/or archived, as the mask says."""
        owner = auth.require_user_id()
        chat_id = parse_uuid("chat.id", req.chat.id)
        paths = list(req.update_mask.paths)
        if not paths:
            raise InvalidArgument("update_mask", "must name at least one of: title, archived")
        unknown = [p for p in paths if p not in ("title", "archived")]
        if unknown:
            raise InvalidArgument(
                "update_mask", f"unknown or read-only field(s) {', '.join(unknown)}; allowed: title, archived"
            )
        title = None
        if "title" in paths:
            title = _title(req.chat.title)
            if not title:
                raise InvalidArgument("chat.title", "must not be empty")
        archived = req.chat.archived if "archived" in paths else None
        chat = await self.store.update_chat(owner, chat_id, title=title, archived=archived)
        return chat_service_pb2.UpdateChatResponse(chat=chat)

    async def delete_chat(
        self, req: chat_service_pb2.DeleteChatRequest
    ) -> chat_service_pb2.DeleteChatResponse:
        """Delete the chat; a running worker loses its fence and stops."""
        owner = auth.require_user_id()
        await self.store.delete_chat(owner, parse_uuid("chat_id", req.chat_id))
        return chat_service_pb2.DeleteChatResponse()

    async def send_message(
        self, req: chat_service_pb2.SendMessageRequest
    ) -> chat_service_pb2.SendMessageResponse:
        """Run, queue or interrupt-and-run a user message; idempotent by request_id."""
        owner = auth.require_user_id()
        chat_id = parse_uuid("chat_id", req.chat_id)
        request_id = _request_id(req.request_id)
        parts_mod.validate_user_content("content", req.content)
        if req.busy_behavior not in (
            chat_pb2.BUSY_BEHAVIOR_UNSPECIFIED,
            chat_pb2.BUSY_BEHAVIOR_QUEUE,
            chat_pb2.BUSY_BEHAVIOR_INTERRUPT,
        ):
            raise InvalidArgument("busy_behavior", f"unknown value {req.busy_behavior}")
        chat, message, queued = await self.store.send_message(
            owner_id=owner,
            chat_id=chat_id,
            request_id=request_id,
            content=req.content,
            interrupt=req.busy_behavior == chat_pb2.BUSY_BEHAVIOR_INTERRUPT,
        )
        resp = chat_service_pb2.SendMessageResponse(chat=chat)
        if message is not None:
            resp.message.CopyFrom(message)
        if queued is not None:
            resp.queued_message.CopyFrom(queued)
        return resp

    async def edit_message(
        self, req: chat_service_pb2.EditMessageRequest
    ) -> chat_service_pb2.EditMessageResponse:
        """Replace a user message and run again from there."""
        owner = auth.require_user_id()
        chat_id = parse_uuid("chat_id", req.chat_id)
        message_id = parse_uuid("message_id", req.message_id)
        parts_mod.validate_user_content("content", req.content)
        chat, message = await self.store.edit_message(
            owner_id=owner, chat_id=chat_id, message_id=message_id, content=req.content
        )
        return chat_service_pb2.EditMessageResponse(chat=chat, message=message)

    async def list_messages(
        self, req: chat_service_pb2.ListMessagesRequest
    ) -> chat_service_pb2.ListMessagesResponse:
        """Messages, oldest first."""
        owner = auth.require_user_id()
        chat_id = parse_uuid("chat_id", req.chat_id)
        size = _page_size("page_size", req.page_size, 100, 1000)
        messages, token = await self.store.list_messages(
            owner, chat_id, page_size=size, page_token=req.page_token
        )
        return chat_service_pb2.ListMessagesResponse(messages=messages, next_page_token=token)

    async def list_queued_messages(
        self, req: chat_service_pb2.ListQueuedMessagesRequest
    ) -> chat_service_pb2.ListQueuedMessagesResponse:
        """The queue, next first."""
        owner = auth.require_user_id()
        chat_id = parse_uuid("chat_id", req.chat_id)
        size = _page_size("page_size", req.page_size, 100, 100)
        queued, token = await self.store.list_queued(
            owner, chat_id, page_size=size, page_token=req.page_token
        )
        return chat_service_pb2.ListQueuedMessagesResponse(queued_messages=queued, next_page_token=token)

    async def delete_queued_message(
        self, req: chat_service_pb2.DeleteQueuedMessageRequest
    ) -> chat_service_pb2.DeleteQueuedMessageResponse:
        """Remove a queued message."""
        owner = auth.require_user_id()
        chat_id = parse_uuid("chat_id", req.chat_id)
        queued_id = parse_uuid("queued_message_id", req.queued_message_id)
        await self.store.delete_queued(owner, chat_id, queued_id)
        return chat_service_pb2.DeleteQueuedMessageResponse()

    async def promote_queued_message(
        self, req: chat_service_pb2.PromoteQueuedMessageRequest
    ) -> chat_service_pb2.PromoteQueuedMessageResponse:
        """Move a queued message to the front."""
        owner = auth.require_user_id()
        chat_id = parse_uuid("chat_id", req.chat_id)
        queued_id = parse_uuid("queued_message_id", req.queued_message_id)
        queued = await self.store.promote_queued(owner, chat_id, queued_id)
        return chat_service_pb2.PromoteQueuedMessageResponse(queued_messages=queued)

    async def interrupt_chat(
        self, req: chat_service_pb2.InterruptChatRequest
    ) -> chat_service_pb2.InterruptChatResponse:
        """Stop the current turn."""
        owner = auth.require_user_id()
        chat = await self.store.interrupt(owner, parse_uuid("chat_id", req.chat_id))
        return chat_service_pb2.InterruptChatResponse(chat=chat)

    async def fork_chat(self, req: chat_service_pb2.ForkChatRequest) -> chat_service_pb2.ForkChatResponse:
        """Copy the history up to a message into a new chat."""
        owner = auth.require_user_id()
        chat_id = parse_uuid("chat_id", req.chat_id)
        message_id = parse_uuid("message_id", req.message_id) if req.message_id else ""
        chat = await self.store.fork_chat(
            owner_id=owner,
            chat_id=chat_id,
            message_id=message_id,
            request_id=_request_id(req.request_id),
            title=_title(req.title),
        )
        return chat_service_pb2.ForkChatResponse(chat=chat)

    async def compact_chat(
        self, req: chat_service_pb2.CompactChatRequest
    ) -> chat_service_pb2.CompactChatResponse:
        """Summarize an idle chat's history now."""
        owner = auth.require_user_id()
        chat_id = parse_uuid("chat_id", req.chat_id)
        chat = await self.store.get_chat(owner, chat_id)
        if chat.status in (chat_pb2.CHAT_STATUS_RUNNING, chat_pb2.CHAT_STATUS_PENDING):
            raise FailedPrecondition(
                f"chat {chat_id} is running; interrupt it or wait for the turn to end before compacting",
                reason="CHAT_BUSY",
            )
        history = await self.store.history(chat_id)
        if not history:
            raise FailedPrecondition(f"chat {chat_id} has no history to compact", reason="NOTHING_TO_COMPACT")
        info = await self.store.run_info(chat_id)
        ctx = RunContext(
            chat_id=chat_id,
            fence=Fence("", -1),
            store=self.store,
            model=self.deps.model,
            tools=self.deps.tools,
            prompts=self.deps.prompts,
            config=LoopConfig(),
        )
        if info.agents_md is None:
            info.agents_md = ""  # not read outside a run: reading needs a fenced write
        summary = await compact(ctx, info, history, fenced=False)
        return chat_service_pb2.CompactChatResponse(
            chat=await self.store.get_chat(owner, chat_id), summary=summary
        )

    async def get_usage(self, req: chat_service_pb2.GetUsageRequest) -> chat_service_pb2.GetUsageResponse:
        """Usage of the caller (or, for admins, any user) over a time range."""
        caller = auth.require_user_id()
        user_id = req.user_id or caller
        if user_id != caller and not auth.current_identity().is_admin:
            raise PermissionDenied("only admins may read another user's usage", reason="ADMIN_REQUIRED")
        start = _time("start_time", req.start_time) if req.HasField("start_time") else None
        end = _time("end_time", req.end_time) if req.HasField("end_time") else None
        if start is not None and end is not None and end <= start:
            raise InvalidArgument("end_time", "must be after start_time")
        total, by_model, chats = await self.store.usage(user_id, start, end)
        return chat_service_pb2.GetUsageResponse(usage=total, by_model=by_model, chats=chats)

    async def stream_chat(self, req: chat_service_pb2.StreamChatRequest) -> AsyncIterator[chat_pb2.ChatEvent]:
        """Events after `after_seq`, then live ones."""
        owner = auth.require_user_id()
        chat_id = parse_uuid("chat_id", req.chat_id)
        if req.after_seq < 0:
            raise InvalidArgument("after_seq", "must not be negative")
        chat = await self.store.get_chat(owner, chat_id)
        if req.after_seq > chat.last_seq:
            raise InvalidArgument(
                "after_seq",
                f"is beyond the chat's last event ({chat.last_seq}); resume from a seq you received",
            )
        async for ev in self.hub.subscribe(chat_id, req.after_seq, self.store.events_between):
            yield ev

    async def watch_chats(self) -> AsyncIterator[chat_service_pb2.WatchChatsResponse]:
        """The caller's chat list changes."""
        owner = auth.require_user_id()
        queue: asyncio.Queue[tuple[str, str]] = asyncio.Queue(maxsize=self._watch_queue_size)
        dropped = asyncio.Event()

        def on_note(payload: str) -> None:
            who, _, rest = payload.partition(" ")
            if who != owner:
                return
            chat_id, _, kind = rest.partition(" ")
            try:
                queue.put_nowait((chat_id, kind))
            except asyncio.QueueFull:
                dropped.set()

        remove = self.notifier.add(WATCH_CHANNEL, on_note)
        try:
            while True:
                if dropped.is_set():
                    raise ResourceExhausted(
                        "the chat list watch fell too far behind and was dropped; list chats and watch again",
                        reason="SUBSCRIBER_TOO_SLOW",
                    )
                chat_id, kind = await queue.get()
                # Collapse repeated changes of one chat already waiting in the queue.
                pending = {chat_id: kind}
                while not queue.empty():
                    cid, k = queue.get_nowait()
                    pending[cid] = k
                for cid, k in pending.items():
                    if k == "d":
                        yield chat_service_pb2.WatchChatsResponse(
                            kind=chat_pb2.CHAT_CHANGE_KIND_DELETED, chat=chat_pb2.Chat(id=cid)
                        )
                        continue
                    chat = await self.store.chat_for_watch(cid)
                    if chat is None or chat.owner_id != owner:
                        continue
                    yield chat_service_pb2.WatchChatsResponse(
                        kind=chat_pb2.CHAT_CHANGE_KIND_UPSERTED, chat=chat
                    )
        finally:
            remove()


def ensure_owner(chat: chat_pb2.Chat, owner: str) -> None:
    """NOT_FOUND unless `owner` owns `chat`."""
    if chat.owner_id != owner:
        raise chat_not_found(chat.id)
