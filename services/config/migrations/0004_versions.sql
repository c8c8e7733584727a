-- Every mutable config resource carries a version, bumped by each change of it; the API shows it as
-- the resource's etag (AIP-154), and updates and deletes given an etag apply only while it is
-- still the current one. Prompts keep their row (text '' = unset) so their version never
-- restarts: an etag read before a clear can then never match again after the prompt is set anew.

ALTER TABLE config_providers ADD COLUMN version bigint NOT NULL DEFAULT 1;
ALTER TABLE config_model_configs ADD COLUMN version bigint NOT NULL DEFAULT 1;
ALTER TABLE config_workspace_templates ADD COLUMN version bigint NOT NULL DEFAULT 1;
ALTER TABLE config_system_prompt ADD COLUMN version bigint NOT NULL DEFAULT 1;
ALTER TABLE config_user_prompts ADD COLUMN version bigint NOT NULL DEFAULT 1;
