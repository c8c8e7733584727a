"""A canary API key never appears in any response (other than GetProviderCredentials to the
inference service), any log line, or any plaintext database column."""

from __future__ import annotations

import logging
from collections.abc import Callable

import grpc
import psycopg
import pytest
from agentplane.config.v1 import config_pb2
from agentplane.config.v1 import config_service_pb2 as pb
from agentplane.config.v1.config_service_pb2_grpc import ConfigServiceStub

from tests.config.conftest import StubFactory
from tests.config.rpc import create_model, create_provider, mask

CANARY = "sk-canary-7f3a9c1e5b2d4f60"
CANARY_2 = "sk-canary-rotated-0a1b2c3d"


class _RawCapture(logging.Handler):
    """Keeps every formatted record unscrubbed, so the test does not rely on log redaction."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage() + " " + repr(record.__dict__)
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        self.lines.append(text)


async def test_canary_key_never_leaks(
    admin: ConfigServiceStub,
    alice: ConfigServiceStub,
    stub_for: StubFactory,
    service_token: Callable[[str], str],
    database_url: str,
) -> None:
    capture = _RawCapture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    responses: list[bytes] = []
    try:
        chat = stub_for(service_token("chat"))
        provider = await create_provider(admin, api_key=CANARY, provider_type=config_pb2.PROVIDER_TYPE_OPENAI)
        model = await create_model(admin, provider.id)
        responses.append(provider.SerializeToString())
        responses.append(model.SerializeToString())
        for stub in (admin, chat):
            responses.append(
                (await stub.GetProvider(pb.GetProviderRequest(provider_id=provider.id))).SerializeToString()
            )
            responses.append((await stub.ListProviders(pb.ListProvidersRequest())).SerializeToString())
        for stub in (admin, alice, chat):
            responses.append((await stub.ResolveModel(pb.ResolveModelRequest())).SerializeToString())
            responses.append((await stub.ListModelConfigs(pb.ListModelConfigsRequest())).SerializeToString())
        # Error paths: a refused credentials call, and a bad update that carries a key.
        for stub in (admin, alice, chat):
            with pytest.raises(grpc.aio.AioRpcError) as denied:
                await stub.GetProviderCredentials(pb.GetProviderCredentialsRequest(provider_id=provider.id))
            responses.append((denied.value.details() or "").encode())
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await admin.UpdateProvider(
                pb.UpdateProviderRequest(
                    provider=config_pb2.Provider(id=provider.id),
                    update_mask=mask("api_key"),
                    api_key=CANARY + " x",
                )
            )
        responses.append((bad.value.details() or "").encode())
        for _key, value in bad.value.trailing_metadata() or ():
            responses.append(value if isinstance(value, bytes) else value.encode())
        updated = await admin.UpdateProvider(
            pb.UpdateProviderRequest(
                provider=config_pb2.Provider(id=provider.id), update_mask=mask("api_key"), api_key=CANARY_2
            )
        )
        responses.append(updated.SerializeToString())
        # The one sanctioned path: the inference service reads the decrypted key.
        inference = stub_for(service_token("inference"))
        creds = await inference.GetProviderCredentials(
            pb.GetProviderCredentialsRequest(provider_id=provider.id)
        )
        assert creds.api_key == CANARY_2
    finally:
        root.removeHandler(capture)
        root.setLevel(old_level)

    assert capture.lines, "expected the service to log something at DEBUG"
    for secret in (CANARY, CANARY_2):
        for blob in responses:
            assert secret.encode() not in blob
        for line in capture.lines:
            assert secret not in line
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_name LIKE 'config_%%'"
        )
        tables = [row[0] for row in await cur.fetchall()]
        assert "config_providers" in tables
        for table in tables:
            cur = await conn.execute(f"SELECT t::text FROM {table} t")  # type: ignore[arg-type]
            for (text,) in await cur.fetchall():
                assert CANARY not in text and CANARY_2 not in text
        cur = await conn.execute("SELECT api_key_ciphertext, api_key_key_id FROM config_providers")
        ciphertext, key_id = (await cur.fetchone()) or (b"", "")
        assert key_id and ciphertext and CANARY_2.encode() not in bytes(ciphertext)
