"""Requests whose strings hold NUL characters are refused before any handler runs.

Postgres stores no U+0000 in `text` or `jsonb`, and protobuf strings may carry it: a chat title, a
workspace name, a user id with one failed deep inside a statement as INTERNAL. `NulGuardInterceptor`
(last in `server.default_interceptors`, so after authentication and inside the error translation)
walks the request of every unary call and of every server stream and answers INVALID_ARGUMENT
naming the first field that holds one. Client streams (the workspace agent's connection, whose
tool output may hold any character) are left to their handlers. What a service receives as an
answer and stores (a model's output in the chat service) goes through `scrub` instead.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from services.common.errors import InvalidArgument

M = TypeVar("M", bound=Message)
NUL = "\x00"
REPLACEMENT = "\ufffd"


def nul_field(message: Message, prefix: str = "") -> str | None:
    """The path of the first string field (map keys and values, lists, nested messages included)
    of `message` that contains a NUL character, or None."""
    for field, value in message.ListFields():
        path = f"{prefix}{field.name}"
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            value_field = field.message_type.fields_by_name["value"]
            for key, item in value.items():
                if isinstance(key, str) and NUL in key:
                    return f"{path}[key]"
                found = _value_nul(value_field, item, f"{path}[{key!r}]")
                if found:
                    return found
        elif field.is_repeated:
            for i, item in enumerate(value):
                found = _value_nul(field, item, f"{path}[{i}]")
                if found:
                    return found
        else:
            found = _value_nul(field, value, path)
            if found:
                return found
    return None


def _value_nul(field: FieldDescriptor, value: Any, path: str) -> str | None:
    if field.type == FieldDescriptor.TYPE_STRING:
        return path if NUL in value else None
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return nul_field(value, f"{path}.")
    return None


def scrub(message: M) -> M:
    """`message` with every NUL character of its strings replaced by U+FFFD, in place.

    For what a service takes from outside and must store (a model's output): text, reasoning and
    tool-call arguments with a raw NUL are kept as readable text instead of failing the write.
    """
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            continue  # no map in what is scrubbed today; keys could not be rewritten in place anyway
        if field.type == FieldDescriptor.TYPE_STRING:
            if field.is_repeated:
                value[:] = [v.replace(NUL, REPLACEMENT) for v in value]
            elif NUL in value:
                setattr(message, field.name, value.replace(NUL, REPLACEMENT))
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value if field.is_repeated else [value]:
                scrub(item)
    return message


def check(request: object) -> None:
    """InvalidArgument naming the field when a string of `request` contains NUL (a handler without a
    deserializer gets bytes: nothing to check)."""
    if not isinstance(request, Message):
        return
    path = nul_field(request)
    if path is not None:
        raise InvalidArgument(path, "must not contain NUL characters (U+0000)")


class NulGuardInterceptor(grpc.aio.ServerInterceptor):
    """Checks the request of unary calls and server streams with `check` before the handler."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return handler
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary(request: Any, context: Any) -> Any:
                check(request)
                result = inner(request, context)
                return await result if inspect.isawaitable(result) else result

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            # Writes with context.write rather than yielding, as `interceptors.wrap_handler` does.
            async def streaming(request: Any, context: Any) -> None:
                check(request)
                result = inner_stream(request, context)
                if inspect.isawaitable(result):
                    await result
                    return
                try:
                    async for item in result:
                        await context.write(item)
                finally:
                    await result.aclose()

            return grpc.unary_stream_rpc_method_handler(
                streaming,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler  # type: ignore[no-any-return]
