"""The gRPC server factory every service uses, and graceful shutdown on SIGTERM/SIGINT.

`create_server` builds a grpc.aio server with the standard interceptors (metrics, request
context, errors, auth), health and reflection, and binds it; tests pass port 0 and read
the bound port from the returned `ServerHandle`. `ServerHandle.watch_health(probe)` makes health
follow a dependency (the database): NOT_SERVING while the probe fails, SERVING once it passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import tls, tracing
from services.common.auth import DEFAULT_MAX_TOKEN_LIFETIME_SECONDS
from services.common.interceptors import (
    AUTH_EXEMPT_PREFIXES,
    AuthInterceptor,
    ErrorInterceptor,
    RequestContextInterceptor,
)
from services.common.keys import Keys, KeyUnavailable
from services.common.metrics import MetricsInterceptor, RpcMetrics
from services.common.nul_guard import NulGuardInterceptor
from services.common.oidc import OidcSettings, OidcVerifier, verifier_for
from services.common.settings import Settings, SettingsError
from services.common.tracing_interceptor import TracingInterceptor

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
SERVER_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    # Accept client keepalive pings every 10 s, even on idle connections (long streams).
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.so_reuseport", 0),
]
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
# Health name for liveness: SERVING while the process serves, whatever its dependencies do.
LIVENESS_SERVICE = "liveness"
# How often a started server runs its health probes, and how long one may take before it counts
# as failed.
HEALTH_PROBE_INTERVAL_SECONDS = 3.0
HEALTH_PROBE_TIMEOUT_SECONDS = 2.0

HealthProbe = Callable[[], Awaitable[object]]
"""A dependency check: returns when the dependency works, raises (or times out) when it does not."""


def default_interceptors(
    keys: Keys,
    metrics: RpcMetrics | None = None,
    *,
    exempt_prefixes: tuple[str, ...] = AUTH_EXEMPT_PREFIXES,
    max_token_lifetime_seconds: float = DEFAULT_MAX_TOKEN_LIFETIME_SECONDS,
    is_revoked: Callable[[str], bool] | None = None,
    oidc: OidcSettings | None = None,
) -> list[grpc.aio.ServerInterceptor]:
    """The standard chain, outermost first: metrics, tracing (only while on: `tracing.configure`
    runs before servers are built), request context, errors, auth, NUL guard."""
    traced: list[grpc.aio.ServerInterceptor] = [TracingInterceptor()] if tracing.enabled() else []
    return [
        MetricsInterceptor(metrics or RpcMetrics.for_registry()),
        *traced,
        RequestContextInterceptor(),
        ErrorInterceptor(),
        AuthInterceptor(keys, exempt_prefixes, max_token_lifetime_seconds, is_revoked, _oidc_verifier(oidc)),
        NulGuardInterceptor(),
    ]


def _oidc_verifier(oidc: OidcSettings | None) -> OidcVerifier | None:
    """The identity provider's verifier (its keys are fetched when the first token needs them)."""
    return verifier_for(oidc) if oidc is not None else None


