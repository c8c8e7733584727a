-- Workspace templates say how the kubernetes driver runs their workspaces (WorkspacePod as proto
-- JSON: image, cpu, memory, storage, storage_class, egress); NULL: the driver's defaults.

ALTER TABLE config_workspace_templates
    ADD COLUMN pod jsonb;
