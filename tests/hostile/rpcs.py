"""Every RPC of the API, read from the generated descriptors, and a generic way to call and judge one.

`ALL_RPCS` lists each method of each service declared under proto/agentplane (every generated
module is imported and its file's services read), with the server that serves it. `invoke` calls
any of them over a real channel with a message of its input type; `check_error` is the rule every
failure must satisfy: never INTERNAL or UNKNOWN (or UNIMPLEMENTED), and always an ErrorInfo whose
reason one of the ErrorReason enums lists, in that enum's domain, with a message for people.
"""

from __future__ import annotations

import asyncio
import importlib
import pkgutil
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import agentplane
import grpc
import grpc.aio
from google.protobuf import descriptor as d
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common import reasons
from services.common.rpc_errors import STATUS_DETAILS_KEY

# Which server serves a proto package's services.
SERVER_OF_PACKAGE = {
    "agentplane.config.v1": "config",
    "agentplane.inference.v1": "inference",
    "agentplane.toolexec.v1": "toolexec",
    "agentplane.chat.v1": "chat",
}
# Never a valid answer, whatever the request: a bug, an unmapped failure, or a missing handler.
FORBIDDEN_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNIMPLEMENTED)
CALL_TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class Rpc:
    """One method of one service."""

    service: str
    method: d.MethodDescriptor
    server: str

    @property
    def name(self) -> str:
        """``ChatService.GetChat``."""
        return f"{self.service.rsplit('.', 1)[1]}.{self.method.name}"

    @property
    def path(self) -> str:
        """``/agentplane.chat.v1.ChatService/GetChat``."""
        return f"/{self.service}/{self.method.name}"

    @property
    def request_class(self) -> type[Message]:
        """The input message class."""
        return GetMessageClass(self.method.input_type)

    @property
    def response_class(self) -> type[Message]:
        """The output message class."""
        return GetMessageClass(self.method.output_type)

    def __repr__(self) -> str:
        return self.name


def _services() -> list[d.ServiceDescriptor]:
    found: dict[str, d.ServiceDescriptor] = {}
    for info in pkgutil.walk_packages(agentplane.__path__, "agentplane."):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(info.name)
        for service in module.DESCRIPTOR.services_by_name.values():
            found[service.full_name] = service
    return [found[name] for name in sorted(found)]


def _all_rpcs() -> list[Rpc]:
    out = []
    for service in _services():
        server = SERVER_OF_PACKAGE[service.file.package]
        out += [Rpc(service.full_name, m, server) for m in service.methods]
    return out


ALL_RPCS: list[Rpc] = _all_rpcs()


def rpc(name: str) -> Rpc:
    """The RPC called `name` (``ChatService.GetChat``)."""
    for r in ALL_RPCS:
        if r.name == name:
            return r
    raise KeyError(name)


def error_info(exc: grpc.aio.AioRpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo in a failed call's status details, if any."""
    for key, value in exc.trailing_metadata() or ():
        if key == STATUS_DETAILS_KEY:
            status = status_pb2.Status.FromString(value)  # type: ignore[arg-type]
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return info
    return None


def check_error(exc: grpc.aio.AioRpcError, what: str) -> error_details_pb2.ErrorInfo:
    """Fail unless `exc` is a well-formed error of our API; returns its ErrorInfo."""
    code = exc.code()
    assert code not in FORBIDDEN_CODES, f"{what}: answered {code.name}: {exc.details()}"
    info = error_info(exc)
    assert info is not None, f"{what}: {code.name} without ErrorInfo: {exc.details()}"
    assert info.reason in reasons.OWNERS, f"{what}: reason {info.reason!r} is in no ErrorReason enum"
    owner = reasons.domain_of(info.reason)
    assert info.domain == owner, f"{what}: reason {info.reason} sent in domain {info.domain!r}, not {owner!r}"
    assert (exc.details() or "").strip(), f"{what}: {code.name} {info.reason} with an empty message"
    return info


async def invoke(
    channel: grpc.aio.Channel,
    target: Rpc,
    request: Message,
    metadata: Sequence[tuple[str, str]],
    *,
    stream_window: float = 0.3,
    refusal_window: float | None = None,
) -> list[Message]:
    """Call `target` with `request`; the responses, or the AioRpcError raised.

    A server stream is read for at most `stream_window` seconds: a stream that is accepted stays
    open (StreamChat, WatchChats) and its errors come first, so what it has not said by then is
    not an error of this request. A client stream sends `request` alone, then closes; before it
    does, it waits `refusal_window` (default `stream_window`) for a server refusing the caller.
    """
    m = target.method
    serialize = type(request).SerializeToString
    deserialize = target.response_class.FromString
    md = list(metadata)
    if not m.client_streaming and not m.server_streaming:
        unary = channel.unary_unary(
            target.path, request_serializer=serialize, response_deserializer=deserialize
        )
        return [await unary(request, metadata=md, timeout=CALL_TIMEOUT_SECONDS)]
    if m.client_streaming:
        bidi = channel.stream_stream(
            target.path, request_serializer=serialize, response_deserializer=deserialize
        )
        call: Any = bidi(metadata=md, timeout=CALL_TIMEOUT_SECONDS)
        # A server that refuses the caller ends the call before reading anything, and a message
        # written meanwhile fails on our side as a local INTERNAL that hides the server's status.
        # So the message goes only to a server still waiting for it after the window.
        ended = asyncio.ensure_future(call.code())
        window = stream_window if refusal_window is None else refusal_window
        done, _ = await asyncio.wait([ended], timeout=window) if window > 0 else (set(), set())
        if not done:
            await call.write(request)
            await call.done_writing()
    else:
        stream = channel.unary_stream(
            target.path, request_serializer=serialize, response_deserializer=deserialize
        )
        call = stream(request, metadata=md, timeout=CALL_TIMEOUT_SECONDS)
    out: list[Message] = []
    try:
        async with asyncio.timeout(stream_window):
            async for item in call:
                out.append(item)
    except TimeoutError:
        pass
    finally:
        call.cancel()
    return out


async def assert_serving(channel: grpc.aio.Channel, what: str) -> None:
    """The server behind `channel` still answers its health check SERVING."""
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING, f"{what}: health is {reply.status}"
