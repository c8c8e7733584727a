"""Replies that will never be persisted: announcing them discarded, and retrying a broken stream.

A reply streams to clients as `PartDelta` events before its message is persisted. When that
message never comes, clients must be told to drop the deltas, or they show the partial text
followed by the reply that replaces it. Two ways it happens:

- the run that streamed it ended without persisting it (its replica crashed or stopped, its
  lease was lost, it failed unexpectedly): the chat row still names the reply
  (`streaming_message_id`, set by the statement that numbered its deltas), and the chat's next
  run announces it (`discard_abandoned`) before it generates anything;
- the provider's stream broke mid-reply (`STREAM_INTERRUPTED`: inference never retries once output
  has started, since the caller would get the output twice): the loop announces the reply
  discarded and generates it again, at most `LoopConfig.stream_retries` times
  (`failed_generation`). Other failures end the turn in ERROR, after the same announcement.

Both are a durable `reply_discarded` event (docs/chat.md, "Events"); neither adds a statement to
a step that succeeds.
"""

from __future__ import annotations

from agentplane.chat.v1 import chat_pb2

from services.chat.domain import Fence
from services.chat.loop_types import LoopConfig, ModelError, Store

# The reason of a reply abandoned by the run that streamed it.
RUN_ABANDONED = "RUN_ABANDONED"
# The inference service's reason for a provider stream that failed after output had started.
STREAM_INTERRUPTED = "STREAM_INTERRUPTED"


async def discard_abandoned(store: Store, chat_id: str, fence: Fence, message_id: str) -> None:
    """A new run found `message_id` streamed by an earlier run and never persisted: announce it
    discarded (this run answers in its place)."""
    await store.discard_reply(chat_id, fence, message_id, reason=RUN_ABANDONED, retrying=True)


async def failed_generation(
    store: Store,
    chat_id: str,
    fence: Fence,
    config: LoopConfig,
    exc: ModelError,
    partial: str | None,
    broken: int,
) -> float | None:
    """A generation failed with `exc` after `broken` broken streams in a row in this step;
    `partial` is the id of the reply whose deltas went out, if any.

    Announces the partial reply discarded (with a retry notice when retrying) and returns the
    seconds to wait before generating again, or None when the turn fails (the caller ends it).
    """
    delay: float | None = None
    if exc.reason == STREAM_INTERRUPTED and broken < config.stream_retries:
        delay = config.stream_retry_delay_ms * 2**broken / 1000
    retry: list[chat_pb2.ChatEvent] = []
    if delay is not None:
        notice = chat_pb2.RetryScheduled(
            attempt=broken + 2, delay_ms=round(delay * 1000), reason=exc.reason, message=exc.message[:1000]
        )
        retry.append(chat_pb2.ChatEvent(retry_scheduled=notice))
    if partial is not None:
        reason, retrying = exc.reason or "MODEL_ERROR", delay is not None
        await store.discard_reply(chat_id, fence, partial, reason=reason, retrying=retrying, then=retry)
    elif retry:
        await store.emit(chat_id, fence, retry)
    return delay
