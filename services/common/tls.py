"""TLS and mutual TLS for every gRPC server and client of the kit.

The configuration is parsed once from the environment into a frozen `TLSSettings`
(`tls.current()`); `create_server` and `create_channel` use it unless given their own
(`tls_settings=`, as tests do).

- `AGENTPLANE_TLS`: `auto` (default: TLS when the files below are set), `on` (TLS required),
  `off` (plaintext on purpose, also off loopback).
- `AGENTPLANE_TLS_CERT_FILE`, `AGENTPLANE_TLS_KEY_FILE`: the PEM certificate chain and key this
  process presents, as a server and as a client (set both or neither).
- `AGENTPLANE_TLS_CA_FILE`: PEM CA bundle that verifies servers (clients) and client
  certificates (servers).
- `AGENTPLANE_TLS_CLIENT_AUTH`: `require` (default with a CA file) or `none` (default without):
  whether servers require a client certificate signed by the CA. `AGENTPLANE_<SVC>_TLS_CLIENT_AUTH`
  sets it for one service.
- `AGENTPLANE_TLS_SERVER_NAME`: the name clients expect in every server certificate (default: the
  host they dial).

Servers serve TLS when they have a certificate and a key, through
`grpc.dynamic_ssl_server_credentials`: before every new handshake gRPC asks for the current
configuration, and the files are read again when their stat signature (mtime, size, inode)
changed, so a certificate, key or CA replaced on disk (cert-manager swaps a Secret volume's
files atomically) is used by the next connection without a restart. Files that cannot be used
(a half-written pair, a key that does not match its certificate) are logged and the last good
ones kept. Without TLS, a server binds only a loopback address (or a Unix socket) unless
`AGENTPLANE_TLS=off` says plaintext is intended: it refuses with `SettingsError` otherwise.

Clients dial TLS when they have a CA file or a certificate (or `AGENTPLANE_TLS=on`; no CA
file means the system's roots) and present their certificate when they have one. Their
channels (`ReloadingChannel`) look at the files at most every `RELOAD_CHECK_SECONDS` and
make new calls on a channel with the new credentials when they changed; calls already
running finish on the old one.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.common.settings import SERVICE_NAMES, SettingsError

log = logging.getLogger(__name__)

MODES = ("auto", "on", "off")
CLIENT_AUTH_MODES = ("require", "none")
# How often a client channel looks at its files (servers look before every handshake).
RELOAD_CHECK_SECONDS = 1.0

CERT_VAR = "AGENTPLANE_TLS_CERT_FILE"
KEY_VAR = "AGENTPLANE_TLS_KEY_FILE"
CA_VAR = "AGENTPLANE_TLS_CA_FILE"

_Stat = tuple[int, int, int, int] | None
_Signature = tuple[_Stat, _Stat, _Stat]


@dataclass(frozen=True)
class TLSSettings:
    """How this process's gRPC servers and clients use TLS (see the module docstring)."""

    mode: str = "auto"
    cert_file: str | None = None
    key_file: str | None = None
    ca_file: str | None = None
    client_auth: str = "none"
    service_client_auth: Mapping[str, str] = field(default_factory=dict)
    server_name: str | None = None
    # The files' last good contents, shared by this process's servers and channels.
    _state: dict[str, Any] = field(default_factory=dict, init=False, compare=False, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TLSSettings:
        """Parse `environ` (default `os.environ`); `SettingsError` naming the variable when invalid."""
        env = os.environ if environ is None else environ
        mode = (_str(env, "AGENTPLANE_TLS") or "auto").lower()
        if mode not in MODES:
            raise SettingsError(f"AGENTPLANE_TLS must be one of {', '.join(MODES)}, got {mode!r}")
        cert, key, ca = _str(env, CERT_VAR), _str(env, KEY_VAR), _str(env, CA_VAR)
        if bool(cert) != bool(key):
            raise SettingsError(f"{CERT_VAR} and {KEY_VAR} must be set together")
        if mode == "off":
            given = [name for name, value in ((CERT_VAR, cert), (KEY_VAR, key), (CA_VAR, ca)) if value]
            if given:
                raise SettingsError(
                    f"AGENTPLANE_TLS=off, but {', '.join(given)} is set: unset one or the other"
                )
        default_auth = _client_auth(env, "AGENTPLANE_TLS_CLIENT_AUTH", "require" if ca else "none", ca)
        per_service = {}
        for name in SERVICE_NAMES:
            var = f"AGENTPLANE_{name.upper()}_TLS_CLIENT_AUTH"
            if _str(env, var) is not None:
                per_service[name] = _client_auth(env, var, default_auth, ca)
        return cls(
            mode=mode,
            cert_file=cert,
            key_file=key,
            ca_file=ca,
            client_auth=default_auth,
            service_client_auth=per_service,
            server_name=_str(env, "AGENTPLANE_TLS_SERVER_NAME"),
        )

    @property
    def serves_tls(self) -> bool:
        """Whether servers of this process serve TLS (they have a certificate and a key)."""
        return self.mode != "off" and bool(self.cert_file and self.key_file)

    @property
    def dials_tls(self) -> bool:
        """Whether clients of this process dial TLS."""
        return self.mode == "on" or (self.mode == "auto" and bool(self.ca_file or self.cert_file))

    def client_auth_for(self, service: str) -> str:
        """`require` or `none`: whether `service`'s server requires a client certificate."""
        return self.service_client_auth.get(service, self.client_auth)

    def server_credentials(self, service: str) -> grpc.ServerCredentials | None:
        """Reloading TLS credentials for `service`'s server; None when it serves plaintext."""
        if not self.serves_tls:
            if self.mode == "on":
                raise SettingsError(f"AGENTPLANE_TLS=on, but {CERT_VAR} and {KEY_VAR} are not set")
            return None
        require = self.client_auth_for(service) == "require"
        fetcher = _ServerFetcher(self._reloader())
        return grpc.dynamic_ssl_server_credentials(fetcher.initial(), fetcher, require)

    def bind(self, server: grpc.aio.Server, address: str, service: str) -> int:
        """Add `address` to `server` with TLS or, where allowed, plaintext; return the bound port.

        Plaintext binds a loopback address (or a Unix socket) only, unless `AGENTPLANE_TLS=off`:
        anything else raises `SettingsError`.
        """
        credentials = self.server_credentials(service)
        if credentials is not None:
            log.info(
                "serving TLS",
                extra={"address": address, "client_auth": self.client_auth_for(service)},
            )
            return server.add_secure_port(address, credentials)
        if not is_loopback(host_of(address)):
            if self.mode != "off":
                raise SettingsError(
                    f"refusing to serve {service} in plaintext on {address}, which is not a loopback "
                    f"address: set {CERT_VAR} and {KEY_VAR} (and {CA_VAR} for mutual TLS), bind "
                    "127.0.0.1, or set AGENTPLANE_TLS=off to serve plaintext on purpose"
                )
            log.warning(
                "SERVING PLAINTEXT gRPC on %s (AGENTPLANE_TLS=off): tokens and data cross the network "
                "unencrypted and unauthenticated",
                address,
            )
        return server.add_insecure_port(address)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Client credentials from the files as they are now (the system's roots without a CA file)."""
        if not (self.ca_file or self.cert_file):
            return grpc.ssl_channel_credentials()
        return _channel_credentials(self._reloader().material)

    def dial(
        self,
        target: str,
        *,
        options: Sequence[tuple[str, Any]] = (),
        interceptors: Sequence[grpc.aio.ClientInterceptor] = (),
    ) -> grpc.aio.Channel:
        """A channel to `target`: TLS (reloading its files) when this process dials TLS, else plaintext."""
        if not self.dials_tls:
            if self.mode != "off":
                _warn_plaintext_dial(target)
            return grpc.aio.insecure_channel(target, options=list(options), interceptors=list(interceptors))
        opts = list(options)
        if self.server_name:
            opts.append(("grpc.ssl_target_name_override", self.server_name))

        def make(credentials: grpc.ChannelCredentials) -> grpc.aio.Channel:
            return grpc.aio.secure_channel(target, credentials, options=opts, interceptors=list(interceptors))

        if not (self.ca_file or self.cert_file):
            return make(grpc.ssl_channel_credentials())
        return ReloadingChannel(make, self._client_credentials())

    def _reloader(self) -> _Reloader:
        with _STATE_LOCK:
            reloader = self._state.get("reloader")
            if reloader is None:
                try:
                    reloader = _Reloader(_Files(self.cert_file, self.key_file, self.ca_file))
                except ValueError as exc:
                    raise SettingsError(str(exc)) from None
                self._state["reloader"] = reloader
            assert isinstance(reloader, _Reloader)
            return reloader

    def _client_credentials(self) -> _ClientCredentials:
        with _STATE_LOCK:
            credentials = self._state.get("client")
            if credentials is None:
                credentials = self._state["client"] = _ClientCredentials(self._reloader())
            assert isinstance(credentials, _ClientCredentials)
            return credentials


_STATE_LOCK = threading.RLock()
_current: TLSSettings | None = None


def current() -> TLSSettings:
    """This process's TLS settings, parsed from `os.environ` on first use."""
    global _current
    if _current is None:
        _current = TLSSettings.from_env()
    return _current


def set_current(value: TLSSettings | None) -> None:
    """Replace this process's TLS settings (None: parse the environment again on next use)."""
    global _current
    _current = value


def host_of(target: str) -> str:
    """The host part of a gRPC target or listen address (`unix:...` targets are returned whole)."""
    if target.startswith("unix"):
        return target
    for prefix in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(prefix):
            target = target[len(prefix) :]
            break
    if target.startswith("["):
        return target[1 : target.find("]")] if "]" in target else target
    if target.count(":") == 1:
        return target.rsplit(":", 1)[0]
    return target  # a bare host, or an IPv6 address without a port


def is_loopback(host: str) -> bool:
    """True for `localhost`, 127.0.0.0/8, ::1 and Unix sockets; False for 0.0.0.0, :: and names."""
    if host.startswith("unix"):
        return True
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def peer_common_name(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The common name of the client certificate the peer of this call presented (mTLS), if any."""
    values = context.auth_context().get("x509_common_name") or []
    return values[0].decode() if values else None


_warned_targets: set[str] = set()


def _warn_plaintext_dial(target: str) -> None:
    host = host_of(target)
    if is_loopback(host) or target in _warned_targets:
        return
    _warned_targets.add(target)
    log.warning(
        "dialling %s in plaintext: set %s (and %s/%s for mutual TLS), or AGENTPLANE_TLS=off if "
        "plaintext is intended",
        target,
        CA_VAR,
        CERT_VAR,
        KEY_VAR,
    )


# --- the files and their reloading -------------------------------------------------------------


@dataclass(frozen=True)
class _Material:
    """One consistent, checked reading of the files."""

    signature: _Signature
    chain: bytes | None
    key: bytes | None
    ca: bytes | None
    subject: str | None
    not_after: str | None


class _Files:
    """The certificate, key and CA files of this process (any may be None)."""

    def __init__(self, cert_file: str | None, key_file: str | None, ca_file: str | None) -> None:
        self.cert_file, self.key_file, self.ca_file = cert_file, key_file, ca_file

    def signature(self) -> _Signature:
        """What changes when a file is replaced: (mtime, size, inode, device) of each, following links."""
        return (_stat(self.cert_file), _stat(self.key_file), _stat(self.ca_file))

    def load(self) -> _Material:
        """Read and check the files; ValueError naming the variable when they cannot be used."""
        signature = self.signature()
        chain = _read(self.cert_file, CERT_VAR)
        key = _read(self.key_file, KEY_VAR)
        ca = _read(self.ca_file, CA_VAR)
        subject = not_after = None
        if chain is not None and key is not None:
            certs = _certificates(chain, CERT_VAR, self.cert_file)
            try:
                private_key = serialization.load_pem_private_key(key, password=None)
            except (ValueError, TypeError) as exc:
                raise ValueError(
                    f"{KEY_VAR} ({self.key_file}) is not an unencrypted PEM key: {exc}"
                ) from None
            if _spki(private_key.public_key()) != _spki(certs[0].public_key()):
                raise ValueError(
                    f"{KEY_VAR} ({self.key_file}) is not the key of the certificate in {CERT_VAR} "
                    f"({self.cert_file})"
                )
            subject = certs[0].subject.rfc4514_string()
            expiry = certs[0].not_valid_after_utc
            not_after = expiry.isoformat()
            if expiry < dt.datetime.now(dt.UTC):
                log.warning("the TLS certificate %s expired at %s", subject, not_after)
        if ca is not None:
            _certificates(ca, CA_VAR, self.ca_file)
        return _Material(signature, chain, key, ca, subject, not_after)


class _Reloader:
    """The last good `_Material` of some files, read again when their signature changes."""

    def __init__(self, files: _Files) -> None:
        self._files = files
        self._lock = threading.Lock()
        self.material = files.load()
        self.generation = 0
        self._failed: _Signature | None = None

    def refresh(self) -> bool:
        """Re-read the files if they changed since the last reading; True when new material is in use."""
        with self._lock:
            signature = self._files.signature()
            if signature in (self.material.signature, self._failed):
                return False
            try:
                material = self._files.load()
            except ValueError as exc:
                self._failed = signature  # logged once per change, retried on the next change
                log.warning("the TLS files changed but cannot be used; keeping the previous ones: %s", exc)
                return False
            self._failed = None
            previous, self.material = self.material, material
            if (material.chain, material.key, material.ca) == (previous.chain, previous.key, previous.ca):
                return False  # touched, not changed
            self.generation += 1
        log.info(
            "reloaded the TLS files",
            extra={"subject": material.subject, "not_after": material.not_after},
        )
        return True


class _ServerFetcher:
    """grpc's certificate configuration fetcher: called before every new handshake."""

    def __init__(self, reloader: _Reloader) -> None:
        self._reloader = reloader
        self._generation = reloader.generation

    def initial(self) -> grpc.ServerCertificateConfiguration:
        return _server_configuration(self._reloader.material)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            self._reloader.refresh()
            if self._reloader.generation == self._generation:
                return None
            self._generation = self._reloader.generation
            return _server_configuration(self._reloader.material)
        except Exception:
            log.exception("could not reload the TLS files; keeping the previous ones")
            return None


class _ClientCredentials:
    """Channel credentials from the files, rebuilt when they change (looked at every RELOAD_CHECK_SECONDS)."""

    def __init__(self, reloader: _Reloader) -> None:
        self._reloader = reloader
        self._checked = time.monotonic()
        self._generation = reloader.generation
        self._credentials = _channel_credentials(reloader.material)

    def current(self) -> tuple[int, grpc.ChannelCredentials]:
        now = time.monotonic()
        if now - self._checked >= RELOAD_CHECK_SECONDS:
            self._checked = now
            self._reloader.refresh()
        if self._reloader.generation != self._generation:
            self._generation = self._reloader.generation
            self._credentials = _channel_credentials(self._reloader.material)
        return self._generation, self._credentials


def _server_configuration(material: _Material) -> grpc.ServerCertificateConfiguration:
    assert material.chain is not None and material.key is not None
    return grpc.ssl_server_certificate_configuration([(material.key, material.chain)], material.ca)


def _channel_credentials(material: _Material) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=material.ca, private_key=material.key, certificate_chain=material.chain
    )


# --- a channel that follows the files ----------------------------------------------------------


class ReloadingChannel(grpc.aio.Channel):
    """A grpc.aio channel whose new calls use the current credentials.

    Stubs keep the multi-callables they were made with, so these look up the current inner
    channel on every call. When the files change, new calls go to a new inner channel (a new
    handshake with the new certificate and CA); calls already running finish on the old one,
    which is closed with this channel.
    """

    def __init__(
        self, make: Callable[[grpc.ChannelCredentials], grpc.aio.Channel], credentials: _ClientCredentials
    ) -> None:
        self._make = make
        self._credentials = credentials
        self._generation, creds = credentials.current()
        self._channel = make(creds)
        self._retired: list[grpc.aio.Channel] = []
        self._callables: dict[tuple[Any, ...], Any] = {}

    def current_channel(self) -> grpc.aio.Channel:
        """The inner channel new calls use (replaced when the files changed)."""
        generation, creds = self._credentials.current()
        if generation != self._generation:
            self._retired.append(self._channel)
            self._channel = self._make(creds)
            self._generation = generation
            self._callables.clear()
        return self._channel

    def _callable(self, kind: str, key: tuple[Any, ...]) -> Any:
        channel = self.current_channel()
        found = self._callables.get((kind, *key))
        if found is None:
            method, serializer, deserializer, registered = key
            found = getattr(channel, kind)(method, serializer, deserializer, _registered_method=registered)
            self._callables[(kind, *key)] = found
        return found

    async def __aenter__(self) -> ReloadingChannel:
        return self

    async def __aexit__(self, exc_type: Any, exc_val: Any, exc_tb: Any) -> None:
        await self.close()

    async def close(self, grace: float | None = None) -> None:
        for channel in [*self._retired, self._channel]:
            await channel.close(grace)
        self._retired.clear()

    def get_state(self, try_to_connect: bool = False) -> grpc.ChannelConnectivity:
        return self.current_channel().get_state(try_to_connect)

    async def wait_for_state_change(self, last_observed_state: grpc.ChannelConnectivity) -> None:
        await self._channel.wait_for_state_change(last_observed_state)

    async def channel_ready(self) -> None:
        await self.current_channel().channel_ready()

    def unary_unary(  # type: ignore[override]
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _UnaryUnary(
            self, "unary_unary", (method, request_serializer, response_deserializer, bool(_registered_method))
        )

    def unary_stream(  # type: ignore[override]
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _UnaryStream(
            self,
            "unary_stream",
            (method, request_serializer, response_deserializer, bool(_registered_method)),
        )

    def stream_unary(  # type: ignore[override]
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _StreamUnary(
            self,
            "stream_unary",
            (method, request_serializer, response_deserializer, bool(_registered_method)),
        )

    def stream_stream(  # type: ignore[override]
        self,
        method: str,
        request_serializer: Any = None,
        response_deserializer: Any = None,
        _registered_method: bool | None = False,
    ) -> Any:
        return _StreamStream(
            self,
            "stream_stream",
            (method, request_serializer, response_deserializer, bool(_registered_method)),
        )


class _Following:
    """A multi-callable that makes each call on the reloading channel's current inner channel."""

    def __init__(self, channel: ReloadingChannel, kind: str, key: tuple[Any, ...]) -> None:
        self._channel, self._kind, self._key = channel, kind, key

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._channel._callable(self._kind, self._key)(*args, **kwargs)


class _UnaryUnary(_Following, grpc.aio.UnaryUnaryMultiCallable):  # type: ignore[type-arg]
    pass


class _UnaryStream(_Following, grpc.aio.UnaryStreamMultiCallable):  # type: ignore[type-arg]
    pass


class _StreamUnary(_Following, grpc.aio.StreamUnaryMultiCallable):  # type: ignore[type-arg]
    pass


class _StreamStream(_Following, grpc.aio.StreamStreamMultiCallable):  # type: ignore[type-arg]
    pass


# --- small helpers ----------------------------------------------------------------------------


def _str(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def _client_auth(env: Mapping[str, str], var: str, default: str, ca: str | None) -> str:
    value = (_str(env, var) or default).lower()
    if value == "optional":
        raise SettingsError(
            f"{var}=optional is not supported: gRPC (Python) cannot ask for a client certificate "
            "without requiring one; use require or none"
        )
    if value not in CLIENT_AUTH_MODES:
        raise SettingsError(f"{var} must be one of {', '.join(CLIENT_AUTH_MODES)}, got {value!r}")
    if value == "require" and not ca:
        raise SettingsError(f"{var}=require needs {CA_VAR}, the CA that signs the client certificates")
    return value


def _stat(path: str | None) -> _Stat:
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def _read(path: str | None, var: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"{var} ({path}) cannot be read: {exc.strerror or exc}") from None


def _certificates(pem: bytes, var: str, path: str | None) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise ValueError(f"{var} ({path}) holds no usable PEM certificate: {exc}") from None
    if not certs:
        raise ValueError(f"{var} ({path}) holds no PEM certificate")
    return certs


def _spki(public_key: Any) -> bytes:
    der: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der
