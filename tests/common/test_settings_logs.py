"""Settings parsing, JSON logs with request ids and redaction, Redis fixture, embedded Redis."""

from __future__ import annotations

import io
import json
import logging

import pytest
import redis.asyncio as aioredis

from services.common import logs
from services.common.db import create_pool, create_redis
from services.common.settings import Settings, SettingsError


def test_defaults() -> None:
    s = Settings.from_env({})
    # Keys default to `agentplane up`'s key directory under the data directory.
    assert s.keys.jwks_source == ".agentplane/keys/jwks.json"
    assert s.database_url is None and s.redis_url is None and s.data_dir == ".agentplane"
    assert [
        (s.service(n).port, s.service(n).metrics_port) for n in ("config", "inference", "toolexec", "chat")
    ] == [
        (50051, 9101),
        (50052, 9102),
        (50053, 9103),
        (50054, 9104),
    ]
    assert s.address("toolexec") == "127.0.0.1:50053"
    with pytest.raises(SettingsError, match="DATABASE_URL"):
        s.require_database_url()


def test_overrides_and_disabled_metrics() -> None:
    s = Settings.from_env(
        {
            "AGENTPLANE_CHAT_PORT": "6000",
            "AGENTPLANE_CHAT_METRICS_PORT": "0",
            "AGENTPLANE_CONFIG_METRICS_PORT": "-1",
            "AGENTPLANE_CONFIG_ADDR": "config.svc:50051",
            "AGENTPLANE_SHUTDOWN_GRACE_SECONDS": "2.5",
        }
    )
    assert s.service("chat").port == 6000 and s.service("chat").metrics_port is None
    assert s.service("config").metrics_port is None and s.address("config") == "config.svc:50051"
    assert s.address("chat") == "127.0.0.1:6000" and s.shutdown_grace_seconds == 2.5


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AGENTPLANE_CHAT_PORT", "http"),
        ("AGENTPLANE_INFERENCE_PORT", "70000"),
        ("AGENTPLANE_TOOLEXEC_METRICS_PORT", "x"),
        ("AGENTPLANE_SHUTDOWN_GRACE_SECONDS", "soon"),
        ("AGENTPLANE_LOG_LEVEL", "LOUD"),
        ("AGENTPLANE_MAX_TOKEN_LIFETIME_SECONDS", "5"),
        ("AGENTPLANE_CONFIG_ADDR", "nohostport"),
    ],
)
def test_invalid_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(SettingsError, match=name):
        Settings.from_env({name: value})


def test_json_logs_carry_request_id_extras_and_redact_secrets() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter("chat"))
    logger = logging.getLogger("agentplane.test.logs")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    logs.register_secret("sk-very-secret-key")
    try:
        with logs.request_id_scope("rid-9"):
            logger.info("calling with sk-very-secret-key", extra={"chat_id": "c1"})
        try:
            raise ValueError("boom sk-very-secret-key")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["msg"] == "calling with [REDACTED]" and first["request_id"] == "rid-9"
    assert (first["service"], first["level"], first["chat_id"]) == ("chat", "INFO", "c1")
    assert "ValueError: boom [REDACTED]" in second["exc"] and second["request_id"] is None
    assert "sk-very-secret-key" not in stream.getvalue()


async def test_redis_fixture_is_isolated_and_client_works(redis_url: str) -> None:
    client: aioredis.Redis = create_redis(redis_url, decode_responses=True)
    try:
        assert await client.dbsize() == 0
        await client.set("k", "v")
        assert await client.get("k") == "v"
    finally:
        await client.aclose()


async def test_pool_uses_dict_rows_and_statement_timeout(database_url: str) -> None:
    pool = await create_pool(database_url, statement_timeout_ms=1234)
    try:
        async with pool.connection() as conn:
            row = await (await conn.execute("SHOW statement_timeout")).fetchone()
            assert row == {"statement_timeout": "1234ms"}
    finally:
        await pool.close()
