"""grpc glue for domain errors: the one table of status codes, and ErrorInfo encoding/decoding.

Servers never call this directly: `interceptors.ErrorInterceptor` turns raised
`AgentplaneError`s into statuses. Clients use `reason_of(rpc_error, SomeErrorReason)` to switch on
the machine-readable reason as an enum value, `error_info(rpc_error)` for the reason string and
metadata, or `from_rpc_error` to get the domain error back.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common import reasons
from services.common.errors import (
    Aborted,
    AgentplaneError,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

V = TypeVar("V", bound=int)

STATUS_DETAILS_KEY = "grpc-status-details-bin"
# gRPC's retry pushback (gRFC A6): a negative value tells the caller's retry policy not to retry.
RETRY_PUSHBACK_KEY = "grpc-retry-pushback-ms"
# Every UNAVAILABLE a handler raises carries pushback -1, so no channel's retry policy repeats it
# (`client.service_config` retries UNAVAILABLE only on methods safe to repeat, and only because
# there it usually means the call never reached a handler). A handler that answers UNAVAILABLE
# already ran: its database connection may have been lost midway (the request may have taken
# effect), it waited out the pool's timeout, inference already called the provider (and retried
# it), or it forwards a dependency's UNAVAILABLE that the inner channel already retried. A repeat
# by the channel would apply a call twice or multiply retries per hop; the caller decides instead.
# A status travels in the call's trailers, which gRPC caps at 16 KiB in all; a larger one is dropped
# and the caller gets RESOURCE_EXHAUSTED "Stream removed" with no reason at all. Errors that quote
# a request value (a malformed id, a name) would do that for a huge value, so the message and each
# ErrorInfo metadata value are cut: even percent-encoded (non-ASCII triples in size) they fit.
MAX_STATUS_MESSAGE_BYTES = 2048
MAX_METADATA_VALUE_BYTES = 256


class _Status(collections.namedtuple("_Status", ("code", "details", "trailing_metadata")), grpc.Status):
    pass


# The one table mapping domain errors to gRPC status codes.
STATUS_CODES: dict[type[AgentplaneError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    Aborted: grpc.StatusCode.ABORTED,
    Internal: grpc.StatusCode.INTERNAL,
    AgentplaneError: grpc.StatusCode.UNKNOWN,
}
_ERRORS_BY_CODE: dict[grpc.StatusCode, type[AgentplaneError]] = {
    code: cls for cls, code in STATUS_CODES.items() if cls is not AgentplaneError
}


def status_code_for(error: AgentplaneError) -> grpc.StatusCode:
    """The status code of a domain error (the nearest class in the table)."""
    for cls in type(error).__mro__:
        if cls in STATUS_CODES:
            return STATUS_CODES[cls]  # type: ignore[index]
    return grpc.StatusCode.UNKNOWN


def bounded(text: str, limit: int) -> str:
    """`text` cut to at most `limit` bytes of UTF-8 (whole characters), saying that it was cut."""
    raw = text.encode()
    if len(raw) <= limit:
        return text
    return raw[:limit].decode(errors="ignore") + " ... (truncated)"


def to_status(error: AgentplaneError) -> grpc.Status:
    """A grpc.Status carrying the code, message, and an ErrorInfo with reason, domain and metadata.

    UNAVAILABLE also carries retry pushback -1: channels do not repeat a handler's answer. The
    message and metadata values are bounded (`MAX_STATUS_MESSAGE_BYTES`, `MAX_METADATA_VALUE_BYTES`).
    """
    code = status_code_for(error)
    details = {k: bounded(v, MAX_METADATA_VALUE_BYTES) for k, v in error.metadata.items()}
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=error.domain, metadata=details)
    detail = any_pb2.Any()
    detail.Pack(info)
    message = bounded(error.message, MAX_STATUS_MESSAGE_BYTES)
    proto = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    status = rpc_status.to_status(proto)
    if code is grpc.StatusCode.UNAVAILABLE:
        metadata = (*status.trailing_metadata, (RETRY_PUSHBACK_KEY, "-1"))
        return _Status(status.code, status.details, metadata)
    return status


def _status_proto(rpc_error: Any) -> status_pb2.Status | None:
    metadata = rpc_error.trailing_metadata() if hasattr(rpc_error, "trailing_metadata") else None
    for key, value in metadata or ():
        if key == STATUS_DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    return None


def _error_info(rpc_error: Any) -> error_details_pb2.ErrorInfo | None:
    status = _status_proto(rpc_error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def error_info(rpc_error: grpc.RpcError) -> tuple[str, dict[str, str]] | None:
    """The (reason, metadata) of the ErrorInfo in a failed call's status details, if any."""
    info = _error_info(rpc_error)
    return (info.reason, dict(info.metadata)) if info is not None else None


def reason_of(rpc_error: grpc.RpcError, enum: _EnumTypeWrapper[V]) -> V:
    """The value of the ErrorReason `enum` that a failed call's ErrorInfo names, else its zero value.

    ``reason_of(exc, chat_reasons.ErrorReason) == chat_reasons.ERROR_REASON_CHAT_BUSY``: the
    ErrorInfo's domain must be `enum`'s package, so another service's reason never matches by
    number. Zero (``ERROR_REASON_UNSPECIFIED``) when there is no ErrorInfo, the domain is another
    enum's, or the reason is newer than this client; act on the status code then.
    """
    info = _error_info(rpc_error)
    if info is None:
        return reasons.value_of("", "", enum)
    return reasons.value_of(info.reason, info.domain, enum)


def from_rpc_error(rpc_error: grpc.RpcError) -> AgentplaneError:
    """Turn a failed call back into the domain error (class by status code, reason from ErrorInfo).

    Useful when one service calls another and wants to re-raise what it got: the reason, its
    domain and the metadata survive the hop.
    """
    code: grpc.StatusCode = rpc_error.code()  # type: ignore[attr-defined]
    message: str = rpc_error.details() or code.name  # type: ignore[attr-defined]
    cls = _ERRORS_BY_CODE.get(code, Unavailable if code is grpc.StatusCode.CANCELLED else AgentplaneError)
    info = _error_info(rpc_error)
    # A status without ErrorInfo (a transport failure, another server) gets the generic reason of
    # the code it carries, which agentplane.common.v1.ErrorReason lists by the same name.
    reason, domain = (info.reason, info.domain) if info is not None else (code.name, reasons.COMMON_DOMAIN)
    metadata = dict(info.metadata) if info is not None else {}
    if cls is InvalidArgument:
        field = metadata.get("field", "")
        err: AgentplaneError = InvalidArgument(field, message, metadata=metadata)
        err.message = message  # keep the server's wording, which already names the field
        err.args = (message,)
    else:
        err = cls(message, metadata=metadata)
    # The sender's reason and domain, unchecked: a newer service may send reasons we do not know.
    return err.received(reason, domain)
