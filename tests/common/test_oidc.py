"""Users from an external OpenID Connect provider: a real local discovery/JWKS server, keys the
test generates, and a real config server that accepts the provider's tokens with the configured
claims and refuses the rest saying why."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import jwt
import pytest
from agentplane.config.v1 import config_service_pb2, config_service_pb2_grpc
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

from services.common import oidc
from services.common.client import create_channel
from services.common.embedded import free_port
from services.common.rpc_errors import error_info
from services.config import server as config_server
from tests.helpers import make_test_settings

AUDIENCE = "agentplane"
ADMINS = "platform-admins"


@dataclass
class Provider:
    """A local identity provider: discovery, a JWKS, and the private keys to sign with."""

    issuer: str
    keys: dict[str, Any] = field(default_factory=dict)

    def add_key(self, kid: str) -> None:
        self.keys[kid] = ec.generate_private_key(ec.SECP256R1())

    def jwks(self) -> dict[str, Any]:
        out = []
        for kid, key in self.keys.items():
            jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
            out.append({**jwk, "kid": kid, "use": "sig", "alg": "ES256"})
        return {"keys": out}

    def token(self, kid: str = "k1", ttl: float = 3600, **claims: Any) -> str:
        now = int(time.time())
        body = {
            "iss": self.issuer,
            "aud": AUDIENCE,
            "sub": "dana",
            "iat": now,
            "exp": now + int(ttl),
            **claims,
        }
        key = self.keys[kid] if kid in self.keys else ec.generate_private_key(ec.SECP256R1())
        return jwt.encode(body, key, algorithm="ES256", headers={"kid": kid})


@pytest.fixture
async def provider() -> AsyncIterator[Provider]:
    port = free_port()
    prov = Provider(f"http://127.0.0.1:{port}")
    prov.add_key("k1")

    async def discovery(request: web.Request) -> web.Response:
        return web.json_response({"issuer": prov.issuer, "jwks_uri": f"{prov.issuer}/jwks"})

    async def jwks(request: web.Request) -> web.Response:
        return web.json_response(prov.jwks())

    app = web.Application()
    app.router.add_get("/.well-known/openid-configuration", discovery)
    app.router.add_get("/jwks", jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield prov
    await runner.cleanup()


async def _call(address: str, token: str, rpc: Callable[[Any], Any]) -> tuple[grpc.StatusCode, str, Any]:
    async with create_channel(address, token=token) as channel:
        try:
            return grpc.StatusCode.OK, "", await rpc(config_service_pb2_grpc.ConfigServiceStub(channel))
        except grpc.aio.AioRpcError as exc:
            info = error_info(exc)
            return exc.code(), info[0] if info else "", exc.details()


async def test_tokens_of_the_identity_provider(
    provider: Provider,
    database_url: str,
    redis_url: str,
    make_token: Callable[..., str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = make_test_settings(
        database_url=database_url,
        redis_url=redis_url,
        extra_env={
            "AGENTPLANE_OIDC_ISSUER": provider.issuer,
            "AGENTPLANE_OIDC_AUDIENCE": AUDIENCE,
            "AGENTPLANE_OIDC_ADMIN_VALUE": ADMINS,
        },
    )
    server = await config_server.start(settings, registry=CollectorRegistry())
    try:
        prompt = lambda stub: stub.GetUserPrompt(config_service_pb2.GetUserPromptRequest())  # noqa: E731
        providers = lambda stub: stub.ListProviders(config_service_pb2.ListProvidersRequest())  # noqa: E731
        # The provider's user, with the user claim as the user id.
        code, _, resp = await _call(server.address, provider.token(), prompt)
        assert code == grpc.StatusCode.OK and resp.user_prompt.user_id == "dana"
        # The admin claim makes an admin; without it, admin RPCs are refused.
        assert (await _call(server.address, provider.token(groups=[ADMINS]), providers))[
            0
        ] == grpc.StatusCode.OK
        code, reason, _ = await _call(server.address, provider.token(groups=["devs"]), providers)
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "ADMIN_REQUIRED")
        # Refusals say which.
        refused = {
            "TOKEN_WRONG_AUDIENCE": provider.token(aud="someone-else"),
            "TOKEN_EXPIRED": provider.token(ttl=-60),
            "TOKEN_LIFETIME_TOO_LONG": provider.token(ttl=365 * 86400),
            "TOKEN_INVALID": provider.token(kid="not-published"),
        }
        for reason, token in refused.items():
            code, got, details = await _call(server.address, token, prompt)
            assert (code, got) == (grpc.StatusCode.UNAUTHENTICATED, reason), details
        code, got, _ = await _call(server.address, provider.token(sub="service:inference"), prompt)
        assert (code, got) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")
        # Algorithm confusion: the provider's kid, an HMAC signature (over the public key, say).
        claims = jwt.decode(provider.token(), options={"verify_signature": False})
        confused = jwt.encode(claims, "x" * 32, algorithm="HS256", headers={"kid": "k1"})
        code, got, _ = await _call(server.address, confused, prompt)
        assert (code, got) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID")
        # A token from another issuer is not the provider's, and not the deployment's either.
        other = Provider("http://127.0.0.1:1")
        other.add_key("k1")
        code, got, _ = await _call(server.address, other.token(), prompt)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        # The deployment's own tokens keep working beside the provider's.
        code, _, resp = await _call(server.address, make_token("erin"), prompt)
        assert code == grpc.StatusCode.OK and resp.user_prompt.user_id == "erin"
        # Key rotation: a new key published by the provider is fetched when a token names it.
        monkeypatch.setattr(oidc, "MIN_REFRESH_SECONDS", 0.0)
        provider.add_key("k2")
        code, _, resp = await _call(server.address, provider.token(kid="k2", sub="fay"), prompt)
        assert code == grpc.StatusCode.OK and resp.user_prompt.user_id == "fay"
    finally:
        await server.stop()


def test_the_audience_is_required_with_an_issuer() -> None:
    from services.common.settings import Settings, SettingsError

    with pytest.raises(SettingsError, match="AGENTPLANE_OIDC_AUDIENCE"):
        Settings.from_env({"AGENTPLANE_OIDC_ISSUER": "https://id.example"})
    assert Settings.from_env({}).oidc is None
