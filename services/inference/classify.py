"""Classify provider failures into ErrorReasons, retryability and the domain errors callers see.

Reasons are the names of inference.proto's ErrorReason without the ERROR_REASON_ prefix.
"""

from __future__ import annotations

import email.utils
import errno
import json
import socket
import ssl
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any

import aiohttp
import anthropic
import httpx2
import openai
import pydantic

from services.common.errors import (
    AgentplaneError,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
    Unavailable,
)

RATE_LIMITED = "RATE_LIMITED"
CONTEXT_LENGTH_EXCEEDED = "CONTEXT_LENGTH_EXCEEDED"
PROVIDER_AUTH_FAILED = "PROVIDER_AUTH_FAILED"
INVALID_REQUEST = "INVALID_REQUEST"
CONTENT_FILTERED = "CONTENT_FILTERED"
PROVIDER_UNAVAILABLE = "PROVIDER_UNAVAILABLE"
MODEL_NOT_AVAILABLE = "MODEL_NOT_AVAILABLE"
STREAM_INTERRUPTED = "STREAM_INTERRUPTED"

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})
CONTEXT_MARKERS = (
    "context_length_exceeded",
    "context length",
    "context window",
    "prompt is too long",
    "maximum context",
    "too many tokens",
    "input is too long",
)
CONTENT_FILTER_MARKERS = ("content_filter", "content_policy", "content management policy", "safety system")
# The longest Retry-After we take at face value; beyond it the retry budget decides.
MAX_RETRY_AFTER_S = 3600.0


@dataclass(frozen=True)
class ProviderFailure:
    """A classified provider failure."""

    reason: str
    retryable: bool
    detail: str
    retry_after_s: float | None = None
    status_code: int | None = None


def classify(exc: BaseException, *, base_url: str = "") -> ProviderFailure:
    """Classify an exception raised by an SDK call or while reading its stream.

    `base_url` (the provider's, as configured) names the provider in network failures; without
    it the origin of the failed request is used when the exception carries one.
    """
    if isinstance(exc, _NETWORK_ERRORS):
        network = _classify_network(exc, _where(exc, base_url))
        if network is not None:
            return network
    if isinstance(exc, openai.APITimeoutError | anthropic.APITimeoutError):
        return ProviderFailure(PROVIDER_UNAVAILABLE, True, "the request timed out")
    if isinstance(exc, openai.APIConnectionError | anthropic.APIConnectionError):
        return ProviderFailure(PROVIDER_UNAVAILABLE, True, f"connection failed: {_cause(exc)}")
    if isinstance(exc, openai.APIStatusError | anthropic.APIStatusError):
        return _classify_status(exc.status_code, exc.body, exc.response.headers, _message(exc))
    if isinstance(exc, anthropic.APIError | openai.APIError):
        # Errors sent inside a stream (an SSE "error" event) arrive without a useful HTTP status.
        return _classify_body_error(exc.body, str(exc))
    if isinstance(exc, httpx2.TimeoutException):
        return ProviderFailure(PROVIDER_UNAVAILABLE, True, "the request timed out")
    if isinstance(exc, httpx2.TransportError | ConnectionError):
        return ProviderFailure(PROVIDER_UNAVAILABLE, True, f"connection failed: {type(exc).__name__}")
    if isinstance(exc, json.JSONDecodeError | pydantic.ValidationError | ValueError | KeyError):
        return ProviderFailure(
            PROVIDER_UNAVAILABLE, True, f"the provider sent a malformed stream ({type(exc).__name__})"
        )
    return ProviderFailure(PROVIDER_UNAVAILABLE, False, f"unexpected failure ({type(exc).__name__})")


# What a failure to reach the provider, or to keep talking to it, is raised as.
_NETWORK_ERRORS = (
    openai.APIConnectionError,  # includes APITimeoutError
    anthropic.APIConnectionError,
    httpx2.TransportError,
    aiohttp.ClientError,
    OSError,  # includes ConnectionError, TimeoutError, socket.gaierror, ssl.SSLError
)
_UNREACHABLE = {
    errno.ENETUNREACH: "the network is unreachable",
    errno.EHOSTUNREACH: "the host is unreachable",
}


