"""Postgres access for the config service: one short transaction per operation, queries counted.

Every method opens its own connection from the pool and never makes a network call other
than to Postgres while a transaction is open. Rows come back as dicts (the pool uses
``dict_row``); `records` turns them into protos.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool

from services.common.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound
from services.config.crypto import SealedKey
from services.config.metrics import ConfigMetrics

Row = dict[str, Any]

# Serialises every change of the default model, so concurrent SetDefault calls queue up instead
# of tripping over the partial unique index (which still guards the invariant on its own).
DEFAULT_MODEL_LOCK = 0x636F_6E66_6967_6466  # "configdf"

_PROVIDER_COLUMNS = {"display_name", "base_url", "enabled", "api_key_ciphertext", "api_key_key_id"}
_MODEL_COLUMNS = {
    "provider_id",
    "model_name",
    "display_name",
    "enabled",
    "context_limit",
    "compaction_threshold_percent",
    "max_output_tokens",
    "pricing",
    "options",
}
_TEMPLATE_COLUMNS = {"name", "description", "parameters", "source", "enabled", "network_access", "pod"}


def _adapt(value: Any) -> Any:
    return Jsonb(value) if isinstance(value, dict | list) else value


class ConfigStore:
    """The config tables."""

    def __init__(self, pool: AsyncConnectionPool[Any], metrics: ConfigMetrics) -> None:
        self._pool = pool
        self._metrics = metrics

    async def _fetch(
        self, conn: psycopg.AsyncConnection[Any], op: str, query: Any, params: Sequence[Any] = ()
    ) -> list[Row]:
        self._metrics.db_queries.labels(op).inc()
        cur = await conn.execute(query, params)
        if cur.description is None:
            return []
        return list(await cur.fetchall())

    async def _one(self, op: str, query: Any, params: Sequence[Any] = ()) -> Row | None:
        async with self._pool.connection() as conn:
            rows = await self._fetch(conn, op, query, params)
        return rows[0] if rows else None

    # --- providers -------------------------------------------------------------------

    async def insert_provider(
        self,
        provider_id: str,
        request_id: str,
        type_name: str,
        display_name: str,
        base_url: str,
        sealed: SealedKey | None,
        enabled: bool,
    ) -> Row:
        """Insert a provider; a repeated `request_id` returns the row the first call made."""
        async with self._pool.connection() as conn:
            rows = await self._fetch(
                conn,
                "insert_provider",
                "INSERT INTO config_providers (id, request_id, type, display_name, base_url, "
                "api_key_ciphertext, api_key_key_id, enabled) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (request_id) DO NOTHING RETURNING *",
                (
                    provider_id,
                    request_id or None,
                    type_name,
                    display_name,
                    base_url,
                    sealed.ciphertext if sealed else None,
                    sealed.key_id if sealed else None,
                    enabled,
                ),
            )
            if not rows:
                rows = await self._fetch(
                    conn,
                    "get_provider",
                    "SELECT * FROM config_providers WHERE request_id = %s",
                    (request_id,),
                )
        return rows[0]

    async def get_provider(self, provider_id: str) -> Row | None:
        """The provider row, or None."""
        return await self._one("get_provider", "SELECT * FROM config_providers WHERE id = %s", (provider_id,))

    async def list_providers(self, after: list[Any] | None, limit: int) -> list[Row]:
        """Providers oldest first, after the (create_time, id) position."""
        async with self._pool.connection() as conn:
            if after is None:
                return await self._fetch(
                    conn,
                    "list_providers",
                    "SELECT * FROM config_providers ORDER BY create_time, id LIMIT %s",
                    (limit,),
                )
            return await self._fetch(
                conn,
                "list_providers",
                "SELECT * FROM config_providers WHERE (create_time, id) > (%s::timestamptz, %s::uuid) "
                "ORDER BY create_time, id LIMIT %s",
                (after[0], after[1], limit),
            )

    async def update_provider(self, provider_id: str, changes: dict[str, Any], etag: str = "") -> Row:
        """Apply `changes` (column -> value); refuses to disable the default model's provider.

        A new ``base_url`` without a new key (``api_key_ciphertext`` in `changes`) also clears the
        stored key, decided under the row lock: a key is never sent to an address it was not set for.
        With `etag`, nothing changes unless it is the provider's current one (`Aborted`).
        """
        assert changes and set(changes) <= _PROVIDER_COLUMNS, changes
        changes = dict(changes)
        async with self._pool.connection() as conn, conn.transaction():
            if "base_url" in changes and "api_key_ciphertext" not in changes:
                current = await self._fetch(
                    conn,
                    "lock_provider",
                    "SELECT base_url FROM config_providers WHERE id = %s FOR UPDATE",
                    (provider_id,),
                )
                if current and current[0]["base_url"] != changes["base_url"]:
                    changes["api_key_ciphertext"] = None
                    changes["api_key_key_id"] = None
            if changes.get("enabled") is False:
                await self._fetch(
                    conn, "lock_default", "SELECT pg_advisory_xact_lock(%s)", (DEFAULT_MODEL_LOCK,)
                )
                serving = await self._fetch(
                    conn,
                    "check_default",
                    "SELECT id, display_name FROM config_model_configs WHERE provider_id = %s AND is_default",
                    (provider_id,),
                )
                if serving:
                    raise FailedPrecondition(
                        f"provider {provider_id} serves the default model {serving[0]['display_name']} "
                        f"({serving[0]['id']}); make another model the default before disabling it",
                        reason="PROVIDER_SERVES_DEFAULT_MODEL",
                        metadata={"provider_id": provider_id, "model_config_id": str(serving[0]["id"])},
                    )
            rows = await self._fetch(
                conn, "update_provider", *_update("config_providers", provider_id, changes, etag)
            )
            if not rows:
                await self._stale_or_missing(conn, "config_providers", provider_id, etag)
                raise provider_not_found(provider_id)
        return rows[0]

    async def delete_provider(self, provider_id: str, etag: str = "") -> bool:
        """Delete a provider; FailedPrecondition naming the model configs that still use it.

        Idempotent: False when there is no such provider. With `etag`, a provider whose current
        etag differs is kept (`Aborted`).
        """
        async with self._pool.connection() as conn:
            try:
                async with conn.transaction():
                    rows = await self._fetch(
                        conn,
                        "delete_provider",
                        "DELETE FROM config_providers WHERE id = %s AND (%s = '' OR version::text = %s)"
                        " RETURNING id",
                        (provider_id, etag, etag),
                    )
            except (psycopg.errors.ForeignKeyViolation, psycopg.errors.RestrictViolation):
                users = await self._fetch(
                    conn,
                    "provider_users",
                    "SELECT id, display_name FROM config_model_configs WHERE provider_id = %s "
                    "ORDER BY create_time, id",
                    (provider_id,),
                )
                names = ", ".join(f"{u['display_name']} ({u['id']})" for u in users)
                raise FailedPrecondition(
                    f"provider {provider_id} is still used by {len(users)} model config(s): {names}; "
                    "delete them or move them to another provider first",
                    reason="PROVIDER_IN_USE",
                    metadata={
                        "provider_id": provider_id,
                        "model_config_ids": ",".join(str(u["id"]) for u in users),
                    },
                ) from None
            if not rows:
                await self._stale_or_missing(conn, "config_providers", provider_id, etag)
        return bool(rows)

    async def reseal_provider_keys(
        self, reseal: Callable[[str, SealedKey], SealedKey | None], *, write: bool
    ) -> tuple[list[str], int]:
        """Re-encrypt every stored API key in one transaction: ``reseal(provider_id, sealed)`` returns
        the new sealed value or None when the row is current; an exception from it (a key that does
        not decrypt) rolls everything back. Rows are locked, so concurrent key changes wait.
        Returns (ids of the re-encrypted providers, number already current); `write` False changes nothing.
        """
        changed: list[str] = []
        current = 0
        async with self._pool.connection() as conn, conn.transaction():
            rows = await self._fetch(
                conn,
                "lock_provider_keys",
                "SELECT id, api_key_key_id, api_key_ciphertext FROM config_providers "
                "WHERE api_key_ciphertext IS NOT NULL ORDER BY id FOR UPDATE",
            )
            for row in rows:
                provider_id = str(row["id"])
                sealed = reseal(
                    provider_id, SealedKey(row["api_key_key_id"], bytes(row["api_key_ciphertext"]))
                )
                if sealed is None:
                    current += 1
                    continue
                changed.append(provider_id)
                if write:
                    await self._fetch(
                        conn,
                        "reseal_provider_key",
                        "UPDATE config_providers SET api_key_ciphertext = %s, api_key_key_id = %s "
                        "WHERE id = %s",
                        (sealed.ciphertext, sealed.key_id, provider_id),
                    )
        return changed, current

    # --- model configs ---------------------------------------------------------------

    async def insert_model(
        self, request_id: str, values: dict[str, Any], make_default: bool
    ) -> tuple[Row, bool]:
        """Insert a model config; returns (row, created). It becomes the default when asked, or when
        no default exists yet and it is enabled. A repeated `request_id` returns the first row."""
        assert set(values) <= _MODEL_COLUMNS
        async with self._pool.connection() as conn, conn.transaction():
            if request_id:
                existing = await self._fetch(
                    conn,
                    "get_model",
                    "SELECT * FROM config_model_configs WHERE request_id = %s",
                    (request_id,),
                )
                if existing:
                    return existing[0], False
            await self._fetch(conn, "lock_default", "SELECT pg_advisory_xact_lock(%s)", (DEFAULT_MODEL_LOCK,))
            has_default = await self._fetch(
                conn, "check_default", "SELECT id FROM config_model_configs WHERE is_default"
            )
            is_default = make_default or (not has_default and bool(values.get("enabled")))
            if is_default and has_default:
                await self._fetch(
                    conn,
                    "clear_default",
                    "UPDATE config_model_configs SET is_default = false WHERE is_default",
                )
            columns = ["id", "request_id", "is_default", *values]
            params = [
                str(uuid.uuid4()),
                request_id or None,
                is_default,
                *(_adapt(v) for v in values.values()),
            ]
            query = sql.SQL("INSERT INTO config_model_configs ({}) VALUES ({}) RETURNING *").format(
                sql.SQL(", ").join(sql.Identifier(c) for c in columns),
                sql.SQL(", ").join(sql.Placeholder() * len(columns)),
            )
            try:
                rows = await self._fetch(conn, "insert_model", query, params)
            except psycopg.errors.UniqueViolation:
                # Only a concurrent create with the same request id can get here (the lock orders defaults).
                raise AlreadyExists(
                    f"a model config with request_id {request_id!r} is being created concurrently; retry",
                    reason="REQUEST_IN_PROGRESS",
                ) from None
        return rows[0], True

    async def get_model(self, model_id: str) -> Row | None:
        """The model config row, or None."""
        return await self._one("get_model", "SELECT * FROM config_model_configs WHERE id = %s", (model_id,))

    async def get_default_model(self) -> Row | None:
        """The default model config row, or None when there is none."""
        return await self._one("get_default_model", "SELECT * FROM config_model_configs WHERE is_default")

    async def list_models(
        self, after: list[Any] | None, limit: int, *, provider_id: str, include_disabled: bool
    ) -> list[Row]:
        """Model configs oldest first, optionally of one provider and without disabled ones."""
        where = [sql.SQL("true")]
        params: list[Any] = []
        if provider_id:
            where.append(sql.SQL("provider_id = %s"))
            params.append(provider_id)
        if not include_disabled:
            where.append(sql.SQL("enabled"))
        if after is not None:
            where.append(sql.SQL("(create_time, id) > (%s::timestamptz, %s::uuid)"))
            params += [after[0], after[1]]
        query = sql.SQL(
            "SELECT * FROM config_model_configs WHERE {} ORDER BY create_time, id LIMIT %s"
        ).format(sql.SQL(" AND ").join(where))
        async with self._pool.connection() as conn:
            return await self._fetch(conn, "list_models", query, [*params, limit])

    async def update_model(self, model_id: str, changes: dict[str, Any], etag: str = "") -> Row:
        """Apply `changes`; refuses to disable the default model. With `etag`, nothing changes
        unless it is the model config's current one (`Aborted`)."""
        assert changes and set(changes) <= _MODEL_COLUMNS, changes
        async with self._pool.connection() as conn, conn.transaction():
            if changes.get("enabled") is False:
                await self._fetch(
                    conn, "lock_default", "SELECT pg_advisory_xact_lock(%s)", (DEFAULT_MODEL_LOCK,)
                )
                current = await self._fetch(
                    conn,
                    "get_model",
                    "SELECT is_default FROM config_model_configs WHERE id = %s",
                    (model_id,),
                )
                if current and current[0]["is_default"]:
                    raise FailedPrecondition(
                        f"model config {model_id} is the default; make another model the default before "
                        "disabling it",
                        reason="MODEL_IS_DEFAULT",
                        metadata={"model_config_id": model_id},
                    )
            rows = await self._fetch(
                conn, "update_model", *_update("config_model_configs", model_id, changes, etag)
            )
            if not rows:
                await self._stale_or_missing(conn, "config_model_configs", model_id, etag)
                raise model_not_found(model_id)
        return rows[0]

    async def delete_model(self, model_id: str, etag: str = "") -> bool:
        """Delete a model config; the default cannot be deleted.

        Idempotent: False when there is no such model config. With `etag`, one whose current etag
        differs is kept (`Aborted`).
        """
        async with self._pool.connection() as conn, conn.transaction():
            await self._fetch(conn, "lock_default", "SELECT pg_advisory_xact_lock(%s)", (DEFAULT_MODEL_LOCK,))
            rows = await self._fetch(
                conn,
                "get_model",
                "SELECT is_default, version FROM config_model_configs WHERE id = %s FOR UPDATE",
                (model_id,),
            )
            if not rows:
                return False
            if etag and str(rows[0]["version"]) != etag:
                raise etag_mismatch("config_model_configs", model_id, etag, str(rows[0]["version"]))
            if rows[0]["is_default"]:
                raise FailedPrecondition(
                    f"model config {model_id} is the default; make another model the default "
                    "before deleting it",
                    reason="MODEL_IS_DEFAULT",
                    metadata={"model_config_id": model_id},
                )
            await self._fetch(
                conn, "delete_model", "DELETE FROM config_model_configs WHERE id = %s", (model_id,)
            )
        return True

    async def set_default_model(self, model_id: str) -> tuple[Row, str | None]:
        """Make `model_id` the only default, atomically; returns (new default row, previous default id)."""
        async with self._pool.connection() as conn, conn.transaction():
            await self._fetch(conn, "lock_default", "SELECT pg_advisory_xact_lock(%s)", (DEFAULT_MODEL_LOCK,))
            target = await self._fetch(
                conn,
                "get_model",
                "SELECT m.enabled, p.enabled AS provider_enabled FROM config_model_configs m "
                "JOIN config_providers p ON p.id = m.provider_id WHERE m.id = %s",
                (model_id,),
            )
            if not target:
                raise model_not_found(model_id)
            if not target[0]["enabled"] or not target[0]["provider_enabled"]:
                what = "model config" if not target[0]["enabled"] else "provider of model config"
                raise FailedPrecondition(
                    f"the {what} {model_id} is disabled; enable it before making it the default",
                    reason="MODEL_DISABLED",
                    metadata={"model_config_id": model_id},
                )
            previous = await self._fetch(
                conn,
                "clear_default",
                "UPDATE config_model_configs SET is_default = false, update_time = now(), "
                "version = version + 1 WHERE is_default AND id <> %s RETURNING id",
                (model_id,),
            )
            rows = await self._fetch(
                conn,
                "set_default",
                "UPDATE config_model_configs SET is_default = true, "
                "update_time = CASE WHEN is_default THEN update_time ELSE now() END, "
                "version = version + CASE WHEN is_default THEN 0 ELSE 1 END "
                "WHERE id = %s RETURNING *",
                (model_id,),
            )
        return rows[0], (str(previous[0]["id"]) if previous else None)

    # --- workspace templates ---------------------------------------------------------

    async def insert_template(self, request_id: str, values: dict[str, Any]) -> Row:
        """Insert a template; AlreadyExists for a taken name; a repeated `request_id` returns the first."""
        assert set(values) <= _TEMPLATE_COLUMNS
        async with self._pool.connection() as conn:
            if request_id:
                existing = await self._fetch(
                    conn,
                    "get_template",
                    "SELECT * FROM config_workspace_templates WHERE request_id = %s",
                    (request_id,),
                )
                if existing:
                    return existing[0]
            columns = ["id", "request_id", *values]
            params = [str(uuid.uuid4()), request_id or None, *(_adapt(v) for v in values.values())]
            query = sql.SQL("INSERT INTO config_workspace_templates ({}) VALUES ({}) RETURNING *").format(
                sql.SQL(", ").join(sql.Identifier(c) for c in columns),
                sql.SQL(", ").join(sql.Placeholder() * len(columns)),
            )
            try:
                rows = await self._fetch(conn, "insert_template", query, params)
            except psycopg.errors.UniqueViolation:
                raise _template_name_taken(str(values.get("name"))) from None
        return rows[0]

    async def get_template(self, *, template_id: str | None = None, name: str | None = None) -> Row | None:
        """The template with `template_id` or `name`, or None."""
        if template_id is not None:
            return await self._one(
                "get_template", "SELECT * FROM config_workspace_templates WHERE id = %s", (template_id,)
            )
        return await self._one(
            "get_template", "SELECT * FROM config_workspace_templates WHERE name = %s", (name,)
        )

    async def list_templates(
        self, after: list[Any] | None, limit: int, *, include_disabled: bool
    ) -> list[Row]:
        """Templates by name, after the name position."""
        where = [sql.SQL("true")]
        params: list[Any] = []
        if not include_disabled:
            where.append(sql.SQL("enabled"))
        if after is not None:
            where.append(sql.SQL("name > %s"))
            params.append(after[0])
        query = sql.SQL("SELECT * FROM config_workspace_templates WHERE {} ORDER BY name LIMIT %s").format(
            sql.SQL(" AND ").join(where)
        )
        async with self._pool.connection() as conn:
            return await self._fetch(conn, "list_templates", query, [*params, limit])

    async def update_template(self, template_id: str, changes: dict[str, Any], etag: str = "") -> Row:
        """Apply `changes`; AlreadyExists when renamed onto a taken name. With `etag`, nothing
        changes unless it is the template's current one (`Aborted`)."""
        assert changes and set(changes) <= _TEMPLATE_COLUMNS, changes
        async with self._pool.connection() as conn:
            try:
                rows = await self._fetch(
                    conn,
                    "update_template",
                    *_update("config_workspace_templates", template_id, changes, etag),
                )
            except psycopg.errors.UniqueViolation:
                raise _template_name_taken(str(changes.get("name"))) from None
            if not rows:
                await self._stale_or_missing(conn, "config_workspace_templates", template_id, etag)
                raise _template_not_found(template_id)
        return rows[0]

    async def delete_template(self, template_id: str, etag: str = "") -> Row | None:
        """Delete a template; returns the deleted row, None when there was none (idempotent). With
        `etag`, a template whose current etag differs is kept (`Aborted`)."""
        async with self._pool.connection() as conn:
            rows = await self._fetch(
                conn,
                "delete_template",
                "DELETE FROM config_workspace_templates WHERE id = %s AND (%s = '' OR version::text = %s)"
                " RETURNING *",
                (template_id, etag, etag),
            )
            if not rows:
                await self._stale_or_missing(conn, "config_workspace_templates", template_id, etag)
        return rows[0] if rows else None

    # --- prompts ---------------------------------------------------------------------

    # A prompt's row stays once written ('' = unset: the built-in default, or no user prompt), so
    # its version, the etag, only grows. No row yet is version 0.

    async def get_system_prompt(self) -> Row | None:
        """The system prompt row (text '' = the default applies), or None when it was never set."""
        return await self._one(
            "get_system_prompt", "SELECT text, update_time, version FROM config_system_prompt"
        )

    async def set_system_prompt(self, text: str, etag: str = "") -> Row:
        """Store the system prompt ('' restores the default); with `etag`, only over that version."""
        return await self._set_prompt(
            "set_system_prompt",
            "config_system_prompt",
            sql.SQL("singleton"),
            [True],
            text,
            etag,
            "the system prompt",
        )

    async def get_user_prompt(self, user_id: str) -> Row | None:
        """The user's prompt row (text '' = cleared), or None when it was never set."""
        return await self._one(
            "get_user_prompt",
            "SELECT user_id, text, update_time, version FROM config_user_prompts WHERE user_id = %s",
            (user_id,),
        )

    async def set_user_prompt(self, user_id: str, text: str, etag: str = "") -> Row:
        """Store the user's prompt ('' clears it); with `etag`, only over that version."""
        return await self._set_prompt(
            "set_user_prompt",
            "config_user_prompts",
            sql.SQL("user_id"),
            [user_id],
            text,
            etag,
            f"the prompt of user {user_id}",
        )

    async def _set_prompt(
        self, op: str, table: str, key: sql.SQL, key_values: list[Any], text: str, etag: str, what: str
    ) -> Row:
        """Upsert a prompt row, bumping its version; `Aborted` when `etag` is not the current version.

        The version is read under a row lock first; a row created concurrently after that read
        (the first write of a prompt) makes the upsert's guarded update match nothing, which is a
        mismatch too.
        """
        where = sql.SQL("{key} = %s").format(key=key)
        async with self._pool.connection() as conn, conn.transaction():
            if etag:
                current = await self._fetch(
                    conn,
                    op,
                    sql.SQL("SELECT version FROM {t} WHERE {w} FOR UPDATE").format(
                        t=sql.Identifier(table), w=where
                    ),
                    key_values,
                )
                version = str(current[0]["version"]) if current else "0"
                if version != etag:
                    raise _etag_mismatch(what, {}, etag, version)
            guard = (
                sql.SQL(" WHERE {t}.version::text = %s").format(t=sql.Identifier(table))
                if etag
                else sql.SQL("")
            )
            query = sql.SQL(
                "INSERT INTO {t} ({key}, text) VALUES (%s, %s) ON CONFLICT ({key}) DO UPDATE SET"
                " text = EXCLUDED.text, update_time = now(), version = {t}.version + 1{guard} RETURNING *"
            ).format(t=sql.Identifier(table), key=key, guard=guard)
            rows = await self._fetch(conn, op, query, [*key_values, text, *([etag] if etag else [])])
            if not rows:
                raise _etag_mismatch(what, {}, etag, "")
        return rows[0]

    async def _stale_or_missing(
        self, conn: psycopg.AsyncConnection[Any], table: str, row_id: str, etag: str
    ) -> None:
        """After a guarded write matched no row: `Aborted` when the row exists (so `etag` is stale);
        returns when it does not (the caller decides what missing means)."""
        if not etag:
            return
        rows = await self._fetch(
            conn,
            "check_version",
            sql.SQL("SELECT version FROM {} WHERE id = %s").format(sql.Identifier(table)),
            (row_id,),
        )
        if rows:
            raise etag_mismatch(table, row_id, etag, str(rows[0]["version"]))


