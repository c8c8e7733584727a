"""An admin revokes a token by id: config refuses it at once, every other service within its
refresh interval; other tokens of the same user keep working."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import replace

import grpc
import jwt
import psycopg
from agentplane.config.v1 import config_service_pb2, token_service_pb2, token_service_pb2_grpc
from agentplane.toolexec.v1 import toolexec_service_pb2, toolexec_service_pb2_grpc
from google.protobuf import timestamp_pb2

from services.common.client import create_channel
from services.common.rpc_errors import error_info
from services.common.settings import Settings
from services.config.server import ConfigServer
from services.toolexec import server as toolexec_server
from services.toolexec.settings import ToolexecSettings
from tests.config.conftest import StubFactory
from tests.helpers import wait_until


def _jti(token: str) -> str:
    return str(jwt.decode(token, options={"verify_signature": False})["jti"])


async def _code(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as exc:
        info = error_info(exc)
        return exc.code(), info[0] if info else ""
    return grpc.StatusCode.OK, ""


async def test_revoked_token_is_refused_everywhere_and_only_it(
    config: ConfigServer,
    stub_for: StubFactory,
    make_token: Callable[..., str],
    settings: Settings,
    tmp_path: object,
) -> None:
    victim, other, admin = make_token("alice"), make_token("alice"), make_token("root", "admin")
    tokens_channel = create_channel(config.address, token=admin)
    # toolexec follows config's list (templates from config: it is wired to it).
    fast = replace(settings.with_service("config", address=config.address), revocation_refresh_seconds=0.1)
    workspaces = f"{tmp_path}/ws"
    toolexec = await toolexec_server.start(
        fast, toolexec_settings=ToolexecSettings(workspaces_dir=workspaces)
    )
    try:
        tx_victim = toolexec_service_pb2_grpc.ToolExecServiceStub(
            create_channel(toolexec.address, token=victim)
        )
        tx_other = toolexec_service_pb2_grpc.ToolExecServiceStub(
            create_channel(toolexec.address, token=other)
        )
        assert (await _code(tx_victim.ListWorkspaces(toolexec_service_pb2.ListWorkspacesRequest())))[0] == (
            grpc.StatusCode.OK
        )
        stub = token_service_pb2_grpc.TokenServiceStub(tokens_channel)
        resp = await stub.RevokeToken(
            token_service_pb2.RevokeTokenRequest(token_id=_jti(victim), reason="leaked")
        )
        assert resp.revoked_token.revoked_by == "root" and resp.revoked_token.reason == "leaked"
        # Config refuses it at once...
        code, reason = await _code(stub_for(victim).GetUserPrompt(config_service_pb2.GetUserPromptRequest()))
        assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
        # ...toolexec as soon as it has refreshed its copy.
        result = await wait_until(
            lambda: _code(tx_victim.ListWorkspaces(toolexec_service_pb2.ListWorkspacesRequest())),
            until=lambda result: result[0] != grpc.StatusCode.OK,
            what="toolexec to refuse the revoked token",
        )
        assert result == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_REVOKED")
        # The same user's other token is not affected.
        assert (await _code(tx_other.ListWorkspaces(toolexec_service_pb2.ListWorkspacesRequest())))[0] == (
            grpc.StatusCode.OK
        )
        again = await stub.RevokeToken(token_service_pb2.RevokeTokenRequest(token_id=_jti(victim)))
        assert again.revoked_token.revoke_time == resp.revoked_token.revoke_time  # idempotent
    finally:
        await tokens_channel.close()
        await toolexec.stop()


async def test_who_may_revoke_and_list_and_what_is_listed(
    config: ConfigServer, make_token: Callable[..., str], database_url: str
) -> None:
    channels: list[grpc.aio.Channel] = []

    def stub(token: str) -> token_service_pb2_grpc.TokenServiceStub:
        channels.append(create_channel(config.address, token=token))
        return token_service_pb2_grpc.TokenServiceStub(channels[-1])

    user, admin, service = (
        make_token("alice"),
        make_token("root", "admin"),
        make_token("service:chat", "service"),
    )
    assert await _code(stub(user).RevokeToken(token_service_pb2.RevokeTokenRequest(token_id="x"))) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "ADMIN_REQUIRED",
    )
    assert (await _code(stub(user).ListRevokedTokens(token_service_pb2.ListRevokedTokensRequest())))[0] == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert (await _code(stub(admin).RevokeToken(token_service_pb2.RevokeTokenRequest(token_id=" "))))[0] == (
        grpc.StatusCode.INVALID_ARGUMENT
    )
    past = timestamp_pb2.Timestamp()
    past.FromDatetime(dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    assert (
        await _code(
            stub(admin).RevokeToken(token_service_pb2.RevokeTokenRequest(token_id="t1", expire_time=past))
        )
    )[0] == grpc.StatusCode.INVALID_ARGUMENT
    for token_id in ("t1", "t2", "t3"):
        await stub(admin).RevokeToken(token_service_pb2.RevokeTokenRequest(token_id=token_id))
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        # A revocation of a token that has expired anyway is not listed any more.
        await conn.execute(
            "UPDATE token_revocations SET expire_time = now() - interval '1 s' WHERE token_id = 't2'"
        )
    first = await stub(service).ListRevokedTokens(token_service_pb2.ListRevokedTokensRequest(page_size=1))
    assert [r.token_id for r in first.revoked_tokens] == ["t1"] and first.next_page_token
    rest = await stub(service).ListRevokedTokens(
        token_service_pb2.ListRevokedTokensRequest(page_token=first.next_page_token)
    )
    assert [r.token_id for r in rest.revoked_tokens] == ["t3"] and not rest.next_page_token
    code, _ = await _code(
        stub(service).ListRevokedTokens(token_service_pb2.ListRevokedTokensRequest(page_token="%%%"))
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    for channel in channels:
        await channel.close()
