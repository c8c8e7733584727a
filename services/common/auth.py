"""Identity and tokens: JWTs (EdDSA) signed with per-service keys and the user issuer key.

User tokens carry ``sub`` = user id and ``role`` = ``user`` | ``admin``; service tokens carry
``sub`` = ``service:<name>`` and ``role`` = ``service``. A service acting for a user sends its
own token plus the user id in the ``x-agentplane-on-behalf-of`` metadata; only service
identities may do that. The verified identity of the running RPC is in `current_identity()`.

This module does not import grpc; the interceptors in `interceptors` and `client` do.
"""

from __future__ import annotations

import collections
import contextvars
import enum
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import jwt

from services.common.errors import PermissionDenied, Unauthenticated
from services.common.keys import USERS_SCOPE, Keys, KeySet
from services.common.oidc import OidcVerifier
from services.common.token_rules import check_lifetime

ALGORITHM = "EdDSA"
ISSUER = "agentplane"
SERVICE_PREFIX = "service:"
AUTHORIZATION_METADATA_KEY = "authorization"
ON_BEHALF_OF_METADATA_KEY = "x-agentplane-on-behalf-of"
DEFAULT_USER_TTL_SECONDS = 24 * 3600
DEFAULT_SERVICE_TTL_SECONDS = 3600
# No token is accepted whose lifetime (exp - iat) is longer than this (configurable per deployment:
# AGENTPLANE_MAX_TOKEN_LIFETIME_SECONDS); a leaked token is useful for a bounded time at most.
DEFAULT_MAX_TOKEN_LIFETIME_SECONDS = 30 * 24 * 3600


class Role(enum.StrEnum):
    """The role claim of a token."""

    USER = "user"
    ADMIN = "admin"
    SERVICE = "service"


@dataclass(frozen=True)
class Identity:
    """Who is calling: the token's subject and role, and whom a service acts for."""

    subject: str
    role: Role
    acting_for: str | None = None

    @property
    def user_id(self) -> str | None:
        """The effective user: the user a service acts for, else the user itself; None for a bare service."""
        if self.acting_for is not None:
            return self.acting_for
        return None if self.role is Role.SERVICE else self.subject

    @property
    def is_admin(self) -> bool:
        """True for a user token with the admin role (never for services)."""
        return self.role is Role.ADMIN

    @property
    def service_name(self) -> str | None:
        """``chat`` for ``service:chat``; None for users."""
        if self.role is Role.SERVICE:
            return self.subject.removeprefix(SERVICE_PREFIX)
        return None

    def is_service(self, name: str | None = None) -> bool:
        """True for a service identity (of service `name`, when given)."""
        return self.role is Role.SERVICE and (name is None or self.service_name == name)


def service_subject(name: str) -> str:
    """The token subject of service `name` (``service:chat``)."""
    return f"{SERVICE_PREFIX}{name}"


def mint_token(keys: Keys, subject: str, role: Role | str, ttl_seconds: float | None = None) -> str:
    """Sign a token for `subject` with `role`, valid for `ttl_seconds`.

    A service's token is signed with that service's own key, a user's with the user issuer key;
    `keys` must hold the one needed (`KeyUnavailable` otherwise).
    """
    role = Role(role)
    _check_subject(subject, role)
    if ttl_seconds is None:
        ttl_seconds = DEFAULT_SERVICE_TTL_SECONDS if role is Role.SERVICE else DEFAULT_USER_TTL_SECONDS
    now = int(time.time())
    claims = {
        "sub": subject,
        "role": role.value,
        "iss": ISSUER,
        "iat": now,
        "exp": now + int(ttl_seconds),
        "jti": uuid.uuid4().hex,
    }
    signer = keys.signer_for(subject)
    return jwt.encode(claims, signer.key, algorithm=ALGORITHM, headers={"kid": signer.kid})


def mint_service_token(keys: Keys, service: str, ttl_seconds: float | None = None) -> str:
    """Sign a token for service `service` (subject ``service:<service>``) with its own key."""
    return mint_token(keys, service_subject(service), Role.SERVICE, ttl_seconds)


# Verified tokens, so a client's every call does not pay for a signature check and JSON again. A
# hit is only trusted until the token's own expiry; the cache is bounded (oldest out first).
# Keys: (key set, its version, token, max lifetime); values: (identity, expiry, token id). A key
# removed from the set (a new version) is not trusted through the cache either.
_VERIFIED: collections.OrderedDict[tuple[Any, ...], tuple[Identity, float, str]] = collections.OrderedDict()
VERIFIED_CACHE_SIZE = 4096


