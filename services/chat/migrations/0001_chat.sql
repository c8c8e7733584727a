-- Chats, their messages, queued messages, durable events and idempotency keys.
-- Every table is owned by the chat service (prefix chat_).

CREATE TABLE chat_chats (
    id                     uuid        PRIMARY KEY,
    owner_id               text        NOT NULL,
    title                  text        NOT NULL,
    status                 text        NOT NULL CHECK (status IN ('pending', 'running', 'waiting', 'error')),
    model_config_id        text        NOT NULL,
    workspace_id           text        NOT NULL DEFAULT '',
    archived               boolean     NOT NULL DEFAULT false,
    parent_chat_id         uuid        NULL,
    -- The worker that owns the current run, its lease, and the run generation that fences writes.
    worker_id              text        NULL,
    lease_expires_at       timestamptz NULL,
    generation             bigint      NOT NULL DEFAULT 0,
    -- Set by an interrupt while a worker owns the run: 'stop' (wait for the user) or
    -- 'resume' (run the front queued message next).
    interrupt              text        NULL CHECK (interrupt IN ('stop', 'resume')),
    last_error_reason      text        NULL,
    last_error_message     text        NULL,
    last_error_time        timestamptz NULL,
    last_seq               bigint      NOT NULL DEFAULT 0,
    -- AGENTS.md of the workspace, read once per chat ('' when the workspace has none).
    agents_md              text        NULL,
    input_tokens           bigint      NOT NULL DEFAULT 0,
    output_tokens          bigint      NOT NULL DEFAULT 0,
    reasoning_tokens       bigint      NOT NULL DEFAULT 0,
    cache_read_tokens      bigint      NOT NULL DEFAULT 0,
    cache_write_tokens     bigint      NOT NULL DEFAULT 0,
    cost_micros            bigint      NOT NULL DEFAULT 0,
    created_at             timestamptz NOT NULL DEFAULT now(),
    updated_at             timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX chat_chats_owner_idx ON chat_chats (owner_id, updated_at DESC, id DESC);
CREATE INDEX chat_chats_pending_idx ON chat_chats (updated_at) WHERE status = 'pending';
CREATE INDEX chat_chats_worker_idx ON chat_chats (worker_id) WHERE worker_id IS NOT NULL;

CREATE TABLE chat_messages (
    id                 uuid        PRIMARY KEY,
    chat_id            uuid        NOT NULL REFERENCES chat_chats (id) ON DELETE CASCADE,
    seq                bigint      NOT NULL,
    role               text        NOT NULL CHECK (role IN ('user', 'assistant', 'tool', 'summary')),
    parts              jsonb       NOT NULL,
    visibility         smallint    NOT NULL DEFAULT 3,
    model_config_id    text        NOT NULL DEFAULT '',
    runtime_ms         bigint      NOT NULL DEFAULT 0,
    sender_id          text        NOT NULL,
    input_tokens       bigint      NOT NULL DEFAULT 0,
    output_tokens      bigint      NOT NULL DEFAULT 0,
    reasoning_tokens   bigint      NOT NULL DEFAULT 0,
    cache_read_tokens  bigint      NOT NULL DEFAULT 0,
    cache_write_tokens bigint      NOT NULL DEFAULT 0,
    cost_micros        bigint      NOT NULL DEFAULT 0,
    -- Soft delete: an edit hides every later message.
    deleted            boolean     NOT NULL DEFAULT false,
    created_at         timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX chat_messages_chat_idx ON chat_messages (chat_id, seq);
CREATE INDEX chat_messages_usage_idx ON chat_messages (created_at) WHERE role = 'assistant';

CREATE TABLE chat_queued_messages (
    id         uuid        PRIMARY KEY,
    chat_id    uuid        NOT NULL REFERENCES chat_chats (id) ON DELETE CASCADE,
    -- Ordering key: smallest runs next; promotion takes min - 1.
    position   bigint      NOT NULL,
    parts      jsonb       NOT NULL,
    sender_id  text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX chat_queued_messages_chat_idx ON chat_queued_messages (chat_id, position);

-- Durable events (everything but streaming deltas), replayed by StreamChat.
CREATE TABLE chat_events (
    chat_id uuid   NOT NULL REFERENCES chat_chats (id) ON DELETE CASCADE,
    seq     bigint NOT NULL,
    event   bytea  NOT NULL,
    PRIMARY KEY (chat_id, seq)
);

-- Idempotency keys of CreateChat, SendMessage and ForkChat.
CREATE TABLE chat_requests (
    owner_id   text        NOT NULL,
    kind       text        NOT NULL,
    request_id text        NOT NULL,
    chat_id    uuid        NOT NULL,
    message_id uuid        NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (owner_id, kind, request_id)
);
