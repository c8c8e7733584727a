"""The attack of the workspace agent issue, with the secret gone: a process holding toolexec's key
(all toolexec holds) cannot become the inference identity to read provider keys, nor a user."""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc
import jwt
from agentplane.config.v1 import config_service_pb2, config_service_pb2_grpc

from services.common import auth, keys
from services.common.client import create_channel
from services.common.rpc_errors import error_info
from services.config.server import ConfigServer
from tests.helpers import deployment_keys_dir


def _toolexec_only() -> keys.Keys:
    """Exactly what a toolexec process holds: the public key set and its own private key."""
    directory = deployment_keys_dir()
    return keys.Keys(f"{directory}/{keys.JWKS_FILENAME}", {"toolexec": f"{directory}/toolexec.pem"}, None)


async def _credentials(config: ConfigServer, token: str) -> tuple[grpc.StatusCode, str]:
    async with create_channel(config.address, token=token) as channel:
        stub = config_service_pb2_grpc.ConfigServiceStub(channel)
        try:
            await stub.GetProviderCredentials(
                config_service_pb2.GetProviderCredentialsRequest(
                    provider_id="00000000-0000-0000-0000-000000000000"
                )
            )
        except grpc.aio.AioRpcError as exc:
            info = error_info(exc)
            return exc.code(), info[0] if info else ""
    return grpc.StatusCode.OK, ""


async def test_toolexecs_key_cannot_make_the_inference_identity_or_a_user(
    config: ConfigServer, make_token: Callable[..., str]
) -> None:
    held = _toolexec_only()
    signer = held.signer_for("service:toolexec")
    now = int(time.time())
    claims = {"iss": auth.ISSUER, "iat": now, "exp": now + 300, "jti": "x"}
    for subject, role in (("service:inference", "service"), ("root", "admin")):
        forged = jwt.encode(
            {**claims, "sub": subject, "role": role},
            signer.key,
            algorithm="EdDSA",
            headers={"kid": signer.kid},
        )
        assert await _credentials(config, forged) == (grpc.StatusCode.UNAUTHENTICATED, "TOKEN_WRONG_SIGNER")
    # Its own identity is real, and still not allowed the credentials.
    own = auth.mint_service_token(held, "toolexec")
    assert (await _credentials(config, own))[0] == grpc.StatusCode.PERMISSION_DENIED
    # The real inference identity gets past authentication (the provider does not exist here).
    assert (await _credentials(config, make_token("service:inference", "service")))[
        0
    ] == grpc.StatusCode.NOT_FOUND
