"""Providers that cannot be reached: refused, unknown host and silent are told apart, not all "timed out".

The OpenAI SDK's aiohttp transport reports a refused connection as a timeout; the inference
service reads the socket's own error instead. Real SDK clients against real sockets.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import grpc
import pytest
from agentplane.config.v1 import config_pb2
from prometheus_client import CollectorRegistry

from services.common.embedded import free_port
from services.common.errors import Unavailable
from services.config.testing import seed_provider_and_model
from services.inference.generate import Generator
from services.inference.metrics import InferenceMetrics
from services.inference.resolver import StaticModelResolver
from services.inference.settings import InferenceSettings
from tests.inference.conftest import Stack
from tests.inference.helpers import reason_of, request

ANTHROPIC = config_pb2.PROVIDER_TYPE_ANTHROPIC
COMPATIBLE = config_pb2.PROVIDER_TYPE_OPENAI_COMPATIBLE
UNKNOWN_HOST = "no-such-provider.invalid"  # .invalid never resolves (RFC 2606)


async def _failed_generate(stack: Stack, model_id: str) -> tuple[grpc.aio.AioRpcError, list[str]]:
    """Run Generate to its error; the error and the messages of the retry notices before it."""
    notices: list[str] = []
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for event in stack.stub.Generate(request(model_id, "hello"), timeout=30):
            assert event.HasField("retry"), event
            notices.append(event.retry.message)
    return exc.value, notices


@pytest.mark.parametrize("provider_type", [COMPATIBLE, ANTHROPIC], ids=["openai_sdk", "anthropic_sdk"])
async def test_provider_at_a_closed_port_is_connection_refused_not_timed_out(
    stack: Stack, provider_type: int
) -> None:
    base_url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    _, model_id = await seed_provider_and_model(
        stack.config.address,
        stack.admin_token,
        provider_type=provider_type,
        base_url=base_url,
        api_key="sk-unused-0123456789",
        model_name="closed-port-model",
        make_default=False,
    )
    err, notices = await _failed_generate(stack, model_id)
    details = err.details() or ""
    assert err.code() == grpc.StatusCode.UNAVAILABLE, details
    assert reason_of(err) == "PROVIDER_UNAVAILABLE"
    assert f"could not connect to the provider at {base_url}: connection refused" in details, details
    assert "timed out" not in details, details
    # Refused may be a server restarting: retried within the policy, each notice saying why.
    assert len(notices) == 2 and "after 3 attempts" in details, (notices, details)
    assert all("connection refused" in n and "timed out" not in n for n in notices), notices


async def test_unknown_provider_host_is_a_name_resolution_failure(stack: Stack) -> None:
    base_url = f"http://{UNKNOWN_HOST}/v1"
    _, model_id = await seed_provider_and_model(
        stack.config.address,
        stack.admin_token,
        provider_type=COMPATIBLE,
        base_url=base_url,
        api_key="sk-unused-0123456789",
        model_name="unknown-host-model",
        make_default=False,
    )
    err, notices = await _failed_generate(stack, model_id)
    details = err.details() or ""
    assert err.code() == grpc.StatusCode.UNAVAILABLE and reason_of(err) == "PROVIDER_UNAVAILABLE"
    assert f"could not connect to the provider at {base_url}: the host name could not be resolved" in details
    assert "timed out" not in details, details
    # A name that does not exist is not retried; a resolver that is only temporarily failing is.
    try:
        socket.getaddrinfo(UNKNOWN_HOST, 80)
    except socket.gaierror as exc:
        temporary = exc.errno == socket.EAI_AGAIN
    else:  # pragma: no cover - a resolver that answers for .invalid
        pytest.skip(f"this resolver answers for {UNKNOWN_HOST}")
    assert len(notices) == (2 if temporary else 0), notices


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) but never answers."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize("provider_type", [COMPATIBLE, ANTHROPIC], ids=["openai_sdk", "anthropic_sdk"])
async def test_provider_that_never_answers_is_reported_as_timed_out(
    silent_port: int, provider_type: config_pb2.ProviderType.ValueType
) -> None:
    base_url = f"http://127.0.0.1:{silent_port}/v1"
    provider = config_pb2.Provider(
        id="p-silent", display_name="silent", type=provider_type, base_url=base_url, enabled=True
    )
    model = config_pb2.ModelConfig(
        id="m-silent", model_name="silent-model", provider_id="p-silent", enabled=True
    )
    generator = Generator(
        StaticModelResolver(model, provider, "sk-unused-0123456789"),
        InferenceSettings(max_attempts=1, connect_timeout_s=5, read_timeout_s=0.3),
        metrics=InferenceMetrics.for_registry(CollectorRegistry()),
    )
    try:
        with pytest.raises(Unavailable) as exc:
            async for _ in generator.generate(request("m-silent", "hello")):
                pass
    finally:
        await generator.clients.close()
    assert exc.value.reason == "PROVIDER_UNAVAILABLE"
    assert f"the request to the provider at {base_url} timed out" in exc.value.message, exc.value.message
    assert "connection refused" not in exc.value.message