@dataclass
class ServerHandle:
    """A built server: the grpc.aio server, its bound port, and its health servicer."""

    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    service_names: list[str]
    host: str = "127.0.0.1"
    # The service's short name ("chat") and collectors, for the health gauges.
    name: str = ""
    metrics: RpcMetrics | None = None
    health_probe_interval: float = HEALTH_PROBE_INTERVAL_SECONDS
    health_probe_timeout: float = HEALTH_PROBE_TIMEOUT_SECONDS
    _on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    _stopped: bool = False
    _probes: list[tuple[str, HealthProbe]] = field(default_factory=list)
    _prober: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        """`host:port` to dial this server (loopback when bound to all interfaces)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "[::]", "") else self.host
        return f"{host}:{self.port}"

    def on_stop(self, callback: Callable[[], Awaitable[None]]) -> None:
        """Run `callback` after the server has stopped (close pools, cancel workers), last added first."""
        self._on_stop.append(callback)

    def watch_health(self, probe: HealthProbe, name: str = "database") -> None:
        """Make health follow `probe` once started: every `health_probe_interval` seconds each probe
        runs (within `health_probe_timeout`); while any fails, every service (and "") answers
        NOT_SERVING, and SERVING again once all pass. `name` is what the logs call the dependency."""
        self._probes.append((name, probe))

    async def start(self) -> None:
        """Start serving and mark every service (and the server, "") SERVING; start the health probes.

        The health name ``liveness`` says only that the process serves: it stays SERVING while a
        dependency is down (Kubernetes' liveness probe asks it, so an outage of the database takes
        pods out of rotation without restarting them)."""
        await self.server.start()
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self.set_serving(True)
        if self._probes and self._prober is None:
            self._prober = asyncio.create_task(self._probe_forever(), name="health-probes")

    async def set_serving(self, serving: bool) -> None:
        """Set the health status of every service (and of the server, "") at once."""
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ["", *self.service_names]:
            await self.health.set(name, status)
        if self.metrics is not None:
            self.metrics.serving.labels(self.name).set(1 if serving else 0)

    async def stop(self, grace: float | None = None) -> None:
        """Go NOT_SERVING, refuse new calls, let in-flight calls finish within `grace` seconds, clean up."""
        if self._stopped:
            return
        self._stopped = True
        if self._prober is not None:
            self._prober.cancel()
            # Bounded: a probe that ignores cancellation must not hold up the shutdown.
            await asyncio.wait([self._prober], timeout=self.health_probe_timeout + 1)
        await self.set_serving(False)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.server.stop(grace)
        for callback in reversed(self._on_stop):
            try:
                await callback()
            except Exception:
                log.exception("shutdown callback failed")

    async def _probe_forever(self) -> None:
        healthy = True
        while not self._stopped:
            failed: list[str] = []
            for name, probe in self._probes:
                try:
                    # Not asyncio.wait_for: on 3.11 it can swallow a cancellation that arrives as
                    # the probe completes, and stop() would wait for a task that never ends.
                    async with asyncio.timeout(self.health_probe_timeout):
                        await probe()
                except Exception as exc:  # TimeoutError included: a hung dependency is a failed one
                    failed.append(name)
                    if healthy:
                        log.warning(
                            "health probe failed: going NOT_SERVING",
                            extra={"dependency": name, "error": str(exc) or type(exc).__name__},
                        )
                if self.metrics is not None:
                    self.metrics.dependency_up.labels(self.name, name).set(0 if name in failed else 1)
            if self._stopped:
                return
            if failed and healthy:
                healthy = False
                await self.set_serving(False)
            elif not failed and not healthy:
                healthy = True
                log.info("health probes pass again: SERVING")
                await self.set_serving(True)
            await asyncio.sleep(self.health_probe_interval)


def create_server(
    settings: Settings,
    service_name: str,
    register: Callable[[grpc.aio.Server], None],
    full_service_names: Sequence[str],
    interceptors: Sequence[grpc.aio.ServerInterceptor] | None = None,
    *,
    metrics: RpcMetrics | None = None,
    options: Sequence[tuple[str, Any]] = (),
    is_revoked: Callable[[str], bool] | None = None,
    tls_settings: tls.TLSSettings | None = None,
) -> ServerHandle:
    """Build and bind (but not start) the server for `service_name`.

    `register(server)` adds the service's servicers; `full_service_names` (for example
    ``["agentplane.chat.v1.ChatService"]``) get health SERVING and reflection. The port comes
    from ``settings.service(service_name)``; 0 binds an ephemeral port, returned in the handle.
    `interceptors` default to `default_interceptors(settings.keys, metrics)`.
    It serves TLS or plaintext as `tls_settings` (default `tls.current()`, from the environment)
    say; plaintext off loopback without `AGENTPLANE_TLS=off` raises `SettingsError`.
    """
    svc = settings.service(service_name)
    chain = (
        list(interceptors)
        if interceptors is not None
        else default_interceptors(
            settings.keys,
            metrics,
            max_token_lifetime_seconds=settings.max_token_lifetime_seconds,
            is_revoked=is_revoked,
            oidc=settings.oidc,
        )
    )
    server = grpc.aio.server(interceptors=chain, options=[*SERVER_OPTIONS, *options])
    register(server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(full_service_names)
    reflection.enable_server_reflection([*names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = (tls_settings or tls.current()).bind(server, svc.listen_address, service_name)
    if port == 0:
        raise OSError(f"could not bind {service_name} to {svc.listen_address}")
    handle = ServerHandle(
        server=server,
        port=port,
        health=health_servicer,
        service_names=names,
        host=svc.host,
        name=service_name,
        metrics=metrics or RpcMetrics.for_registry(),
    )
    return handle


async def run_until_signal(
    handle: ServerHandle,
    grace: float,
    signals: Sequence[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
    on_ready: Callable[[], None] | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then stop gracefully.

    On the signal, health goes NOT_SERVING for every service, then `server.stop(grace)`
    refuses new calls and lets in-flight ones finish for up to `grace` seconds.
    `on_ready` is called once the signal handlers are installed.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed: list[signal.Signals] = []
    for sig in signals:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    if on_ready is not None:
        on_ready()
    try:
        # Not server.wait_for_termination(): cancelling that wait cancels grpc's own
        # shutdown future and breaks a later server.stop().
        await stop.wait()
        log.info("shutting down", extra={"grace_seconds": grace})
        await handle.stop(grace)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def run_service(
    settings: Settings,
    service_name: str,
    build: Callable[[Settings], Awaitable[ServerHandle]],
) -> None:
    """The body of `agentplane serve NAME`: logging, metrics endpoint, build, start, serve until a signal."""
    from services.common.logs import configure_logging, register_secret
    from services.common.metrics import start_metrics_server

    configure_logging(service_name, settings.log_level)
    # Before the server is built: its interceptor chain includes tracing only when it is on.
    if tracing.configure(service_name):
        log.info(
            "tracing on: exporting spans over OTLP", extra={"endpoint": tracing.endpoint_from(os.environ)}
        )
    # This process keeps its own key and the public key set, nothing else the environment offered.
    settings = dataclasses.replace(settings, keys=settings.keys.only(service_name))
    try:
        # Fail at start, saying which key is missing, rather than on the first call.
        settings.keys.keyset.get("")
        settings.keys.signer_for(f"service:{service_name}")
    except KeyUnavailable as exc:
        raise SettingsError(str(exc)) from None
    register_secret(settings.encryption_key)
    svc = settings.service(service_name)
    metrics_server = start_metrics_server(svc.metrics_port, svc.host) if svc.metrics_port else None
    handle = await build(settings)
    await handle.start()
    log.info(
        "serving",
        extra={"address": svc.listen_address, "port": handle.port, "metrics_port": svc.metrics_port},
    )
    try:
        await run_until_signal(handle, settings.shutdown_grace_seconds)
    finally:
        if metrics_server is not None:
            metrics_server.stop()
        tracing.shutdown()
        log.info("stopped")
