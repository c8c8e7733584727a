"""Domain errors with a machine-readable reason.

Domain code raises these and never imports grpc; the grpc glue (`rpc_errors`) maps each
class to a status code in one table and attaches a google.rpc.ErrorInfo with the reason.
A reason must be listed by one of the protos' ErrorReason enums (`services.common.reasons`):
constructing an error with any other reason raises `reasons.UnknownReason`, so it cannot be sent.
"""

from __future__ import annotations

from collections.abc import Mapping

from services.common import reasons


class AgentplaneError(Exception):
    """Base of every domain error.

    `reason` is a stable UPPER_SNAKE_CASE identifier that clients can switch on (for example
    ``CHAT_NOT_FOUND``): the name of an ErrorReason enum value without its ``ERROR_REASON_``
    prefix. `domain` is that enum's proto package (``agentplane.chat.v1``), derived from the
    reason; `metadata` carries string details such as ids. Each class's default reason is its
    status code's name, listed by agentplane.common.v1.ErrorReason.
    """

    default_reason = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.domain = reasons.domain_of(self.reason)
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in (metadata or {}).items()}

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, reason={self.reason!r}, metadata={self.metadata!r})"

    def received(self, reason: str, domain: str) -> AgentplaneError:
        """Carry the reason and domain another service sent, unchecked (it may be newer than us).

        For `rpc_errors.from_rpc_error` only: our own errors take their reason through the
        constructor, which refuses reasons no enum lists.
        """
        self.reason, self.domain = reason, domain
        return self


class InvalidArgument(AgentplaneError):
    """A request field is missing or malformed; the message names the field."""

    default_reason = "INVALID_ARGUMENT"

    def __init__(
        self,
        field: str,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        meta = {"field": field, **(metadata or {})}
        super().__init__(f"{field}: {message}", reason=reason, metadata=meta)
        self.field = field


class NotFound(AgentplaneError):
    """The addressed resource does not exist (or the caller may not know it exists)."""

    default_reason = "NOT_FOUND"


class AlreadyExists(AgentplaneError):
    """A resource with the same identity already exists."""

    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(AgentplaneError):
    """The system is not in a state in which the operation can run."""

    default_reason = "FAILED_PRECONDITION"


class PermissionDenied(AgentplaneError):
    """The caller is known but may not do this."""

    default_reason = "PERMISSION_DENIED"


class Unauthenticated(AgentplaneError):
    """The caller's credentials are missing or invalid."""

    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(AgentplaneError):
    """A quota or limit was hit (usage limits, rate limits, sizes)."""

    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(AgentplaneError):
    """A dependency is temporarily unavailable; retrying later may succeed."""

    default_reason = "UNAVAILABLE"


class DeadlineExceeded(AgentplaneError):
    """The operation did not finish in time."""

    default_reason = "DEADLINE_EXCEEDED"


class Aborted(AgentplaneError):
    """A concurrency conflict (lost lease, stale generation); retry from the start."""

    default_reason = "ABORTED"


class Internal(AgentplaneError):
    """An invariant was broken; the message is shown to the caller, so keep it generic."""

    default_reason = "INTERNAL"
