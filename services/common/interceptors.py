"""grpc.aio server interceptors: request context, authentication, and domain-error translation.

Each interceptor wraps the method handler's behaviour in an async "scope" that runs in the
RPC's own task, so context variables set there (request id, identity) are visible to the
servicer and isolated per call; unary and streaming RPCs are handled alike.
Order matters: `server.default_interceptors` puts metrics outermost, then request
context, then errors, then auth (so auth failures become proper statuses).
"""

from __future__ import annotations

import abc
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import grpc
import grpc.aio

from services.common import auth, db, logs
from services.common.errors import AgentplaneError
from services.common.keys import Keys
from services.common.oidc import OidcVerifier
from services.common.rpc_errors import status_code_for, to_status

log = logging.getLogger(__name__)

# Health checks answer without a token (probes need them); reflection, like every other RPC, needs
# one (`grpcurl -H "authorization: Bearer $TOKEN" ...`): nothing is unauthenticated on a service's
# gRPC port but health.
AUTH_EXEMPT_PREFIXES: tuple[str, ...] = ("/grpc.health.v1.Health/",)
# Answers about the request, not about the service: logged at DEBUG (a client that keeps asking
# for a deleted chat must not flood the logs). Every other domain error is logged at WARNING.
CLIENT_ERROR_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.CANCELLED,
    }
)


def metadata_value(context: grpc.aio.ServicerContext[Any, Any], key: str) -> str | None:
    """The first value of metadata `key` on the incoming call, or None."""
    for k, v in context.invocation_metadata() or ():
        if k == key:
            return v if isinstance(v, str) else v.decode()
    return None


class ScopeInterceptor(grpc.aio.ServerInterceptor, abc.ABC):
    """Base: run every RPC's behaviour inside `scope(method, context)`."""

    @abc.abstractmethod
    def scope(
        self, method: str, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AbstractAsyncContextManager[None]:
        """An async context manager entered before the behaviour and exited after it (or its stream) ends."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        return wrap_handler(handler, handler_call_details.method, self.scope)  # type: ignore[attr-defined]


def wrap_handler(
    handler: grpc.RpcMethodHandler,
    method: str,
    scope: Callable[[str, Any], AbstractAsyncContextManager[None]],
) -> grpc.RpcMethodHandler:
    """A copy of `handler` whose behaviour runs inside `scope`."""
    h: Any = handler
    if h.unary_unary or h.stream_unary:
        inner = h.unary_unary or h.stream_unary

        async def unary(request: Any, context: Any) -> Any:
            async with scope(method, context):
                result = inner(request, context)
                if inspect.isawaitable(result):
                    result = await result
                return result

        factory = (
            grpc.unary_unary_rpc_method_handler if h.unary_unary else grpc.stream_unary_rpc_method_handler
        )
        return factory(
            unary, request_deserializer=h.request_deserializer, response_serializer=h.response_serializer
        )

    inner_stream = h.unary_stream or h.stream_stream

    # A coroutine that writes with context.write(), not an async generator that yields: grpc
    # cancels a call whose client went away while it sends a message, outside a generator's frame,
    # and then drops the suspended generator; the event loop finalizes it later in another task and
    # context, where the scopes' context variables cannot be reset (two "was created in a different
    # Context" tracebacks per cancelled stream). Here cancellation unwinds the scopes, and closes the
    # servicer's generator, in the call's own task.
    async def streaming(request: Any, context: Any) -> None:
        async with scope(method, context):
            result = inner_stream(request, context)
            if inspect.isawaitable(result):  # an inner wrapper, or a behaviour that writes itself
                await result
                return
            try:
                async for item in result:
                    await context.write(item)
            finally:
                await result.aclose()

    factory = (
        grpc.unary_stream_rpc_method_handler if h.unary_stream else grpc.stream_stream_rpc_method_handler
    )
    return factory(
        streaming, request_deserializer=h.request_deserializer, response_serializer=h.response_serializer
    )


class RequestContextInterceptor(ScopeInterceptor):
    """Takes `x-request-id` from the metadata (or makes one), sets it for logs and outgoing calls."""

    @asynccontextmanager
    async def scope(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
        request_id = metadata_value(context, logs.REQUEST_ID_METADATA_KEY) or logs.new_request_id()
        token = logs.set_request_id(request_id)
        start = time.perf_counter()
        try:
            yield
        finally:
            log.debug(
                "rpc finished", extra={"method": method, "duration_ms": (time.perf_counter() - start) * 1e3}
            )
            logs.reset_request_id(token)


class ErrorInterceptor(ScopeInterceptor):
    """Turns raised domain errors into statuses with ErrorInfo, a failure of the database into
    UNAVAILABLE (`db.database_error`), and anything else into INTERNAL."""

    @asynccontextmanager
    async def scope(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
        try:
            yield
        except AgentplaneError as exc:
            code = status_code_for(exc)
            level = logging.DEBUG if code in CLIENT_ERROR_CODES else logging.WARNING
            if log.isEnabledFor(level):
                log.log(
                    level,
                    "rpc failed: %s",
                    exc,
                    extra={"method": method, "code": code.name, "reason": exc.reason},
                )
            await context.abort_with_status(to_status(exc))
        except grpc.aio.AbortError:
            raise
        except NotImplementedError:
            # The generated base servicers raise this for RPCs a service does not implement yet.
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented")
        except Exception as exc:
            database = db.database_error(exc)
            if database is not None:
                # A condition of the deployment, not a bug: no traceback, the cause in one line.
                log.warning(
                    "rpc failed: %s",
                    database,
                    extra={
                        "method": method,
                        "reason": database.reason,
                        "error": f"{type(exc).__name__}: {exc}",
                    },
                )
                await context.abort_with_status(to_status(database))
            log.exception("unexpected error in %s", method, extra={"method": method})
            rid = logs.current_request_id()
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error (request id {rid})")


class AuthInterceptor(ScopeInterceptor):
    """Verifies the bearer token and on-behalf-of metadata; sets `auth.current_identity()`."""

    def __init__(
        self,
        keys: Keys,
        exempt_prefixes: tuple[str, ...] = AUTH_EXEMPT_PREFIXES,
        max_lifetime_seconds: float = auth.DEFAULT_MAX_TOKEN_LIFETIME_SECONDS,
        is_revoked: Callable[[str], bool] | None = None,
        oidc: OidcVerifier | None = None,
    ) -> None:
        self._keys = keys
        self._oidc = oidc
        self._exempt = exempt_prefixes
        self._max_lifetime = max_lifetime_seconds
        self._is_revoked = is_revoked

    @asynccontextmanager
    async def scope(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
        if method.startswith(self._exempt):
            yield
            return
        authorization = metadata_value(context, auth.AUTHORIZATION_METADATA_KEY)
        oidc = None
        if self._oidc is not None and authorization:
            token = authorization.partition(" ")[2].strip()
            if self._oidc.issues(token):
                # The provider's token: fetch its keys (asynchronously) if this one needs new ones.
                await self._oidc.prepare(token)
                oidc = self._oidc
        identity = auth.authenticate(
            self._keys,
            authorization,
            metadata_value(context, auth.ON_BEHALF_OF_METADATA_KEY),
            self._max_lifetime,
            self._is_revoked,
            oidc,
        )
        with auth.identity_scope(identity):
            yield