def _update(
    table: str, row_id: str, changes: dict[str, Any], etag: str = ""
) -> tuple[sql.Composed, list[Any]]:
    """The UPDATE of `changes` to one row, bumping its version; with `etag`, only at that version."""
    assignments = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(column)) for column in changes)
    guard = sql.SQL(" AND version::text = %s") if etag else sql.SQL("")
    query = sql.SQL(
        "UPDATE {} SET {}, update_time = now(), version = version + 1 WHERE id = %s{} RETURNING *"
    ).format(sql.Identifier(table), assignments, guard)
    return query, [*(_adapt(v) for v in changes.values()), row_id, *([etag] if etag else [])]


# What each table's rows are called in messages, and the metadata key of their id.
_KINDS = {
    "config_providers": ("provider", "provider_id"),
    "config_model_configs": ("model config", "model_config_id"),
    "config_workspace_templates": ("workspace template", "workspace_template_id"),
}


def etag_mismatch(table: str, row_id: str, given: str, current: str) -> Aborted:
    """The error for an update or delete whose etag is not the row's current one."""
    kind, id_field = _KINDS[table]
    return _etag_mismatch(f"{kind} {row_id}", {id_field: row_id}, given, current)


def _etag_mismatch(what: str, metadata: dict[str, str], given: str, current: str) -> Aborted:
    return Aborted(
        f"{what} was changed since it was read (etag {given!r} is not the current one); nothing was "
        "changed: read it again, re-apply your change and send the etag it has now",
        reason="ETAG_MISMATCH",
        metadata={**metadata, "etag": current} if current else metadata,
    )


def provider_not_found(provider_id: str) -> NotFound:
    """The NotFound for a missing provider (shared with the service layer)."""
    return NotFound(
        f"provider {provider_id} not found",
        reason="PROVIDER_NOT_FOUND",
        metadata={"provider_id": provider_id},
    )


def model_not_found(model_id: str) -> NotFound:
    """The NotFound for a missing model config (shared with the service layer)."""
    return NotFound(
        f"model config {model_id} not found",
        reason="MODEL_CONFIG_NOT_FOUND",
        metadata={"model_config_id": model_id},
    )


def _template_not_found(template_id: str) -> NotFound:
    return NotFound(
        f"workspace template {template_id} not found",
        reason="WORKSPACE_TEMPLATE_NOT_FOUND",
        metadata={"workspace_template_id": template_id},
    )


def _template_name_taken(name: str) -> AlreadyExists:
    return AlreadyExists(
        f"a workspace template named {name!r} already exists; choose another name",
        reason="WORKSPACE_TEMPLATE_NAME_TAKEN",
        metadata={"name": name},
    )
