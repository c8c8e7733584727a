"""Opaque page tokens and page sizes for the List RPCs."""

from __future__ import annotations

import base64
import json
from typing import Any

from services.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


def page_size(value: int) -> int:
    """The effective page size: 0 means the default, above the maximum is capped, negative is an error."""
    if value < 0:
        raise InvalidArgument("page_size", f"must not be negative, got {value}")
    if value == 0:
        return DEFAULT_PAGE_SIZE
    return min(value, MAX_PAGE_SIZE)


def encode_token(kind: str, position: list[Any]) -> str:
    """An opaque token resuming a listing of `kind` after `position`."""
    raw = json.dumps({"k": kind, "p": position}, separators=(",", ":"), default=str).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(kind: str, token: str) -> list[Any] | None:
    """The position in a token from `encode_token` (None for an empty token); InvalidArgument if bad."""
    if not token:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if data["k"] != kind or not isinstance(data["p"], list):
            raise ValueError
        return list(data["p"])
    except (ValueError, KeyError, TypeError):
        raise InvalidArgument(
            "page_token", "is not a token from a previous response of this list; omit it to start over"
        ) from None
