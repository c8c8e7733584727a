"""Least privilege in the config service (issue 11): a provider's key cannot be redirected to another
address, a disabled model's name is not revealed to users, and stored keys can be re-encrypted with a
new encryption key (RotateEncryptionKey) safely, all or nothing."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import grpc
import psycopg
from agentplane.chat.v1 import chat_pb2, chat_service_pb2, chat_service_pb2_grpc
from agentplane.config.v1 import config_pb2
from agentplane.config.v1 import config_service_pb2 as pb
from agentplane.config.v1.config_service_pb2_grpc import ConfigServiceStub
from prometheus_client import CollectorRegistry

from services.chat import server as chat_server
from services.chat.settings import ChatSettings
from services.common.client import create_channel
from services.common.settings import Settings
from services.config import server as config_server
from services.config.crypto import KeyRing
from services.config.server import ConfigServer
from tests.config.conftest import StubFactory
from tests.config.rpc import create_model, create_provider, expect_error, mask

KEY_1 = "k1:first-encryption-secret-0123456789"
KEY_2 = "k2:second-encryption-secret-0123456789"
KEY_OTHER = "k0:a-key-nobody-configured-0123456789"
SECRET_NAME = "project-nightingale-internal"
HI = [chat_pb2.ContentPart(text=chat_pb2.TextPart(text="hi"))]


async def _creds(stub_for: StubFactory, service_token: Callable[[str], str], provider_id: str) -> str:
    inference = stub_for(service_token("inference"))
    response = await inference.GetProviderCredentials(
        pb.GetProviderCredentialsRequest(provider_id=provider_id)
    )
    return response.api_key


async def _key_columns(database_url: str) -> dict[str, tuple[str | None, bytes | None]]:
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cur = await conn.execute("SELECT id, api_key_key_id, api_key_ciphertext FROM config_providers")
        return {
            str(pid): (key_id, bytes(ct) if ct is not None else None)
            for pid, key_id, ct in await cur.fetchall()
        }


# --- a key is never sent to a new base URL -------------------------------------------------------


async def test_changing_base_url_drops_the_stored_key(
    admin: ConfigServiceStub, stub_for: StubFactory, service_token: Callable[[str], str], database_url: str
) -> None:
    provider = await create_provider(admin, api_key="sk-victim-key", base_url="http://127.0.0.1:9/v1")
    updated = (
        await admin.UpdateProvider(
            pb.UpdateProviderRequest(
                provider=config_pb2.Provider(id=provider.id, base_url="https://attacker.example/v1"),
                update_mask=mask("base_url"),
            )
        )
    ).provider
    assert updated.base_url == "https://attacker.example/v1"
    assert not updated.api_key_set
    got = (await admin.GetProvider(pb.GetProviderRequest(provider_id=provider.id))).provider
    assert not got.api_key_set
    # What inference would send to the new address: nothing.
    assert await _creds(stub_for, service_token, provider.id) == ""
    assert (await _key_columns(database_url))[provider.id] == (None, None)


async def test_changing_base_url_with_a_new_key_in_the_same_request_stores_that_key(
    admin: ConfigServiceStub, stub_for: StubFactory, service_token: Callable[[str], str]
) -> None:
    provider = await create_provider(admin, api_key="sk-old-key")
    updated = (
        await admin.UpdateProvider(
            pb.UpdateProviderRequest(
                provider=config_pb2.Provider(id=provider.id, base_url="https://other.example/v1"),
                update_mask=mask("base_url", "api_key"),
                api_key="sk-new-key",
            )
        )
    ).provider
    assert updated.api_key_set and updated.base_url == "https://other.example/v1"
    assert await _creds(stub_for, service_token, provider.id) == "sk-new-key"


async def test_other_changes_and_an_unchanged_base_url_keep_the_key(
    admin: ConfigServiceStub, stub_for: StubFactory, service_token: Callable[[str], str]
) -> None:
    provider = await create_provider(admin, api_key="sk-kept", base_url="http://127.0.0.1:9/v1")
    for fields, value in [
        (("display_name",), config_pb2.Provider(id=provider.id, display_name="renamed")),
        (("enabled",), config_pb2.Provider(id=provider.id, enabled=True)),
        # The same URL (surrounding blanks are trimmed) is not a redirect.
        (("base_url",), config_pb2.Provider(id=provider.id, base_url=" http://127.0.0.1:9/v1 ")),
    ]:
        updated = (
            await admin.UpdateProvider(pb.UpdateProviderRequest(provider=value, update_mask=mask(*fields)))
        ).provider
        assert updated.api_key_set, fields
    assert await _creds(stub_for, service_token, provider.id) == "sk-kept"


# --- a disabled model's name is not revealed to users --------------------------------------------


async def test_resolve_does_not_reveal_a_disabled_models_name_to_users_or_services(
    admin: ConfigServiceStub,
    alice: ConfigServiceStub,
    stub_for: StubFactory,
    service_token: Callable[[str], str],
) -> None:
    provider = await create_provider(admin)
    default = await create_model(admin, provider.id, name="default")
    hidden = await create_model(admin, provider.id, name=SECRET_NAME, enabled=False)
    other_provider = await create_provider(admin, name="off", enabled=False)
    on_disabled_provider = await create_model(admin, other_provider.id, name=SECRET_NAME + "-2")
    missing = str(uuid.uuid4())
    chat = stub_for(service_token("chat"))
    reasons = []
    for caller in (alice, chat):
        for model_id in (hidden.id, on_disabled_provider.id, missing):
            resolved = await caller.ResolveModel(pb.ResolveModelRequest(model_config_id=model_id))
            assert resolved.fell_back_to_default and resolved.model_config.id == default.id
            assert SECRET_NAME not in str(resolved.fallback_reason)
            assert "disabled" not in resolved.fallback_reason  # does not even say it exists
            reasons.append(resolved.fallback_reason.replace(model_id, "ID"))
    assert len(set(reasons)) == 1, reasons  # a disabled model reads exactly like a missing one
    # Users get NOT_FOUND for the model itself, without its name.
    message, reason, metadata = await expect_error(
        alice.GetModelConfig(pb.GetModelConfigRequest(model_config_id=hidden.id)), grpc.StatusCode.NOT_FOUND
    )
    assert reason == "MODEL_CONFIG_NOT_FOUND" and SECRET_NAME not in message + str(metadata)
    # Admins still see which model it was and why.
    resolved = await admin.ResolveModel(pb.ResolveModelRequest(model_config_id=hidden.id))
    assert SECRET_NAME in resolved.fallback_reason and "disabled" in resolved.fallback_reason


async def test_create_chat_does_not_echo_a_disabled_models_name(
    config: ConfigServer,
    admin: ConfigServiceStub,
    settings: Settings,
    user_token: str,
) -> None:
    provider = await create_provider(admin)
    await create_model(admin, provider.id, name="default")
    hidden = await create_model(admin, provider.id, name=SECRET_NAME, enabled=False)
    chat = await chat_server.start(
        settings.with_service("config", address=config.address),
        ChatSettings(run_workers=False),
        registry=CollectorRegistry(),
    )
    channel = create_channel(chat.address, token=user_token)
    try:
        stub = chat_service_pb2_grpc.ChatServiceStub(channel)
        message, _, metadata = await expect_error(
            stub.CreateChat(chat_service_pb2.CreateChatRequest(content=HI, model_config_id=hidden.id)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
    finally:
        await channel.close()
        await chat.stop()
    assert metadata.get("field") == "model_config_id"
    assert SECRET_NAME not in message and "disabled" not in message, message


# --- rotating the encryption key -----------------------------------------------------------------


@asynccontextmanager
async def _config_with(settings: Settings, encryption_key: str) -> AsyncIterator[ConfigServer]:
    server = await config_server.start(
        settings.replace(encryption_key=encryption_key),
        channel=f"test:config:{uuid.uuid4().hex}",
        registry=CollectorRegistry(),
    )
    try:
        yield server
    finally:
        await server.stop()


async def test_rotate_encryption_key_reencrypts_every_stored_key(
    settings: Settings,
    database_url: str,
    admin_token: str,
    service_token: Callable[[str], str],
) -> None:
    def stubs(server: ConfigServer) -> tuple[ConfigServiceStub, ConfigServiceStub, list[grpc.aio.Channel]]:
        a = create_channel(server.address, token=admin_token)
        i = create_channel(server.address, token=service_token("inference"))
        return ConfigServiceStub(a), ConfigServiceStub(i), [a, i]

    async with _config_with(settings, KEY_1) as old:
        admin, _, channels = stubs(old)
        keyed = [(await create_provider(admin, api_key=f"sk-rotate-{i}", name=f"p{i}")).id for i in range(3)]
        keyless = (await create_provider(admin, api_key="", name="no key")).id
        for ch in channels:
            await ch.close()
    before = await _key_columns(database_url)
    assert {before[p][0] for p in keyed} == {"k1"} and before[keyless] == (None, None)

    # New key first, the old one still listed for decryption.
    async with _config_with(settings, f"{KEY_2},{KEY_1}") as both:
        admin, inference, channels = stubs(both)
        try:
            # Before the rotation the old rows still decrypt (the old key is listed).
            assert (
                await inference.GetProviderCredentials(pb.GetProviderCredentialsRequest(provider_id=keyed[0]))
            ).api_key == "sk-rotate-0"
            check = await admin.RotateEncryptionKey(pb.RotateEncryptionKeyRequest(validate_only=True))
            assert check.key_id == "k2" and sorted(check.reencrypted_provider_ids) == sorted(keyed)
            assert await _key_columns(database_url) == before  # validate_only wrote nothing
            done = await admin.RotateEncryptionKey(pb.RotateEncryptionKeyRequest())
            assert done.key_id == "k2" and sorted(done.reencrypted_provider_ids) == sorted(keyed)
            assert done.already_current_count == 0
            again = await admin.RotateEncryptionKey(pb.RotateEncryptionKeyRequest())
            assert list(again.reencrypted_provider_ids) == [] and again.already_current_count == 3
        finally:
            for ch in channels:
                await ch.close()
    after = await _key_columns(database_url)
    assert {after[p][0] for p in keyed} == {"k2"} and after[keyless] == (None, None)
    assert all(after[p][1] != before[p][1] for p in keyed)

    # The old key can now be dropped.
    async with _config_with(settings, KEY_2) as new:
        _, inference, channels = stubs(new)
        try:
            for i, pid in enumerate(keyed):
                creds = await inference.GetProviderCredentials(
                    pb.GetProviderCredentialsRequest(provider_id=pid)
                )
                assert creds.api_key == f"sk-rotate-{i}"
        finally:
            for ch in channels:
                await ch.close()


async def test_rotate_is_all_or_nothing_when_a_key_cannot_be_decrypted(
    settings: Settings, database_url: str, admin_token: str
) -> None:
    async with _config_with(settings, KEY_1) as server:
        channel = create_channel(server.address, token=admin_token)
        admin = ConfigServiceStub(channel)
        good = (await create_provider(admin, api_key="sk-good", name="good")).id
        bad = (await create_provider(admin, api_key="", name="bad")).id
        await channel.close()
    # A row sealed with a key this deployment does not have (e.g. one dropped too early).
    sealed = KeyRing.parse(KEY_OTHER).seal("sk-orphan", bad)
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        await conn.execute(
            "UPDATE config_providers SET api_key_ciphertext = %s, api_key_key_id = %s WHERE id = %s",
            (sealed.ciphertext, sealed.key_id, bad),
        )
        await conn.commit()
    before = await _key_columns(database_url)
    async with _config_with(settings, f"{KEY_2},{KEY_1}") as server:
        channel = create_channel(server.address, token=admin_token)
        try:
            message, reason, metadata = await expect_error(
                ConfigServiceStub(channel).RotateEncryptionKey(pb.RotateEncryptionKeyRequest()),
                grpc.StatusCode.FAILED_PRECONDITION,
            )
        finally:
            await channel.close()
    assert reason == "ENCRYPTION_KEY_UNKNOWN"
    assert metadata["provider_id"] == bad and metadata["key_id"] == "k0" and bad in message
    assert await _key_columns(database_url) == before  # nothing was re-encrypted, not even `good`
    assert before[good][0] == "k1"


async def test_rotate_encryption_key_is_for_admins_only(
    alice: ConfigServiceStub, stub_for: StubFactory, service_token: Callable[[str], str]
) -> None:
    for caller in (alice, stub_for(service_token("chat")), stub_for(service_token("inference"))):
        await expect_error(
            caller.RotateEncryptionKey(pb.RotateEncryptionKeyRequest()), grpc.StatusCode.PERMISSION_DENIED
        )
