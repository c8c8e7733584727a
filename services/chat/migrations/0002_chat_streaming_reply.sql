-- The assistant reply a run is streaming: the message id its part_delta events carry while the
-- message is not persisted yet. The statement that numbers the deltas sets it (no statement of
-- its own), the one that persists that message clears it. A run that starts and finds it set
-- knows an earlier run abandoned that reply (a crash, a lost lease, a failure) and announces
-- it with a durable reply_discarded event, so clients drop its deltas (docs/chat.md, "Events").
ALTER TABLE chat_chats ADD COLUMN streaming_message_id text NULL;
