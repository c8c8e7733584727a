"""The Postgres NOTIFY channels the chat service's writes signal on (see services/chat/notify.py)."""

from __future__ import annotations

# A chat became PENDING: a claim loop should look.
PENDING_CHANNEL = "agentplane_chat_pending"
# A running chat was interrupted, edited or deleted: its worker should renew at once.
INTERRUPT_CHANNEL = "agentplane_chat_interrupt"
# A chat changed ('u') or was deleted ('d'): WatchChats subscribers of its owner should look.
WATCH_CHANNEL = "agentplane_chat_watch"

# Tells WatchChats subscribers that a chat changed, as a RETURNING item of the chat row's update.
NOTIFY_WATCH = f"pg_notify('{WATCH_CHANNEL}', owner_id || ' ' || id::text || ' u') AS _n"
# Wakes the claim loops, as a RETURNING item of the statement that makes a chat PENDING.
NOTIFY_PENDING = f"pg_notify('{PENDING_CHANNEL}', id::text) AS _p"
# Tells the worker running a chat to renew (and so see its interrupt flag or lost fence) at once.
NOTIFY_INTERRUPT = f"pg_notify('{INTERRUPT_CHANNEL}', id::text) AS _i"
