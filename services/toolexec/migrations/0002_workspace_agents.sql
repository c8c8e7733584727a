-- Workspace agents: each workspace has a driver (where its agent runs) and the hash of its agent
-- token; toolexec_agents says which toolexec replica holds the agent's connection.
ALTER TABLE toolexec_workspaces
    ADD COLUMN driver text NOT NULL DEFAULT 'local',
    ADD COLUMN agent_token_sha256 text;

CREATE UNIQUE INDEX toolexec_workspaces_agent_token
    ON toolexec_workspaces (agent_token_sha256) WHERE agent_token_sha256 IS NOT NULL;

CREATE TABLE toolexec_agents (
    workspace_id text PRIMARY KEY REFERENCES toolexec_workspaces (id) ON DELETE CASCADE,
    -- The current connection (a new one replaces it; only its holder may mark it closed).
    connection_id text NOT NULL,
    replica_id text NOT NULL,
    replica_address text NOT NULL,
    connected boolean NOT NULL,
    version text NOT NULL DEFAULT '',
    capabilities jsonb NOT NULL DEFAULT '[]',
    connect_time timestamptz NOT NULL DEFAULT now(),
    last_seen timestamptz NOT NULL DEFAULT now()
);
