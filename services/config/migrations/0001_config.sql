-- Config service: providers, model configs, prompts and workspace templates.

CREATE TABLE config_providers (
    id                  uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    -- Idempotency key of the CreateProvider call that made the row.
    request_id          text        UNIQUE,
    -- ProviderType enum name (PROVIDER_TYPE_OPENAI, ...); validated by the service so new types need no migration.
    type                text        NOT NULL,
    display_name        text        NOT NULL,
    base_url            text        NOT NULL DEFAULT '',
    -- AES-GCM ciphertext (nonce || ciphertext+tag) of the API key; never the plaintext.
    api_key_ciphertext  bytea,
    -- Id of the encryption key that sealed api_key_ciphertext, so keys can rotate.
    api_key_key_id      text,
    enabled             boolean     NOT NULL DEFAULT true,
    create_time         timestamptz NOT NULL DEFAULT now(),
    update_time         timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT config_providers_key_id_with_key CHECK ((api_key_ciphertext IS NULL) = (api_key_key_id IS NULL))
);

CREATE TABLE config_model_configs (
    id                           uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    request_id                   text        UNIQUE,
    -- RESTRICT: a provider cannot disappear under the models it serves.
    provider_id                  uuid        NOT NULL REFERENCES config_providers (id) ON DELETE RESTRICT,
    model_name                   text        NOT NULL,
    display_name                 text        NOT NULL,
    enabled                      boolean     NOT NULL DEFAULT true,
    is_default                   boolean     NOT NULL DEFAULT false,
    context_limit                bigint      NOT NULL CHECK (context_limit > 0),
    compaction_threshold_percent integer     NOT NULL CHECK (compaction_threshold_percent BETWEEN 0 AND 100),
    max_output_tokens            integer     NOT NULL DEFAULT 0 CHECK (max_output_tokens >= 0),
    -- ModelPricing as proto JSON; NULL means the model has no pricing.
    pricing                      jsonb,
    -- ModelOptions as proto JSON.
    options                      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    create_time                  timestamptz NOT NULL DEFAULT now(),
    update_time                  timestamptz NOT NULL DEFAULT now(),
    -- The default must be servable.
    CONSTRAINT config_model_configs_default_enabled CHECK (NOT is_default OR enabled)
);

-- At most one default model, enforced by the database whatever the application does.
CREATE UNIQUE INDEX config_model_configs_one_default ON config_model_configs ((true)) WHERE is_default;
CREATE INDEX config_model_configs_provider ON config_model_configs (provider_id);
CREATE INDEX config_model_configs_order ON config_model_configs (create_time, id);
CREATE INDEX config_providers_order ON config_providers (create_time, id);

CREATE TABLE config_workspace_templates (
    id           uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    request_id   text        UNIQUE,
    name         text        NOT NULL UNIQUE,
    description  text        NOT NULL,
    -- List of TemplateParameter as proto JSON.
    parameters   jsonb       NOT NULL DEFAULT '[]'::jsonb,
    -- TemplateSource as proto JSON.
    source       jsonb       NOT NULL,
    enabled      boolean     NOT NULL DEFAULT true,
    create_time  timestamptz NOT NULL DEFAULT now(),
    update_time  timestamptz NOT NULL DEFAULT now()
);

-- The deployment system prompt: zero rows means the built-in default applies.
CREATE TABLE config_system_prompt (
    singleton    boolean     PRIMARY KEY DEFAULT true CHECK (singleton),
    text         text        NOT NULL,
    update_time  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE config_user_prompts (
    user_id      text        PRIMARY KEY,
    text         text        NOT NULL,
    update_time  timestamptz NOT NULL DEFAULT now()
);
