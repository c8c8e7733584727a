"""Users from an external OpenID Connect provider: issuer, audience, JWKS from discovery, claims.

With ``AGENTPLANE_OIDC_ISSUER`` set, a bearer token whose ``iss`` is that issuer is verified
against the provider's published keys (found through ``<issuer>/.well-known/openid-configuration``,
fetched once and refreshed when a token names a key id not seen yet) instead of the deployment's
own secret. The user id is the claim ``AGENTPLANE_OIDC_USER_CLAIM`` (default ``sub``); the admin
role comes from ``AGENTPLANE_OIDC_ADMIN_CLAIM`` (default ``groups``) containing (or equalling)
``AGENTPLANE_OIDC_ADMIN_VALUE``. The audience must be ``AGENTPLANE_OIDC_AUDIENCE``. The maximum
token lifetime applies as to every token.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt

from services.common.errors import Unauthenticated
from services.common.token_rules import check_lifetime

ALGORITHMS = ["RS256", "RS384", "RS512", "ES256", "ES384", "PS256", "EdDSA"]
FETCH_TIMEOUT_SECONDS = 5.0
# A token naming an unknown key id refreshes the key set at most this often (key rotation).
MIN_REFRESH_SECONDS = 30.0
# Known keys are re-fetched this often too (withdrawn keys stop working).
PERIODIC_REFRESH_SECONDS = 600.0

log = logging.getLogger(__name__)


class OidcSettingsError(ValueError):
    """The OIDC settings are incomplete."""


@dataclass(frozen=True)
class OidcSettings:
    """Which external provider's tokens identify users, and how to read them."""

    issuer: str
    audience: str
    user_claim: str = "sub"
    admin_claim: str = "groups"
    admin_value: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> OidcSettings | None:
        """None unless ``AGENTPLANE_OIDC_ISSUER`` is set; then the audience is required too."""
        issuer = (env.get("AGENTPLANE_OIDC_ISSUER") or "").strip()
        if not issuer:
            return None
        audience = (env.get("AGENTPLANE_OIDC_AUDIENCE") or "").strip()
        if not audience:
            raise OidcSettingsError("AGENTPLANE_OIDC_AUDIENCE must be set with AGENTPLANE_OIDC_ISSUER")
        return cls(
            issuer=issuer,
            audience=audience,
            user_claim=(env.get("AGENTPLANE_OIDC_USER_CLAIM") or "sub").strip(),
            admin_claim=(env.get("AGENTPLANE_OIDC_ADMIN_CLAIM") or "groups").strip(),
            admin_value=(env.get("AGENTPLANE_OIDC_ADMIN_VALUE") or "").strip(),
        )


async def _fetch_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url) as response:
        response.raise_for_status()
        data = await response.json(content_type=None)
    if not isinstance(data, dict):
        raise ValueError(f"{url} did not return a JSON object")
    return data