def verify_token(
    keys: Keys, token: str, max_lifetime_seconds: float = DEFAULT_MAX_TOKEN_LIFETIME_SECONDS
) -> Identity:
    """Verify `token` and return its identity; raises `Unauthenticated` saying what is wrong.

    A token living longer than `max_lifetime_seconds` (from `iat` to `exp`) is refused.
    """
    return _verified(keys, token, max_lifetime_seconds)[0]


def _verified(keys: Keys, token: str, max_lifetime_seconds: float) -> tuple[Identity, str]:
    """The token's identity and id (jti), from the cache while the token is valid."""
    keyset = keys.keyset
    keyset.refresh_if_due()
    key = (keyset.instance, keyset.version, token, max_lifetime_seconds)
    hit = _VERIFIED.get(key)
    if hit is not None:
        if time.time() < hit[1]:
            return hit[0], hit[2]
        _VERIFIED.pop(key, None)
    identity, expires, token_id = _verify(keyset, token, max_lifetime_seconds)
    _remember(key, identity, expires, token_id)
    return identity, token_id


def _remember(key: tuple[Any, ...], identity: Identity, expires: float, token_id: str) -> None:
    """Cache a verified token (the oldest entries go first)."""
    while len(_VERIFIED) >= VERIFIED_CACHE_SIZE:
        _VERIFIED.popitem(last=False)
    _VERIFIED[key] = (identity, expires, token_id)


def _verified_oidc(oidc: OidcVerifier, token: str, max_lifetime_seconds: float) -> tuple[Identity, str]:
    """An identity provider's token: its user and id, cached like the deployment's own tokens."""
    key = ("oidc:" + oidc.settings.issuer, oidc.version, token, max_lifetime_seconds)
    hit = _VERIFIED.get(key)
    if hit is not None and time.time() < hit[1]:
        return hit[0], hit[2]
    user, admin, expires, token_id = oidc.verify(token, max_lifetime_seconds)
    identity = Identity(subject=user, role=Role.ADMIN if admin else Role.USER)
    _remember(key, identity, expires, token_id)
    return identity, token_id


def _verify(keyset: KeySet, token: str, max_lifetime_seconds: float) -> tuple[Identity, float, str]:
    try:
        kid = str(jwt.get_unverified_header(token).get("kid", ""))
    except jwt.InvalidTokenError:
        raise Unauthenticated("token is malformed", reason="TOKEN_MALFORMED") from None
    entry = keyset.get(kid)
    if entry is None:
        raise Unauthenticated(
            "token is signed with a key this deployment does not publish (unknown or removed key id)",
            reason="TOKEN_INVALID",
        )
    try:
        claims = jwt.decode(
            token,
            entry.key,
            algorithms=[ALGORITHM],
            issuer=ISSUER,
            options={"require": ["sub", "exp", "iat", "jti"]},
        )
    except jwt.ExpiredSignatureError:
        raise Unauthenticated("token has expired", reason="TOKEN_EXPIRED") from None
    except jwt.InvalidSignatureError:
        raise Unauthenticated("token signature is invalid", reason="TOKEN_INVALID") from None
    except jwt.DecodeError:
        raise Unauthenticated("token is malformed", reason="TOKEN_MALFORMED") from None
    except jwt.InvalidTokenError as exc:
        raise Unauthenticated(f"token is invalid: {exc}", reason="TOKEN_INVALID") from None
    check_lifetime(claims, max_lifetime_seconds)
    try:
        role = Role(str(claims.get("role")))
    except ValueError:
        raise Unauthenticated("token has no valid role claim", reason="TOKEN_INVALID") from None
    subject = str(claims["sub"])
    try:
        _check_subject(subject, role)
    except ValueError as exc:
        raise Unauthenticated(str(exc), reason="TOKEN_INVALID") from None
    # Each key signs for one scope: a service only its own identity, the issuer only users.
    allowed = subject == entry.scope if entry.scope != USERS_SCOPE else role is not Role.SERVICE
    if not allowed:
        raise Unauthenticated(
            f"token for {subject!r} is signed by the key of {entry.scope!r}, which may not sign it",
            reason="TOKEN_WRONG_SIGNER",
        )
    return Identity(subject=subject, role=role), float(claims["exp"]), str(claims.get("jti") or "")


def parse_authorization(value: str | None) -> str:
    """Extract the token from an ``authorization`` metadata value (``Bearer <token>``)."""
    if not value:
        raise Unauthenticated(
            "missing authorization metadata (expected 'Bearer <token>')", reason="TOKEN_MISSING"
        )
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("authorization metadata must be 'Bearer <token>'", reason="TOKEN_MALFORMED")
    return token.strip()


