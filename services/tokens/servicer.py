"""`agentplane.config.v1.TokenService`, hosted by the config process: revoke and list."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from typing import Any

import grpc.aio
from agentplane.config.v1 import token_service_pb2 as pb
from agentplane.config.v1 import token_service_pb2_grpc as pb_grpc
from google.protobuf import timestamp_pb2

from services.common import auth
from services.common.errors import InvalidArgument, PermissionDenied
from services.tokens.revocations import RevocationList
from services.tokens.store import Revocation, RevocationStore

MAX_TOKEN_ID_LENGTH = 200
MAX_REASON_LENGTH = 500
DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10_000


def _timestamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def revocation_to_proto(r: Revocation) -> pb.RevokedToken:
    """The API form of a revocation."""
    return pb.RevokedToken(
        token_id=r.token_id,
        expire_time=_timestamp(r.expire_time),
        revoke_time=_timestamp(r.revoke_time),
        revoked_by=r.revoked_by,
        reason=r.reason,
    )


class TokenServicer(pb_grpc.TokenServiceServicer):
    """Revocations: admins revoke, services (and admins) list."""

    def __init__(
        self, store: RevocationStore, revocations: RevocationList, max_lifetime_seconds: float
    ) -> None:
        self._store = store
        self._revocations = revocations
        self._max_lifetime = max_lifetime_seconds

    async def RevokeToken(
        self, request: pb.RevokeTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RevokeTokenResponse:
        admin = auth.require_admin()
        token_id = request.token_id.strip()
        if not token_id:
            raise InvalidArgument(
                "token_id", "is required (the token's jti; `agentplane token create` prints it)"
            )
        if len(token_id) > MAX_TOKEN_ID_LENGTH or any(c.isspace() for c in token_id):
            raise InvalidArgument("token_id", f"must be at most {MAX_TOKEN_ID_LENGTH} characters, no spaces")
        if len(request.reason) > MAX_REASON_LENGTH:
            raise InvalidArgument("reason", f"must be at most {MAX_REASON_LENGTH} characters")
        now = dt.datetime.now(dt.UTC)
        if request.HasField("expire_time"):
            try:
                expire = request.expire_time.ToDatetime(dt.UTC)
            except (ValueError, OverflowError):
                raise InvalidArgument("expire_time", "must be a time between the years 1 and 9999") from None
            if expire <= now:
                raise InvalidArgument("expire_time", "is in the past: an expired token needs no revocation")
        else:
            expire = now + dt.timedelta(seconds=self._max_lifetime)
        revocation = await self._store.revoke(token_id, expire, admin.subject, request.reason)
        self._revocations.add(revocation.token_id, revocation.expire_time.timestamp())
        return pb.RevokeTokenResponse(revoked_token=revocation_to_proto(revocation))

    async def ListRevokedTokens(
        self, request: pb.ListRevokedTokensRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListRevokedTokensResponse:
        identity = auth.current_identity()
        if not (identity.is_service() or identity.is_admin):
            raise PermissionDenied("only services and admins list revoked tokens", reason="ADMIN_REQUIRED")
        if request.page_size < 0:
            raise InvalidArgument("page_size", "must not be negative")
        size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        after = _decode(request.page_token) if request.page_token else ""
        rows = await self._store.active(after, size + 1)
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = base64.urlsafe_b64encode(rows[-1].token_id.encode()).decode()
        return pb.ListRevokedTokensResponse(
            revoked_tokens=[revocation_to_proto(r) for r in rows], next_page_token=token
        )


def _decode(token: str) -> str:
    try:
        after = base64.b64decode(token.encode(), altchars=b"-_", validate=True).decode()
        # A token id never holds NUL (Postgres text cannot): this token was not written by us.
        if "\x00" in after:
            raise ValueError(after)
        return after
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidArgument(
            "page_token", "is not a token from a previous ListRevokedTokens response"
        ) from None
