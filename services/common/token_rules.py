"""Rules every accepted token obeys, whoever issued it (the deployment's keys or an identity provider)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from services.common.errors import Unauthenticated


def check_lifetime(claims: Mapping[str, Any], max_lifetime_seconds: float) -> None:
    """Refuse a token living longer (``exp - iat``) than the deployment allows."""
    lifetime = float(claims["exp"]) - float(claims["iat"])
    if lifetime > max_lifetime_seconds:
        raise Unauthenticated(
            f"token lives {lifetime / 86400:.1f} days, longer than this deployment allows "
            f"({max_lifetime_seconds / 86400:.1f} days); mint a shorter-lived one",
            reason="TOKEN_LIFETIME_TOO_LONG",
        )
