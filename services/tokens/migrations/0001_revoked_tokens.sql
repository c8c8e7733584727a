-- Revoked tokens, by id (the jti claim). A row is useless once the token has expired anyway.
CREATE TABLE token_revocations (
    token_id    text        PRIMARY KEY,
    expire_time timestamptz NOT NULL,
    revoke_time timestamptz NOT NULL DEFAULT now(),
    revoked_by  text        NOT NULL,
    reason      text        NOT NULL DEFAULT ''
);

CREATE INDEX token_revocations_expire ON token_revocations (expire_time);