def authenticate(
    keys: Keys,
    authorization: str | None,
    on_behalf_of: str | None,
    max_lifetime_seconds: float = DEFAULT_MAX_TOKEN_LIFETIME_SECONDS,
    is_revoked: Callable[[str], bool] | None = None,
    oidc: OidcVerifier | None = None,
) -> Identity:
    """Turn request metadata into an identity, or raise Unauthenticated / PermissionDenied.

    `is_revoked(token_id)` says whether an admin revoked the token (services.tokens); `oidc` is
    given when the token claims to be the external identity provider's (`OidcVerifier.issues`, which
    the caller checked) and verifies it (services.common.oidc).
    """
    token = parse_authorization(authorization)
    if oidc is not None:
        identity, token_id = _verified_oidc(oidc, token, max_lifetime_seconds)
    else:
        identity, token_id = _verified(keys, token, max_lifetime_seconds)
    if is_revoked is not None and token_id and is_revoked(token_id):
        raise Unauthenticated(f"token {token_id} was revoked by an admin", reason="TOKEN_REVOKED")
    if on_behalf_of:
        if identity.role is not Role.SERVICE:
            raise PermissionDenied(
                f"only service identities may act on behalf of a user ({ON_BEHALF_OF_METADATA_KEY})",
                reason="ON_BEHALF_OF_NOT_ALLOWED",
            )
        if on_behalf_of.startswith(SERVICE_PREFIX):
            raise PermissionDenied(
                "a service may only act on behalf of a user", reason="ON_BEHALF_OF_NOT_ALLOWED"
            )
        identity = Identity(subject=identity.subject, role=identity.role, acting_for=on_behalf_of)
    return identity


def _check_subject(subject: str, role: Role) -> None:
    if not subject:
        raise ValueError("token subject must not be empty")
    if (role is Role.SERVICE) != subject.startswith(SERVICE_PREFIX):
        raise ValueError(f"subject {subject!r} does not match role {role.value!r}")


# --- the identity of the running RPC -------------------------------------------------

_identity: contextvars.ContextVar[Identity | None] = contextvars.ContextVar(
    "agentplane_identity", default=None
)


def current_identity() -> Identity:
    """The verified identity of the RPC being served; raises Unauthenticated outside one."""
    identity = _identity.get()
    if identity is None:
        raise Unauthenticated("no authenticated identity for this call", reason="NO_IDENTITY")
    return identity


def optional_identity() -> Identity | None:
    """The identity of the RPC being served, or None (exempt RPCs, background jobs)."""
    return _identity.get()


@contextmanager
def identity_scope(identity: Identity | None) -> Iterator[None]:
    """Run a block as `identity` (the auth interceptor uses this; so can tests and jobs)."""
    token = _identity.set(identity)
    try:
        yield
    finally:
        _identity.reset(token)


def require_user_id() -> str:
    """The effective user id of the call; PermissionDenied for a service acting for nobody."""
    user_id = current_identity().user_id
    if user_id is None:
        raise PermissionDenied("this call must be made by or on behalf of a user", reason="USER_REQUIRED")
    return user_id


def require_admin() -> Identity:
    """The current identity, which must be an admin user."""
    identity = current_identity()
    if not identity.is_admin:
        raise PermissionDenied("this call requires the admin role", reason="ADMIN_REQUIRED")
    return identity


def require_service(*names: str) -> Identity:
    """The current identity, which must be one of the named services (any service if none named)."""
    identity = current_identity()
    if not identity.is_service() or (names and identity.service_name not in names):
        wanted = " or ".join(names) if names else "a service"
        raise PermissionDenied(f"this call is reserved for {wanted}", reason="SERVICE_REQUIRED")
    return identity


# --- what outgoing calls act for -----------------------------------------------------

_outgoing_on_behalf_of: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "agentplane_outgoing_on_behalf_of", default=None
)


@contextmanager
def acting_for(user_id: str | None) -> Iterator[None]:
    """Make outgoing calls in this block carry `user_id` as on-behalf-of (background jobs)."""
    token = _outgoing_on_behalf_of.set(user_id)
    try:
        yield
    finally:
        _outgoing_on_behalf_of.reset(token)


def outgoing_on_behalf_of() -> str | None:
    """The user outgoing calls act for: `acting_for(...)` if set, else the current RPC's effective user."""
    explicit = _outgoing_on_behalf_of.get()
    if explicit is not None:
        return explicit
    identity = _identity.get()
    return identity.user_id if identity is not None else None


class ServiceTokenProvider:
    """Mints this service's token and re-mints it shortly before it expires (a `client.TokenProvider`)."""

    def __init__(self, keys: Keys, service: str, ttl_seconds: float = DEFAULT_SERVICE_TTL_SECONDS) -> None:
        self._keys = keys
        self._service = service
        self._ttl = ttl_seconds
        self._token = ""
        self._refresh_at = 0.0

    def __call__(self) -> str:
        now = time.time()
        if now >= self._refresh_at:
            self._token = mint_service_token(self._keys, self._service, self._ttl)
            self._refresh_at = now + self._ttl * 0.8
        return self._token
