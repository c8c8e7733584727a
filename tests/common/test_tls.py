"""TLS and mutual TLS on the kit's servers and channels: real servers, real handshakes, files on disk.

Certificates are made here with `cryptography`: a CA, server certificates for localhost/127.0.0.1,
client certificates. Rotation writes new files the way cert-manager does (a new file moved into
place), and the next connection must use them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import os
import socket
import ssl
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from agentplane.config.v1 import config_service_pb2 as config_pb
from agentplane.config.v1 import config_service_pb2_grpc as config_grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from services.common import tls
from services.common.client import create_channel, wait_for_health
from services.common.server import ServerHandle, create_server
from services.common.settings import Settings, SettingsError
from services.common.tls import TLSSettings
from tests.helpers import make_test_settings

PEER_SERVICE = "agentplane.test.v1.PeerService"
WHO = f"/{PEER_SERVICE}/Who"


# --- certificates -----------------------------------------------------------------------------


@dataclass
class CA:
    """A test certificate authority that issues server and client certificates."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str = "test CA") -> CA:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            _builder(subject, subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) for `common_name`, valid for localhost and 127.0.0.1."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (
            _builder(subject, self.cert.subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _builder(subject: x509.Name, issuer: x509.Name, public_key: Any) -> x509.CertificateBuilder:
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
    )


def replace_file(path: Path, data: bytes) -> None:
    """Write `data` to a new file and move it over `path` (an atomic swap, like cert-manager's)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@dataclass
class Identity:
    """The three files of one process (certificate, key, CA) in a directory of their own."""

    directory: Path

    @property
    def cert(self) -> Path:
        return self.directory / "tls.crt"

    @property
    def key(self) -> Path:
        return self.directory / "tls.key"

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    def write(self, ca: CA, common_name: str, *, trust: CA | None = None) -> Identity:
        """Issue a certificate for `common_name` from `ca` and trust `trust` (default `ca`)."""
        cert, key = ca.issue(common_name)
        self.directory.mkdir(parents=True, exist_ok=True)
        replace_file(self.cert, cert)
        replace_file(self.key, key)
        replace_file(self.ca, (trust or ca).pem)
        return self

    def settings(self, **env: str) -> TLSSettings:
        """TLS settings that present this certificate and trust this CA."""
        return TLSSettings.from_env(
            {
                "AGENTPLANE_TLS_CERT_FILE": str(self.cert),
                "AGENTPLANE_TLS_KEY_FILE": str(self.key),
                "AGENTPLANE_TLS_CA_FILE": str(self.ca),
                **env,
            }
        )

    def trust_only(self) -> TLSSettings:
        """TLS settings that trust this CA but present no certificate."""
        return TLSSettings.from_env({"AGENTPLANE_TLS_CA_FILE": str(self.ca)})


def server_certificate_subject(port: int, client: Identity) -> str:
    """The subject of the certificate the server on `port` presents in a fresh handshake."""
    context = ssl.create_default_context(cafile=str(client.ca))
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(str(client.cert), str(client.key))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as sock,
        context.wrap_socket(sock, server_hostname="localhost") as conn,
    ):
        der = conn.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).subject.rfc4514_string()


# --- a small server built with the kit --------------------------------------------------------


async def who(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    """The common name of the client certificate this call came with."""
    return (tls.peer_common_name(context) or "-").encode()


def register_peer(server: grpc.aio.Server) -> None:
    handler = grpc.method_handlers_generic_handler(
        PEER_SERVICE, {"Who": grpc.unary_unary_rpc_method_handler(who)}
    )
    server.add_generic_rpc_handlers((handler,))


def build_peer(tls_settings: TLSSettings, settings: Settings | None = None) -> ServerHandle:
    return create_server(
        settings or make_test_settings(),
        "inference",
        register_peer,
        [PEER_SERVICE],
        interceptors=[],
        tls_settings=tls_settings,
    )


@pytest.fixture
async def peer_server(tmp_path: Path) -> AsyncIterator[tuple[ServerHandle, CA, Identity]]:
    """A started mTLS server (certificate `server-1` from a fresh CA) and its files."""
    ca = CA.create()
    files = Identity(tmp_path / "server").write(ca, "server-1")
    handle = build_peer(files.settings())
    await handle.start()
    try:
        yield handle, ca, files
    finally:
        await handle.stop(0)


async def call_who(address: str, tls_settings: TLSSettings) -> str:
    channel = create_channel(address, retries=False, tls_settings=tls_settings)
    try:
        return await ask(channel)
    finally:
        await channel.close()


async def ask(channel: grpc.aio.Channel) -> str:
    reply: bytes = await channel.unary_unary(WHO)(b"", timeout=10)
    return reply.decode()


async def assert_refused(address: str, tls_settings: TLSSettings) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call_who(address, tls_settings)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


@pytest.fixture
def fast_client_reload(monkeypatch: pytest.MonkeyPatch) -> None:
    """Client channels look at their files on every call instead of once a second."""
    monkeypatch.setattr(tls, "RELOAD_CHECK_SECONDS", 0.0)


@pytest.fixture
def process_tls() -> Iterator[None]:
    """Restore the process-wide TLS settings (parsed from the environment) after the test."""
    try:
        yield
    finally:
        tls.set_current(None)


# --- settings ---------------------------------------------------------------------------------


def test_settings_defaults_and_client_auth() -> None:
    plain = TLSSettings.from_env({})
    assert plain.mode == "auto" and not plain.serves_tls and not plain.dials_tls
    assert plain.client_auth == "none"
    env = {
        "AGENTPLANE_TLS_CERT_FILE": "/tls/tls.crt",
        "AGENTPLANE_TLS_KEY_FILE": "/tls/tls.key",
        "AGENTPLANE_TLS_CA_FILE": "/tls/ca.crt",
        "AGENTPLANE_CHAT_TLS_CLIENT_AUTH": "none",
        "AGENTPLANE_TLS_SERVER_NAME": "agentplane.internal",
    }
    mtls = TLSSettings.from_env(env)
    assert mtls.serves_tls and mtls.dials_tls and mtls.server_name == "agentplane.internal"
    assert mtls.client_auth == "require"  # a CA file means mutual TLS unless told otherwise
    assert mtls.client_auth_for("inference") == "require" and mtls.client_auth_for("chat") == "none"
    client_only = TLSSettings.from_env({"AGENTPLANE_TLS_CA_FILE": "/tls/ca.crt"})
    assert client_only.dials_tls and not client_only.serves_tls
    assert TLSSettings.from_env({"AGENTPLANE_TLS": "on"}).dials_tls
    off = TLSSettings.from_env({"AGENTPLANE_TLS": "OFF"})
    assert off.mode == "off" and not off.dials_tls


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"AGENTPLANE_TLS": "maybe"}, "AGENTPLANE_TLS"),
        ({"AGENTPLANE_TLS_CERT_FILE": "/c"}, "AGENTPLANE_TLS_KEY_FILE"),
        ({"AGENTPLANE_TLS": "off", "AGENTPLANE_TLS_CA_FILE": "/ca"}, "AGENTPLANE_TLS_CA_FILE"),
        ({"AGENTPLANE_TLS_CLIENT_AUTH": "require"}, "AGENTPLANE_TLS_CA_FILE"),
        ({"AGENTPLANE_TLS_CA_FILE": "/ca", "AGENTPLANE_TLS_CLIENT_AUTH": "optional"}, "optional"),
        ({"AGENTPLANE_TLS_CA_FILE": "/ca", "AGENTPLANE_CONFIG_TLS_CLIENT_AUTH": "yes"}, "CONFIG_TLS"),
    ],
)
def test_invalid_settings_name_the_variable(env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        TLSSettings.from_env(env)


def test_loopback_hosts() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]:50051", "localhost:1", "unix:/run/x.sock"):
        assert tls.is_loopback(tls.host_of(host)), host
    for host in ("0.0.0.0:50051", "[::]:50051", "10.0.0.5:50051", "config:50051", "dns:///config:1"):
        assert not tls.is_loopback(tls.host_of(host)), host


def test_unusable_files_fail_at_startup_naming_the_variable(tmp_path: Path) -> None:
    ca = CA.create()
    files = Identity(tmp_path).write(ca, "server-1")
    missing = TLSSettings.from_env(
        {"AGENTPLANE_TLS_CERT_FILE": str(tmp_path / "nope.crt"), "AGENTPLANE_TLS_KEY_FILE": str(files.key)}
    )
    with pytest.raises(SettingsError, match="AGENTPLANE_TLS_CERT_FILE"):
        build_peer(missing)
    _, other_key = ca.issue("server-2")
    replace_file(files.key, other_key)
    with pytest.raises(SettingsError, match="is not the key of the certificate"):
        build_peer(files.settings())
    with pytest.raises(SettingsError, match="AGENTPLANE_TLS=on"):
        build_peer(TLSSettings.from_env({"AGENTPLANE_TLS": "on"}))


# --- plaintext only on loopback ---------------------------------------------------------------


async def test_plaintext_is_refused_off_loopback_unless_tls_is_off(caplog: pytest.LogCaptureFixture) -> None:
    everywhere = make_test_settings(extra_env={"AGENTPLANE_HOST": "0.0.0.0"})
    with pytest.raises(SettingsError, match="AGENTPLANE_TLS=off"):
        build_peer(TLSSettings.from_env({}), everywhere)
    with caplog.at_level(logging.WARNING, logger="services.common.tls"):
        handle = build_peer(TLSSettings.from_env({"AGENTPLANE_TLS": "off"}), everywhere)
    assert "SERVING PLAINTEXT" in caplog.text
    await handle.start()
    try:
        assert await call_who(handle.address, TLSSettings.from_env({"AGENTPLANE_TLS": "off"})) == "-"
    finally:
        await handle.stop(0)
    loopback = build_peer(TLSSettings.from_env({}))  # the default: tests, `agentplane up`
    await loopback.start()
    try:
        assert await call_who(loopback.address, TLSSettings.from_env({})) == "-"
    finally:
        await loopback.stop(0)


# --- mutual TLS -------------------------------------------------------------------------------


async def test_mtls_answers_a_client_with_a_certificate_from_the_ca(
    peer_server: tuple[ServerHandle, CA, Identity], tmp_path: Path
) -> None:
    handle, ca, _ = peer_server
    client = Identity(tmp_path / "client").write(ca, "service-chat")
    assert await call_who(handle.address, client.settings()) == "service-chat"
    channel = create_channel(handle.address, tls_settings=client.settings())
    try:
        # Health and reflection stay open to any client that completes the handshake.
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        responses = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {s.name async for r in responses for s in r.list_services_response.service}
        assert {PEER_SERVICE, "grpc.health.v1.Health"} <= names
    finally:
        await channel.close()


async def test_mtls_refuses_clients_without_a_certificate_from_the_ca(
    peer_server: tuple[ServerHandle, CA, Identity], tmp_path: Path
) -> None:
    handle, ca, _ = peer_server
    # Trusts the server but presents no certificate.
    await assert_refused(handle.address, Identity(tmp_path / "anon").write(ca, "unused").trust_only())
    # Presents a certificate from another CA (and trusts the server's CA).
    stranger = Identity(tmp_path / "stranger").write(CA.create("other CA"), "service-chat", trust=ca)
    await assert_refused(handle.address, stranger.settings())
    # Plaintext.
    await assert_refused(handle.address, TLSSettings.from_env({}))
    # Does not trust the server's CA: the client refuses the server.
    other = CA.create("other CA")
    await assert_refused(handle.address, Identity(tmp_path / "wary").write(other, "service-chat").settings())
    # The right certificate still works.
    assert await call_who(handle.address, Identity(tmp_path / "ok").write(ca, "ok").settings()) == "ok"


async def test_client_auth_none_serves_tls_without_client_certificates(tmp_path: Path) -> None:
    ca = CA.create()
    files = Identity(tmp_path / "server").write(ca, "server-1")
    handle = build_peer(files.settings(AGENTPLANE_INFERENCE_TLS_CLIENT_AUTH="none"))
    await handle.start()
    try:
        assert await call_who(handle.address, files.trust_only()) == "-"
        await assert_refused(handle.address, TLSSettings.from_env({}))  # still TLS only
    finally:
        await handle.stop(0)


async def test_config_service_over_mtls(
    settings: Settings, admin_token: str, tmp_path: Path, process_tls: None
) -> None:
    from services.config import server as config_server

    ca = CA.create()
    server_files = Identity(tmp_path / "config").write(ca, "config")
    client = Identity(tmp_path / "chat").write(ca, "chat")
    tls.set_current(server_files.settings())  # what `agentplane serve config` parses from its environment
    config = await config_server.start(
        settings, channel=f"test:config:{uuid.uuid4().hex}", registry=CollectorRegistry()
    )
    try:
        await wait_for_health(config.address, within=10)  # the process-wide settings: mTLS
        channel = create_channel(config.address, token=admin_token, tls_settings=client.settings())
        try:
            stub = config_grpc.ConfigServiceStub(channel)
            reply = await stub.ListProviders(config_pb.ListProvidersRequest(), timeout=10)
            assert list(reply.providers) == []
        finally:
            await channel.close()
        anonymous = create_channel(
            config.address, token=admin_token, retries=False, tls_settings=client.trust_only()
        )
        try:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await config_grpc.ConfigServiceStub(anonymous).ListProviders(
                    config_pb.ListProvidersRequest(), timeout=10
                )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            await anonymous.close()
    finally:
        await config.stop()


# --- rotation ---------------------------------------------------------------------------------


async def test_server_picks_up_a_rotated_certificate_on_the_next_connection(
    peer_server: tuple[ServerHandle, CA, Identity], tmp_path: Path
) -> None:
    handle, ca, files = peer_server
    client = Identity(tmp_path / "client").write(ca, "client")
    assert await asyncio.to_thread(server_certificate_subject, handle.port, client) == "CN=server-1"
    channel = create_channel(handle.address, tls_settings=client.settings())
    try:
        assert await ask(channel) == "client"
        files.write(ca, "server-2")  # same CA, new certificate and key
        assert await asyncio.to_thread(server_certificate_subject, handle.port, client) == "CN=server-2"
        assert await ask(channel) == "client"  # an established connection carries on
        assert await call_who(handle.address, client.settings()) == "client"
    finally:
        await channel.close()


async def test_rotating_to_a_new_ca_refuses_clients_of_the_old_one(
    peer_server: tuple[ServerHandle, CA, Identity], tmp_path: Path
) -> None:
    handle, old_ca, files = peer_server
    old_client = Identity(tmp_path / "old").write(old_ca, "old-client")
    assert await call_who(handle.address, old_client.settings()) == "old-client"
    new_ca = CA.create("new CA")
    files.write(new_ca, "server-2")
    await assert_refused(handle.address, old_client.settings())
    new_client = Identity(tmp_path / "new").write(new_ca, "new-client")
    assert await call_who(handle.address, new_client.settings()) == "new-client"


async def test_unusable_files_keep_the_previous_certificate(
    peer_server: tuple[ServerHandle, CA, Identity], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    handle, ca, files = peer_server
    client = Identity(tmp_path / "client").write(ca, "client")
    cert, key = ca.issue("server-2")
    with caplog.at_level(logging.WARNING, logger="services.common.tls"):
        replace_file(files.cert, cert)  # half-way through a rotation: the key is still the old one
        assert await asyncio.to_thread(server_certificate_subject, handle.port, client) == "CN=server-1"
    assert "cannot be used" in caplog.text
    replace_file(files.key, key)
    assert await asyncio.to_thread(server_certificate_subject, handle.port, client) == "CN=server-2"


async def test_client_channel_presents_its_rotated_certificate(
    peer_server: tuple[ServerHandle, CA, Identity], tmp_path: Path, fast_client_reload: None
) -> None:
    handle, ca, files = peer_server
    client = Identity(tmp_path / "client").write(ca, "client-1")
    channel = create_channel(handle.address, tls_settings=client.settings())
    try:
        method = channel.unary_unary(WHO)  # like a stub made once at startup
        assert (await method(b"", timeout=10)).decode() == "client-1"
        client.write(ca, "client-2")
        assert (await method(b"", timeout=10)).decode() == "client-2"
        # Both sides move to a new CA: the same channel follows.
        new_ca = CA.create("new CA")
        files.write(new_ca, "server-2")
        client.write(new_ca, "client-3")
        assert (await method(b"", timeout=10)).decode() == "client-3"
    finally:
        await channel.close()
