"""An external agent dials toolexec over TLS when its URL says https:// (or grpcs://)."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ipaddress
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from agentplane.toolexec.v1 import workspace_agent_service_pb2 as pb
from agentplane.toolexec.v1 import workspace_agent_service_pb2_grpc as pb_grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from services.agent.calls import AgentCalls
from services.agent.connection import AgentConnection, AgentOptions, is_local_target
from services.agent.main import _credentials
from services.agent.processes import ProcessLimits, ProcessManager
from services.agent.record import ResultRecord
from services.agent.runner import ToolRunner
from services.common.embedded import free_port


def _cert(subject: str, issuer_key: Any, issuer: x509.Name | None, ca: bool) -> tuple[Any, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return key, builder.sign(issuer_key or key, hashes.SHA256())


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


class OneCall(pb_grpc.WorkspaceAgentServiceServicer):
    """Welcomes the agent, sends one execute, keeps its result."""

    def __init__(self) -> None:
        self.result: asyncio.Future[pb.AgentToolResult] = asyncio.get_running_loop().create_future()
        self.hello: pb.AgentHello | None = None

    async def Connect(
        self, request_iterator: AsyncIterator[pb.ConnectRequest], context: Any
    ) -> AsyncIterator[pb.ConnectResponse]:
        first = await anext(request_iterator)
        self.hello = first.hello
        yield pb.ConnectResponse(welcome=pb.AgentWelcome(replica_id="tls-test"))
        yield pb.ConnectResponse(
            call=pb.AgentToolCall(
                tool_call_id="t1", name="execute", arguments_json='{"command": "echo over tls"}'
            )
        )
        async for message in request_iterator:
            if message.HasField("result") and not self.result.done():
                self.result.set_result(message.result)
                return


async def test_agent_dials_tls_and_refuses_an_unknown_ca(tmp_path: Path) -> None:
    ca_key, ca = _cert("test CA", None, None, ca=True)
    server_key, server_cert = _cert("localhost", ca_key, ca.subject, ca=False)
    key_pem = server_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "ca.pem").write_bytes(_pem(ca))
    port = free_port()
    server = grpc.aio.server()
    servicer = OneCall()
    pb_grpc.add_WorkspaceAgentServiceServicer_to_server(servicer, server)
    server.add_secure_port(f"127.0.0.1:{port}", grpc.ssl_server_credentials([(key_pem, _pem(server_cert))]))
    await server.start()
    (tmp_path / "root").mkdir()
    processes = ProcessManager(str(tmp_path / "state" / "processes"), ProcessLimits())
    calls = AgentCalls(
        ToolRunner(str(tmp_path / "root"), processes), ResultRecord(str(tmp_path / "state" / "calls"))
    )
    url = f"https://localhost:{port}"
    try:
        # Without the deployment's CA the handshake fails: the server never hears a hello.
        untrusted = AgentConnection(
            AgentOptions(url, "apw_x", "ws_1", credentials=grpc.ssl_channel_credentials()), calls
        )
        failing = asyncio.ensure_future(untrusted.run_forever())
        done, _ = await asyncio.wait({failing}, timeout=1.0)
        assert not done and servicer.hello is None
        failing.cancel()
        args = argparse.Namespace(url=url, tls_ca=str(tmp_path / "ca.pem"))
        trusted = AgentConnection(AgentOptions(url, "apw_x", "ws_1", credentials=_credentials(args)), calls)
        running = asyncio.ensure_future(trusted.run_forever())
        result = await asyncio.wait_for(servicer.result, 30)
        running.cancel()
        assert servicer.hello is not None and servicer.hello.workspace_id == "ws_1"
        assert "over tls" in result.content and not result.is_error
    finally:
        await server.stop(0)
        await processes.close()


def test_plaintext_is_for_this_machine_only() -> None:
    assert is_local_target("unix:///run/agentplane/sock/agent.sock")
    assert is_local_target("127.0.0.1:50053") and is_local_target("localhost:50053")
    assert not is_local_target("toolexec.agentplane.svc:50053")
    assert _credentials(argparse.Namespace(url="toolexec:50053", tls_ca="")) is None
    assert _credentials(argparse.Namespace(url="grpcs://toolexec:50053", tls_ca="")) is not None
