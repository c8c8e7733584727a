"""Tool-call ids: unique within an assistant message, and namespaced for toolexec's ledger.

Providers do not all keep ids unique: some OpenAI-compatible servers send ``call_0`` for the first
call of every turn, or no id at all. Two things depend on ids:

- Results answer calls by id (the model matches them, the loop maps them): within one message the
  ids must be unique, so before an assistant message is stored, an empty or repeated id gets a new
  one (`make_unique`). The model sees the stored ids from then on, consistently.
- toolexec's ledger answers a repeated (workspace, tool_call_id) from its record without running
  it: the model's id alone would replay turn 1's ``call_0`` result for turn 2's ``call_0``. So the
  chat sends ``<chat id>/<message id>/<index>/<model's id>`` (`ledger_id`): unique across chats,
  messages and positions, and the same every time one stored call is sent again (a run resumed
  after a crash re-sends the persisted message's calls, whose message id and positions do not
  change), so the ledger still answers a re-sent call from its record.
"""

from __future__ import annotations

from collections.abc import Sequence

from agentplane.chat.v1 import chat_pb2

# toolexec's MAX_TOOL_CALL_ID_LENGTH (services/toolexec/calls.py; a test keeps them equal).
MAX_LEDGER_ID_CHARS = 256


def make_unique(parts: Sequence[chat_pb2.ContentPart]) -> int:
    """Give the tool calls among `parts` (one message's) unique, non-empty ids, in place.

    The first call keeps an id; a repeat becomes ``<id>_2``, ``<id>_3``...; an empty id becomes
    ``call_<n>`` (n: the call's position). New ids use only letters, digits and ``_`` (what every
    provider accepts) and never take an id another call of the message has. Returns how many ids
    changed.
    """
    calls = [p.tool_call for p in parts if p.WhichOneof("part") == "tool_call"]
    taken = {c.id for c in calls if c.id}
    seen: set[str] = set()
    changed = 0
    for index, call in enumerate(calls):
        if call.id and call.id not in seen:
            seen.add(call.id)
            continue
        base, n = (call.id, 2) if call.id else (f"call_{index}", 1)
        candidate = base if n == 1 else f"{base}_{n}"
        while candidate in taken or candidate in seen:
            n += 1
            candidate = f"{base}_{n}"
        call.id = candidate
        seen.add(candidate)
        taken.add(candidate)
        changed += 1
    return changed


def ledger_id(chat_id: str, message_id: str, index: int, call_id: str) -> str:
    """The id toolexec records the `index`-th call of the stored message `message_id` under.

    The model's id comes last and is cut to fit toolexec's limit: the prefix alone is unique, the
    model's id is there for people reading the ledger.
    """
    prefix = f"{chat_id}/{message_id}/{index}/"
    return prefix + call_id[: max(0, MAX_LEDGER_ID_CHARS - len(prefix))]
