"""What a client following a chat's stream shows: replies built from their deltas, as a client
that honours `reply_discarded` builds them (tests of abandoned replies compare it with the
persisted messages)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from agentplane.chat.v1 import chat_pb2


@dataclass
class Transcript:
    """Replies in the order they began, by message id: streamed text until persisted."""

    texts: dict[str, str] = field(default_factory=dict)
    persisted: set[str] = field(default_factory=set)
    discarded: dict[str, chat_pb2.ReplyDiscarded] = field(default_factory=dict)
    # Deltas that arrived for a reply already discarded (a client ignores them).
    late_deltas: int = 0

    @classmethod
    def of(cls, events: Iterable[chat_pb2.ChatEvent]) -> Transcript:
        t = cls()
        for ev in events:
            t.apply(ev)
        return t

    def apply(self, ev: chat_pb2.ChatEvent) -> None:
        kind = ev.WhichOneof("event")
        if kind == "part_delta":
            d = ev.part_delta
            if d.message_id in self.discarded:
                self.late_deltas += 1
                return
            self.texts[d.message_id] = self.texts.get(d.message_id, "") + d.text
        elif kind == "reply_discarded":
            self.discarded[ev.reply_discarded.message_id] = ev.reply_discarded
            self.texts.pop(ev.reply_discarded.message_id, None)
        elif kind == "message_persisted" and ev.message_persisted.role == chat_pb2.MESSAGE_ROLE_ASSISTANT:
            m = ev.message_persisted
            # The client's text is replaced by the stored one; tests compare the streamed text.
            self.texts.setdefault(m.id, "")
            self.persisted.add(m.id)

    def shown(self) -> list[str]:
        """The text of every reply the client still shows, oldest first."""
        return list(self.texts.values())

    def unpersisted(self) -> list[str]:
        """Ids of replies shown that no message_persisted event closed."""
        return [i for i in self.texts if i not in self.persisted]


def streamed_text(events: Iterable[chat_pb2.ChatEvent]) -> str:
    """Every text delta of the events, discarded or not (what a client that ignores
    reply_discarded would show)."""
    return "".join(e.part_delta.text for e in events if e.HasField("part_delta"))


def text_of(message: chat_pb2.Message) -> str:
    return "".join(p.text.text for p in message.parts if p.WhichOneof("part") == "text")
