"""The chat service's domain API: every RPC's rules, over the store, the event hub and the loop.

No grpc here: requests and responses are protobuf messages, errors are domain errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from agentplane.chat.v1 import chat_pb2, chat_service_pb2
from google.protobuf import timestamp_pb2

from services.chat import parts as parts_mod
from services.chat import watch
from services.chat.domain import Fence
from services.chat.events import EventHub
from services.chat.loop import LoopConfig, Model, Prompts, RunContext, Tools, compact
from services.chat.metrics import UNEXPORTED, ChatMetrics
from services.chat.notify import Notifier
from services.chat.store import PB_TO_STATUS, WATCH_CHANNEL, ChatStore, chat_not_found, parse_uuid
from services.common import auth
from services.common.errors import Aborted, FailedPrecondition, InvalidArgument, PermissionDenied

log = logging.getLogger(__name__)

MAX_TITLE = 200
MAX_REQUEST_ID = 200
# A CompactChat key still marked running after this long was left by a replica that died mid-way
# (a summary's generation takes minutes at most): a repeat takes it over and compacts.
COMPACT_CLAIM_STALE_SECONDS = 15 * 60.0
# A watch also looks for changes this often without a notification (LISTEN reconnecting).
WATCH_POLL_SECONDS = 30.0

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
    metrics: ChatMetrics = UNEXPORTED


class ChatAPI:
    """One method per RPC of ChatService."""

    def __init__(
        self,
        store: ChatStore,
        hub: EventHub,
        notifier: Notifier,
        deps: ChatDeps,
        *,
        watch_poll_seconds: float = WATCH_POLL_SECONDS,
    ) -> None:
        self.store = store
        self.hub = hub
        self.notifier = notifier
        self.deps = deps
        self._watch_poll_seconds = watch_poll_seconds
        # CompactChat calls with a request_id running in this process, by (owner, request_id): a
        # repeat waits for the first instead of summarizing again.
        self._compactions: dict[
            tuple[str, str], tuple[str, asyncio.Task[chat_service_pb2.CompactChatResponse]]
        ] = {}

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
        """Delete the chat; a running worker loses its fence and stops.

        Idempotent, so the channel may repeat it: a chat that is gone is deleted already. A chat
        of another user is answered the same way and left alone, so the answer tells nothing
        about ids the caller cannot see.
        """
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
        """Replace a user message and run again from there; idempotent by request_id."""
        owner = auth.require_user_id()
        chat_id = parse_uuid("chat_id", req.chat_id)
        message_id = parse_uuid("message_id", req.message_id)
        request_id = _request_id(req.request_id)
        parts_mod.validate_user_content("content", req.content)
        chat, message = await self.store.edit_message(
            owner_id=owner, chat_id=chat_id, message_id=message_id, content=req.content, request_id=request_id
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
        """Remove a queued message; idempotent (one that is gone, or not the caller's, is no error)."""
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
        """Summarize an idle chat's history now; idempotent by request_id.

        A repeat of a request_id returns the first call's summary. While the first still runs, a
        repeat on this replica waits for it (the work runs in a task of its own, so it finishes
        even when the caller that started it goes away); one on another replica is ABORTED
        (COMPACTION_IN_PROGRESS) without waiting: the key in the database says the work is
        running, not where.
        """
        owner = auth.require_user_id()
        chat_id = parse_uuid("chat_id", req.chat_id)
        request_id = _request_id(req.request_id)
        if not request_id:
            summary = await self._compact(owner, chat_id)
            return chat_service_pb2.CompactChatResponse(
                chat=await self.store.get_chat(owner, chat_id), summary=summary
            )
        key = (owner, request_id)
        running = self._compactions.get(key)
        if running is None:
            task = asyncio.create_task(self._compact_once(owner, chat_id, request_id))
            running = self._compactions[key] = (chat_id, task)
            task.add_done_callback(lambda t: _forget_compaction(self._compactions, key, t))
        elif running[0] != chat_id:
            raise InvalidArgument("request_id", "was already used to compact another chat")
        return await asyncio.shield(running[1])

    async def _compact_once(
        self, owner: str, chat_id: str, request_id: str
    ) -> chat_service_pb2.CompactChatResponse:
        """CompactChat under the idempotency key `request_id` (claimed in the database first)."""
        claim = await self.store.claim_request(
            owner, "compact", request_id, chat_id, stale_seconds=COMPACT_CLAIM_STALE_SECONDS
        )
        if claim.chat_id != chat_id:
            raise InvalidArgument("request_id", "was already used to compact another chat")
        if claim.state == "done":
            return chat_service_pb2.CompactChatResponse(
                chat=await self.store.get_chat(owner, chat_id),
                summary=await self.store.get_message(owner, chat_id, claim.message_id),
            )
        if claim.state == "running":
            raise Aborted(
                f"a CompactChat of chat {chat_id} with request_id {request_id!r} is still running on "
                "another replica; repeat the same request once it has finished to get its summary",
                reason="COMPACTION_IN_PROGRESS",
                metadata={"chat_id": chat_id, "request_id": request_id},
            )
        try:
            summary = await self._compact(owner, chat_id)
        except BaseException:
            # No summary was stored (storing it is the last step): let a repeat compact again. If
            # even this fails, the key goes stale and a repeat takes it over after
            # COMPACT_CLAIM_STALE_SECONDS.
            with contextlib.suppress(Exception):
                await asyncio.shield(self.store.drop_request(owner, "compact", request_id))
            raise
        try:
            await self.store.finish_request(owner, "compact", request_id, summary.id)
        except Exception:
            # The summary is stored: this caller gets it. Repeats see the key running until it
            # goes stale, then compact again; better than failing a compaction that happened.
            log.warning(
                "could not record the result of a CompactChat request id",
                extra={"chat_id": chat_id},
                exc_info=True,
            )
        return chat_service_pb2.CompactChatResponse(
            chat=await self.store.get_chat(owner, chat_id), summary=summary
        )

    async def _compact(self, owner: str, chat_id: str) -> chat_pb2.Message:
        """Summarize the owner's idle chat now (one model call); the stored summary message."""
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
            metrics=self.deps.metrics,
        )
        if info.agents_md is None:
            info.agents_md = ""  # not read outside a run: reading needs a fenced write
        return await compact(ctx, info, history, fenced=False)

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

    async def watch_chats(
        self, req: chat_service_pb2.WatchChatsRequest
    ) -> AsyncIterator[chat_service_pb2.WatchChatsResponse]:
        """The caller's chat list changes: those since `req.cursor` first, then a bookmark, then live.

        A notification of one of the owner's changes only wakes the watch; what it delivers is read
        from the tables after its cursor (services/chat/watch.py), so a change is delivered once
        whatever the notifications do, and a client that reads slowly falls behind nothing: the
        changes it has not read wait in the tables, several of one chat becoming one.
        """
        owner = auth.require_user_id()
        cursor = watch.decode(req.cursor) if req.cursor else None
        woken = asyncio.Event()

        def on_note(payload: str) -> None:
            if payload.partition(" ")[0] == owner:
                woken.set()

        # Listening before the first read: a change committed after that read wakes the watch.
        remove = self.notifier.add(WATCH_CHANNEL, on_note)
        try:
            if cursor is None:
                taken_at = time.time()
                cursor = watch.Cursor.at(await self.store.watch_snapshot(), taken_at)
            else:
                changes, cursor = await self._watch_batch(owner, cursor)
                for change in changes:
                    yield change
            yield watch.bookmark(cursor)
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._watch_poll_seconds):
                        await woken.wait()
                woken.clear()  # before reading: a change committed meanwhile wakes us again
                changes, cursor = await self._watch_batch(owner, cursor)
                for change in changes:
                    yield change
        finally:
            remove()

    async def _watch_batch(
        self, owner: str, cursor: watch.Cursor
    ) -> tuple[list[chat_service_pb2.WatchChatsResponse], watch.Cursor]:
        taken_at = time.time()
        batch = await self.store.watch_changes(owner, cursor.position)
        return watch.responses(cursor, batch, taken_at)


def _forget_compaction(
    running: dict[tuple[str, str], tuple[str, asyncio.Task[chat_service_pb2.CompactChatResponse]]],
    key: tuple[str, str],
    task: asyncio.Task[chat_service_pb2.CompactChatResponse],
) -> None:
    """A finished CompactChat task leaves the in-process table (the database key remains)."""
    if running.get(key, ("", None))[1] is task:
        del running[key]
    if not task.cancelled():
        task.exception()  # its callers got it; retrieved, so asyncio does not report it as lost


def ensure_owner(chat: chat_pb2.Chat, owner: str) -> None:
    """NOT_FOUND unless `owner` owns `chat`."""
    if chat.owner_id != owner:
        raise chat_not_found(chat.id)