def _classify_network(exc: BaseException, where: str) -> ProviderFailure | None:
    """Connection failures (refused, DNS, unreachable, TLS) told apart from timeouts, by root cause.

    The SDK wrappers are not to be trusted here: the OpenAI SDK's aiohttp transport reports every
    aiohttp connection error, a refused connection included, as ``ConnectTimeout`` and then
    ``APITimeoutError``. So the chain of causes is read from the innermost (the socket's error) out.
    """
    chain = _chain(exc)
    connect = f"could not connect to the provider at {where}"
    for err in reversed(chain):
        if isinstance(err, TimeoutError):  # asyncio's and aiohttp's timeouts are TimeoutErrors
            if any(isinstance(e, aiohttp.ConnectionTimeoutError | httpx2.ConnectTimeout) for e in chain):
                return ProviderFailure(PROVIDER_UNAVAILABLE, True, f"{connect}: timed out")
            return ProviderFailure(
                PROVIDER_UNAVAILABLE, True, f"the request to the provider at {where} timed out"
            )
        if isinstance(err, socket.gaierror):
            # EAI_AGAIN is a resolver hiccup; any other answer (no such host) will not change by retrying.
            temporary = err.errno == socket.EAI_AGAIN
            why = err.strerror or str(err)
            return ProviderFailure(
                PROVIDER_UNAVAILABLE, temporary, f"{connect}: the host name could not be resolved ({why})"
            )
        if isinstance(err, ssl.SSLCertVerificationError):
            why = err.verify_message or err.reason or str(err)
            return ProviderFailure(
                PROVIDER_UNAVAILABLE, False, f"{connect}: its TLS certificate was not accepted ({why})"
            )
        if isinstance(err, ssl.SSLError):
            return ProviderFailure(
                PROVIDER_UNAVAILABLE, False, f"{connect}: the TLS handshake failed ({err.reason or err})"
            )
        if isinstance(err, ConnectionRefusedError):
            # Nothing listens there (yet): a wrong port, or a server still starting or restarting.
            return ProviderFailure(PROVIDER_UNAVAILABLE, True, f"{connect}: connection refused")
        if isinstance(err, OSError) and err.errno in _UNREACHABLE:
            return ProviderFailure(PROVIDER_UNAVAILABLE, True, f"{connect}: {_UNREACHABLE[err.errno]}")
        if isinstance(err, ConnectionResetError | ConnectionAbortedError | BrokenPipeError):
            return ProviderFailure(
                PROVIDER_UNAVAILABLE,
                True,
                f"the provider at {where} closed the connection ({err.strerror or err})",
            )
        if isinstance(err, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
            return ProviderFailure(
                PROVIDER_UNAVAILABLE, True, f"the provider at {where} closed the connection ({err})"
            )
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    """`exc` and its causes, outermost first (as a traceback shows them)."""
    chain: list[BaseException] = []
    err: BaseException | None = exc
    while err is not None and all(err is not e for e in chain) and len(chain) < 20:
        chain.append(err)
        if err.__cause__ is not None:
            err = err.__cause__
        else:
            err = None if err.__suppress_context__ else err.__context__
    return chain


def _where(exc: BaseException, base_url: str) -> str:
    """The provider's base URL, else the origin of the request that failed; never credentials."""
    if base_url:
        return _public_url(base_url)
    for err in _chain(exc):
        try:  # httpx2's `request` property raises RuntimeError when none was attached
            request = getattr(err, "request", None)
            url = str(request.url) if request is not None else ""
        except (AttributeError, RuntimeError):
            continue
        if url:
            return _public_url(url, origin_only=True)
    return "its API address"


def _public_url(url: str, *, origin_only: bool = False) -> str:
    """`url` without user info, query or fragment (and without its path when `origin_only`)."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "its API address"
    host = parts.netloc.rpartition("@")[2]
    if not parts.scheme or not host:
        return "its API address"
    return urllib.parse.urlunsplit((parts.scheme, host, "" if origin_only else parts.path, "", ""))


def _classify_status(status: int, body: Any, headers: Any, message: str) -> ProviderFailure:
    text = f"{message} {json.dumps(body) if isinstance(body, dict) else body or ''}".lower()
    retry_after = parse_retry_after(headers)
    if status in (401, 403):
        return ProviderFailure(PROVIDER_AUTH_FAILED, False, message, status_code=status)
    if status == 429:
        # An exhausted quota will not recover by waiting; a rate limit will.
        quota = "insufficient_quota" in text
        return ProviderFailure(RATE_LIMITED, not quota, message, retry_after, status)
    if status in (400, 404, 413, 422):
        if any(m in text for m in CONTEXT_MARKERS):
            return ProviderFailure(CONTEXT_LENGTH_EXCEEDED, False, message, status_code=status)
        if any(m in text for m in CONTENT_FILTER_MARKERS):
            return ProviderFailure(CONTENT_FILTERED, False, message, status_code=status)
        if status == 404:
            return ProviderFailure(MODEL_NOT_AVAILABLE, False, message, status_code=status)
        return ProviderFailure(INVALID_REQUEST, False, message, status_code=status)
    if status in RETRYABLE_STATUS or status >= 500:
        return ProviderFailure(PROVIDER_UNAVAILABLE, True, message, retry_after, status)
    if status == 200:
        return _classify_body_error(body, message)
    return ProviderFailure(INVALID_REQUEST, False, message, status_code=status)


def _classify_body_error(body: Any, message: str) -> ProviderFailure:
    kind = ""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            kind = str(err.get("type") or err.get("code") or "")
            message = str(err.get("message") or message)
    if kind in ("overloaded_error", "api_error", "server_error"):
        return ProviderFailure(PROVIDER_UNAVAILABLE, True, message)
    if kind in ("rate_limit_error", "rate_limit_exceeded"):
        return ProviderFailure(RATE_LIMITED, True, message)
    if kind in ("authentication_error", "permission_error", "invalid_api_key"):
        return ProviderFailure(PROVIDER_AUTH_FAILED, False, message)
    if any(m in message.lower() for m in CONTEXT_MARKERS):
        return ProviderFailure(CONTEXT_LENGTH_EXCEEDED, False, message)
    if kind == "invalid_request_error":
        return ProviderFailure(INVALID_REQUEST, False, message)
    return ProviderFailure(PROVIDER_UNAVAILABLE, True, message)


def parse_retry_after(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `retry-after` (seconds or an HTTP date)."""
    if headers is None:
        return None
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return min(max(float(raw_ms) / 1000, 0.0), MAX_RETRY_AFTER_S)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return min(max(float(raw), 0.0), MAX_RETRY_AFTER_S)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return min(max(when.timestamp() - time.time(), 0.0), MAX_RETRY_AFTER_S)


def _message(exc: openai.APIStatusError | anthropic.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return f"HTTP {exc.status_code}: {err['message']}"
    return f"HTTP {exc.status_code}"


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    return type(cause).__name__ if cause is not None else str(exc)


def redact(detail: str, secret: str) -> str:
    """`detail` (a provider's words) without `secret` (the key it was sent), which a provider may quote."""
    return detail.replace(secret, "[REDACTED]") if secret else detail


def to_domain_error(
    failure: ProviderFailure,
    *,
    provider: str,
    model: str,
    attempts: int,
    output_started: bool,
    secret: str = "",
) -> AgentplaneError:
    """The domain error Generate ends with; the message names provider and model, never the key."""
    detail = redact(failure.detail, secret)
    where = f"{provider} (model {model})"
    meta = {"provider": provider, "model": model, "attempts": str(attempts)}
    reason = failure.reason
    if output_started and failure.retryable:
        return Unavailable(
            f"{where} stream failed after output had started: {detail}",
            reason=STREAM_INTERRUPTED,
            metadata=meta,
        )
    tries = f" after {attempts} attempts" if attempts > 1 else ""
    if reason == RATE_LIMITED:
        return ResourceExhausted(
            f"{where} rate-limited the request{tries}: {detail}", reason=reason, metadata=meta
        )
    if reason == CONTEXT_LENGTH_EXCEEDED:
        return InvalidArgument(
            "messages",
            f"the conversation does not fit the context window of {where}; compact it and retry: {detail}",
            reason=reason,
            metadata=meta,
        )
    if reason == PROVIDER_AUTH_FAILED:
        return FailedPrecondition(
            f"{where} refused the stored API key; update the provider's key: {detail}",
            reason=reason,
            metadata=meta,
        )
    if reason == INVALID_REQUEST:
        return InvalidArgument(
            "request", f"{where} rejected the request: {detail}", reason=reason, metadata=meta
        )
    if reason == CONTENT_FILTERED:
        return FailedPrecondition(
            f"{where} content filter refused the request: {detail}", reason=reason, metadata=meta
        )
    if reason == MODEL_NOT_AVAILABLE:
        return FailedPrecondition(
            f"{where} does not serve this model: {detail}", reason=reason, metadata=meta
        )
    return Unavailable(f"{where} is unavailable{tries}: {detail}", reason=PROVIDER_UNAVAILABLE, metadata=meta)
