"""Opaque page tokens and page sizes for the List RPCs."""

from __future__ import annotations

import base64
import datetime as dt
import json
import uuid
from collections.abc import Callable
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


def timestamp(value: Any) -> dt.datetime:
    """A position's time: an ISO 8601 string with a time zone, as `encode_token` wrote it."""
    if not isinstance(value, str):
        raise TypeError(value)
    parsed = dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        raise ValueError(value)
    return parsed


def uuid_text(value: Any) -> str:
    """A position's id: a UUID string."""
    if not isinstance(value, str):
        raise TypeError(value)
    return str(uuid.UUID(value))


def text(value: Any) -> str:
    """A position's name: a string (without NUL, which no name holds and Postgres refuses)."""
    if not isinstance(value, str) or "\x00" in value:
        raise TypeError(value)
    return value


# The positions of the lists: (create_time, id) for providers and models, the name for templates.
TIME_AND_ID: tuple[Callable[[Any], Any], ...] = (timestamp, uuid_text)
NAME: tuple[Callable[[Any], Any], ...] = (text,)


def decode_token(kind: str, token: str, shape: tuple[Callable[[Any], Any], ...]) -> list[Any] | None:
    """The position in a token from `encode_token` (None for an empty token), each value checked by
    its parser in `shape`; InvalidArgument if bad. A token is opaque to clients but not tamper-proof:
    an unchecked position would reach the database's query as a value of the wrong type."""
    if not token:
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if data["k"] != kind or not isinstance(data["p"], list) or len(data["p"]) != len(shape):
            raise ValueError
        return [parse(value) for parse, value in zip(shape, data["p"], strict=True)]
    except (ValueError, KeyError, TypeError, OverflowError):
        raise InvalidArgument(
            "page_token", "is not a token from a previous response of this list; omit it to start over"
        ) from None
