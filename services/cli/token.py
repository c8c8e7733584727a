"""`agentplane token create|revoke|revoked`: mint a token with the key that may sign it; revocations."""

from __future__ import annotations

import argparse
from typing import Any

import jwt
from agentplane.config.v1 import token_service_pb2, token_service_pb2_grpc

from services.cli.connect import add_connection_arguments, call, open_channel, to_dict
from services.cli.output import CliError, add_output_argument, emit, table
from services.common import auth
from services.common.keys import KeyUnavailable
from services.common.settings import Settings


def register(subparsers: Any) -> None:
    """Add the `token` command group."""
    token = subparsers.add_parser("token", help="manage tokens")
    actions = token.add_subparsers(dest="token_action", required=True)
    create = actions.add_parser(
        "create",
        help="mint a token: a user's with the user issuer key, a service's with that service's key "
        "(from AGENTPLANE_KEYS_DIR, the *_KEY_FILE variables, or the keys `agentplane up` keeps)",
    )
    who = create.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="user id (subject)")
    who.add_argument("--service", choices=["config", "inference", "toolexec", "chat"], help="service name")
    create.add_argument("--admin", action="store_true", help="give the user the admin role")
    create.add_argument("--ttl", type=float, default=None, help="lifetime in seconds")
    add_output_argument(create)
    create.set_defaults(func=create_token)

    revoke = actions.add_parser(
        "revoke", help="revoke a token by its id (admins; every service refuses it soon after)"
    )
    revoke.add_argument("token_id", help="the token's id (`token create` prints it)")
    revoke.add_argument("--reason", default="", help="why, for the record")
    revoked = actions.add_parser("revoked", help="list revocations of tokens not expired yet")
    for parser in (revoke, revoked):
        add_connection_arguments(parser)
        add_output_argument(parser)
    revoke.set_defaults(func=revoke_token)
    revoked.set_defaults(func=list_revoked)


def create_token(args: argparse.Namespace) -> int:
    """Print a freshly minted token."""
    settings = Settings.from_env()
    if args.service:
        if args.admin:
            raise CliError("--admin applies to user tokens only")
        subject, role = auth.service_subject(args.service), auth.Role.SERVICE
    else:
        subject, role = args.user, auth.Role.ADMIN if args.admin else auth.Role.USER
    if args.ttl is not None and args.ttl > settings.max_token_lifetime_seconds:
        raise CliError(
            f"--ttl {args.ttl:g} s is longer than this deployment accepts "
            f"({settings.max_token_lifetime_seconds:g} s, AGENTPLANE_MAX_TOKEN_LIFETIME_SECONDS)",
            reason="TOKEN_LIFETIME_TOO_LONG",
        )
    # The keys `agentplane up` keeps in its data directory are found by default, so the token works
    # against the running stack.
    try:
        token = auth.mint_token(settings.keys, subject, role, args.ttl)
    except KeyUnavailable as exc:
        raise CliError(
            f"cannot mint the token: {exc}", code="FAILED_PRECONDITION", reason="KEY_UNAVAILABLE"
        ) from None
    claims = jwt.decode(token, options={"verify_signature": False})
    emit(
        args,
        {
            "token": token,
            "token_id": claims["jti"],
            "subject": subject,
            "role": role.value,
            "exp": claims["exp"],
        },
        token,
    )
    return 0


async def revoke_token(args: argparse.Namespace) -> int:
    """Revoke a token by id."""
    channel = open_channel(args, "config")
    try:
        stub = token_service_pb2_grpc.TokenServiceStub(channel)
        request = token_service_pb2.RevokeTokenRequest(token_id=args.token_id, reason=args.reason)
        resp = await call(args, lambda: stub.RevokeToken(request))
        if resp is None:
            return 1
        r = resp.revoked_token
        emit(args, to_dict(r), f"revoked {r.token_id} (until {r.expire_time.ToDatetime().isoformat()}Z)")
        return 0
    finally:
        await channel.close()


async def list_revoked(args: argparse.Namespace) -> int:
    """List current revocations, all pages."""
    channel = open_channel(args, "config")
    try:
        stub = token_service_pb2_grpc.TokenServiceStub(channel)
        found: list[token_service_pb2.RevokedToken] = []
        page = ""
        while True:
            request = token_service_pb2.ListRevokedTokensRequest(page_token=page)
            resp = await call(args, lambda request=request: stub.ListRevokedTokens(request))  # type: ignore[misc]
            if resp is None:
                return 1
            found.extend(resp.revoked_tokens)
            page = resp.next_page_token
            if not page:
                break
        rows = [[r.token_id, r.revoked_by, r.expire_time.ToJsonString(), r.reason] for r in found]
        text = table(["TOKEN_ID", "REVOKED_BY", "EXPIRES", "REASON"], rows, "no revoked tokens")
        emit(args, [to_dict(r) for r in found], text)
        return 0
    finally:
        await channel.close()
