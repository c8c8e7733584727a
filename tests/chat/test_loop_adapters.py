"""The loop's real adapters (services/chat/clients.py) send the user the loop names as the call's
on-behalf-of metadata, whatever identity is ambient, to a real gRPC server that records it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import grpc.aio
import pytest
from agentplane.inference.v1 import inference_pb2, inference_service_pb2
from agentplane.toolexec.v1 import toolexec_service_pb2

from services.chat.clients import InferenceModel, ToolExecTools
from services.common import auth
from services.common.client import create_channel


class _Recorder:
    """CallTool and Generate, recording the on-behalf-of user each call carried."""

    def __init__(self) -> None:
        self.on_behalf_of: list[str | None] = []

    def _record(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        md = dict(context.invocation_metadata() or ())
        value = md.get(auth.ON_BEHALF_OF_METADATA_KEY)
        self.on_behalf_of.append(value if isinstance(value, str) else None)

    async def call_tool(
        self, request: toolexec_service_pb2.CallToolRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> toolexec_service_pb2.CallToolResponse:
        self._record(context)
        return toolexec_service_pb2.CallToolResponse(content="ok")

    async def generate(
        self, request: inference_service_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[inference_service_pb2.GenerateResponse]:
        self._record(context)
        yield inference_service_pb2.GenerateResponse(text_delta=inference_pb2.TextDelta(text="hi"))

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        return [
            grpc.method_handlers_generic_handler(
                "agentplane.toolexec.v1.ToolExecService",
                {
                    "CallTool": grpc.unary_unary_rpc_method_handler(
                        self.call_tool,
                        request_deserializer=toolexec_service_pb2.CallToolRequest.FromString,
                        response_serializer=toolexec_service_pb2.CallToolResponse.SerializeToString,
                    )
                },
            ),
            grpc.method_handlers_generic_handler(
                "agentplane.inference.v1.InferenceService",
                {
                    "Generate": grpc.unary_stream_rpc_method_handler(
                        self.generate,
                        request_deserializer=inference_service_pb2.GenerateRequest.FromString,
                        response_serializer=inference_service_pb2.GenerateResponse.SerializeToString,
                    )
                },
            ),
        ]


@pytest.fixture
async def recorder() -> AsyncIterator[tuple[_Recorder, grpc.aio.Channel]]:
    rec = _Recorder()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers(rec.handlers())
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = create_channel(f"127.0.0.1:{port}", token="service-token")
    try:
        yield rec, channel
    finally:
        await channel.close()
        await server.stop(0)


async def test_tool_calls_act_for_the_user_they_name(recorder: tuple[_Recorder, grpc.aio.Channel]) -> None:
    rec, channel = recorder
    tools = ToolExecTools(channel)
    with auth.acting_for("mallory"):
        outcome = await tools.call("ws-1", "c1", "read_file", "{}", user_id="bob")
    assert outcome.content == "ok"
    assert rec.on_behalf_of == ["bob"]


async def test_generations_act_for_the_requests_user(recorder: tuple[_Recorder, grpc.aio.Channel]) -> None:
    rec, channel = recorder
    model = InferenceModel(channel)
    with auth.acting_for("mallory"):
        events = [e async for e in model.generate(inference_service_pb2.GenerateRequest(user_id="bob"))]
    assert [e.text_delta.text for e in events] == ["hi"]
    assert rec.on_behalf_of == ["bob"]
