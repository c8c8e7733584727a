-- toolexec: workspace records and the tool-call ledger.

CREATE TABLE toolexec_workspaces (
    id              text        PRIMARY KEY,
    owner_id        text        NOT NULL,
    name            text        NOT NULL,
    template_id     text        NOT NULL DEFAULT '',
    parameters      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    state           text        NOT NULL CHECK (state IN ('creating', 'ready', 'failed')),
    failure_message text        NOT NULL DEFAULT '',
    request_id      text,
    create_time     timestamptz NOT NULL DEFAULT now(),
    update_time     timestamptz NOT NULL DEFAULT now()
);

-- Idempotent creates: one workspace per (owner, request_id).
CREATE UNIQUE INDEX toolexec_workspaces_request
    ON toolexec_workspaces (owner_id, request_id) WHERE request_id IS NOT NULL;

-- Owner-scoped listing, newest first (keyset pagination on create_time, id).
CREATE INDEX toolexec_workspaces_owner_time
    ON toolexec_workspaces (owner_id, create_time DESC, id DESC);

-- One row per (workspace, tool_call_id): 'started' before the tool runs, 'completed' after.
CREATE TABLE toolexec_tool_calls (
    workspace_id     text        NOT NULL REFERENCES toolexec_workspaces (id) ON DELETE CASCADE,
    tool_call_id     text        NOT NULL,
    tool_name        text        NOT NULL,
    arguments_sha256 text        NOT NULL,
    state            text        NOT NULL CHECK (state IN ('started', 'completed')),
    instance_id      text        NOT NULL,
    content          text,
    structured_json  text,
    is_error         boolean,
    interrupted      boolean     NOT NULL DEFAULT false,
    duration_ms      double precision,
    started_at       timestamptz NOT NULL DEFAULT now(),
    completed_at     timestamptz,
    PRIMARY KEY (workspace_id, tool_call_id)
);