class OidcVerifier:
    """Verifies the provider's tokens; keys come from discovery and are cached by key id."""

    def __init__(self, settings: OidcSettings) -> None:
        self.settings = settings
        self._keys: dict[str, Any] = {}
        self.version = 0
        self._fetched = False
        self._attempted_at = -MIN_REFRESH_SECONDS
        self._lock = asyncio.Lock()

    def issues(self, token: str) -> bool:
        """True when `token` claims to come from this provider (its ``iss``, unverified)."""
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            return False
        return str(claims.get("iss", "")).rstrip("/") == self.settings.issuer.rstrip("/")

    async def refresh(self) -> None:
        """Fetch discovery and the key set now (without blocking the event loop)."""
        self._attempted_at = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT_SECONDS)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            base = self.settings.issuer.rstrip("/")
            discovery = await _fetch_json(session, f"{base}/.well-known/openid-configuration")
            if str(discovery.get("issuer", "")).rstrip("/") != base:
                raise ValueError("the discovery document names another issuer")
            jwks = await _fetch_json(session, str(discovery["jwks_uri"]))
        keys = {}
        for entry in jwks.get("keys", []):
            if entry.get("use", "sig") != "sig" or "kid" not in entry:
                continue
            keys[str(entry["kid"])] = jwt.PyJWK(entry)
        self._keys = keys
        self._fetched = True
        self.version += 1

    async def prepare(self, token: str) -> None:
        """Fetch the provider's keys when `token` names one not seen yet (at most every 30 s)."""
        try:
            kid = str(jwt.get_unverified_header(token).get("kid", ""))
        except jwt.InvalidTokenError:
            return
        since = time.monotonic() - self._attempted_at
        # A known key still triggers a refresh now and then: a key the provider withdrew stops working.
        if since < MIN_REFRESH_SECONDS or (kid in self._keys and since < PERIODIC_REFRESH_SECONDS):
            return
        async with self._lock:
            if kid in self._keys:
                return
            try:
                await self.refresh()
            except (OSError, ValueError, KeyError, aiohttp.ClientError, jwt.PyJWKError) as exc:
                log.warning("could not fetch the identity provider's keys: %s", exc)

    def _key(self, kid: str) -> Any:
        key = self._keys.get(kid)
        if key is None and not self._fetched:
            raise Unauthenticated(
                "the identity provider's keys could not be fetched yet; try again", reason="OIDC_UNAVAILABLE"
            )
        if key is None:
            raise Unauthenticated(
                f"token signed with key {kid!r}, which the identity provider does not publish",
                reason="TOKEN_INVALID",
            )
        return key

    def verify(self, token: str, max_lifetime_seconds: float) -> tuple[str, bool, float, str]:
        """(user id, is admin, expiry, token id) of a valid token; Unauthenticated saying why otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise Unauthenticated("token is malformed", reason="TOKEN_MALFORMED") from None
        jwk = self._key(str(header.get("kid", "")))
        # Only the algorithm of the key the provider published (no confusion between key types).
        algorithm = jwk.algorithm_name if jwk.algorithm_name in ALGORITHMS else None
        if algorithm is None or header.get("alg") != algorithm:
            raise Unauthenticated(
                f"token algorithm {header.get('alg')!r} does not match its key's", reason="TOKEN_INVALID"
            )
        try:
            claims = jwt.decode(
                token,
                jwk.key,
                algorithms=[algorithm],
                audience=self.settings.audience,
                issuer=self.settings.issuer,
                options={"require": ["exp", "iat", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("token has expired", reason="TOKEN_EXPIRED") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated(
                f"token is for another audience (this deployment is {self.settings.audience!r})",
                reason="TOKEN_WRONG_AUDIENCE",
            ) from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("token is from another issuer", reason="TOKEN_WRONG_ISSUER") from None
        except (jwt.PyJWTError, TypeError, ValueError) as exc:
            raise Unauthenticated(f"token is invalid: {exc}", reason="TOKEN_INVALID") from None
        check_lifetime(claims, max_lifetime_seconds)
        user = claims.get(self.settings.user_claim)
        if not isinstance(user, str) or not user:
            raise Unauthenticated(
                f"token has no {self.settings.user_claim!r} claim to name the user", reason="TOKEN_INVALID"
            )
        if user.startswith("service:"):
            raise Unauthenticated("an identity provider cannot name a service", reason="TOKEN_INVALID")
        admin = False
        if self.settings.admin_value:
            value = claims.get(self.settings.admin_claim)
            admin = value == self.settings.admin_value or (
                isinstance(value, list) and self.settings.admin_value in value
            )
        # Providers without `jti` (some put it elsewhere, some leave it out) still get an id, so an
        # admin can revoke the token: a hash of the token itself.
        token_id = str(claims.get("jti") or "") or "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:32]
        return user, admin, float(claims["exp"]), token_id


_VERIFIERS: dict[OidcSettings, OidcVerifier] = {}


def verifier_for(settings: OidcSettings) -> OidcVerifier:
    """One verifier (and one cached key set) per provider per process."""
    verifier = _VERIFIERS.get(settings)
    if verifier is None:
        verifier = _VERIFIERS[settings] = OidcVerifier(settings)
    return verifier
