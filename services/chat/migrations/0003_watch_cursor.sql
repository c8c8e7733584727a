-- WatchChats resumes from a cursor (services/chat/watch.py). A cursor is a Postgres snapshot: the
-- changes it has not seen are the chat rows, and the deletions, whose writing transaction is not
-- visible in it. So each chat row records the transaction that last changed what a Chat shows,
-- and each deletion leaves a tombstone for as long as a cursor may ask for it (7 days, plus a day
-- of margin before the delete statement prunes it).

-- The (top-level) transaction id that last changed the chat as WatchChats reports it.
ALTER TABLE chat_chats ADD COLUMN watch_xid xid8 NOT NULL DEFAULT pg_current_xact_id();

CREATE FUNCTION chat_chats_watch_xid() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.watch_xid := pg_current_xact_id();
    RETURN NEW;
END
$$;

-- A trigger rather than every writer's SET: the writers are many (events, runs, leases, queue),
-- and a missed one would silently skip changes on resume. Lease renewals and other changes that
-- no Chat field shows do not fire it (every change a client sees moves one of these columns).
CREATE TRIGGER chat_chats_watch_xid BEFORE UPDATE ON chat_chats FOR EACH ROW
    WHEN ((OLD.title, OLD.status, OLD.archived, OLD.last_seq, OLD.updated_at, OLD.last_error_reason,
           OLD.last_error_message)
          IS DISTINCT FROM
          (NEW.title, NEW.status, NEW.archived, NEW.last_seq, NEW.updated_at, NEW.last_error_reason,
           NEW.last_error_message))
    EXECUTE FUNCTION chat_chats_watch_xid();

-- Deleted chats, for resumed watches. The chat id is a fresh UUID per chat, never reused.
CREATE TABLE chat_watch_deletions (
    owner_id   text        NOT NULL,
    chat_id    uuid        NOT NULL,
    xid        xid8        NOT NULL DEFAULT pg_current_xact_id(),
    deleted_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner_id, chat_id)
);

CREATE INDEX chat_watch_deletions_time_idx ON chat_watch_deletions (deleted_at);
