-- Workspace templates say whether their workspaces may use the network (sandboxed, off by default).

ALTER TABLE config_workspace_templates
    ADD COLUMN network_access boolean NOT NULL DEFAULT false;
