"""grpc glue for domain errors: the one table of status codes, and ErrorInfo encoding/decoding.

Servers never call this directly: `interceptors.ErrorInterceptor` turns raised
`AgentplaneError`s into statuses. Clients use `error_info(rpc_error)` to read the
machine-readable reason, or `from_rpc_error` to get the domain error back.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from services.common.errors import (
    ERROR_DOMAIN,
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

STATUS_DETAILS_KEY = "grpc-status-details-bin"

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


def to_status(error: AgentplaneError) -> grpc.Status:
    """A grpc.Status carrying the code, message, and an ErrorInfo with reason and metadata."""
    code = status_code_for(error)
    info = error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    proto = status_pb2.Status(code=code.value[0], message=error.message, details=[detail])
    return rpc_status.to_status(proto)


def _status_proto(rpc_error: Any) -> status_pb2.Status | None:
    metadata = rpc_error.trailing_metadata() if hasattr(rpc_error, "trailing_metadata") else None
    for key, value in metadata or ():
        if key == STATUS_DETAILS_KEY:
            return status_pb2.Status.FromString(value)
    return None


def error_info(rpc_error: grpc.RpcError) -> tuple[str, dict[str, str]] | None:
    """The (reason, metadata) of the ErrorInfo in a failed call's status details, if any."""
    status = _status_proto(rpc_error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info.reason, dict(info.metadata)
    return None


def from_rpc_error(rpc_error: grpc.RpcError) -> AgentplaneError:
    """Turn a failed call back into the domain error (class by status code, reason from ErrorInfo).

    Useful when one service calls another and wants to re-raise what it got: the reason
    and metadata survive the hop.
    """
    code: grpc.StatusCode = rpc_error.code()  # type: ignore[attr-defined]
    message: str = rpc_error.details() or code.name  # type: ignore[attr-defined]
    cls = _ERRORS_BY_CODE.get(code, Unavailable if code is grpc.StatusCode.CANCELLED else AgentplaneError)
    info = error_info(rpc_error)
    reason, metadata = info if info else (code.name, {})
    if cls is InvalidArgument:
        field = metadata.get("field", "")
        err = InvalidArgument(field, message, reason=reason, metadata=metadata)
        err.message = message  # keep the server's wording, which already names the field
        err.args = (message,)
        return err
    return cls(message, reason=reason, metadata=metadata)
