"""`agentplane token create`: mint a user, admin or service token with the deployment secret."""

from __future__ import annotations

import argparse
from typing import Any

from services.cli.connect import deployment_secret
from services.cli.output import add_output_argument, emit
from services.common import auth
from services.common.settings import Settings


def register(subparsers: Any) -> None:
    """Add the `token` command group."""
    token = subparsers.add_parser("token", help="manage tokens")
    actions = token.add_subparsers(dest="token_action", required=True)
    create = actions.add_parser(
        "create", help="mint a token signed with AGENTPLANE_SECRET (or the secret `agentplane up` keeps)"
    )
    who = create.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", help="user id (subject)")
    who.add_argument("--service", choices=["config", "inference", "toolexec", "chat"], help="service name")
    create.add_argument("--admin", action="store_true", help="give the user the admin role")
    create.add_argument("--ttl", type=float, default=None, help="lifetime in seconds")
    add_output_argument(create)
    create.set_defaults(func=create_token)


def create_token(args: argparse.Namespace) -> int:
    """Print a freshly minted token."""
    settings = Settings.from_env()
    if args.service:
        if args.admin:
            raise SystemExit("--admin applies to user tokens only")
        subject, role = auth.service_subject(args.service), auth.Role.SERVICE
    else:
        subject, role = args.user, auth.Role.ADMIN if args.admin else auth.Role.USER
    if args.ttl is not None and args.ttl > settings.max_token_lifetime_seconds:
        raise SystemExit(
            f"--ttl {args.ttl:g} s is longer than this deployment accepts "
            f"({settings.max_token_lifetime_seconds:g} s, AGENTPLANE_MAX_TOKEN_LIFETIME_SECONDS)"
        )
    # The secret `agentplane up` keeps in its data directory when AGENTPLANE_SECRET is unset, so
    # the token works against the running stack (it used to be signed with the development secret).
    token = auth.mint_token(deployment_secret(settings), subject, role, args.ttl)
    emit(args, {"token": token, "subject": subject, "role": role.value}, token)
    return 0
