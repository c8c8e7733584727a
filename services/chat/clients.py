"""Real implementations of the loop's interfaces over the other services' gRPC APIs.

Calls carry the chat service's own token and name the user they act for from the loop's own
arguments (the request's `user_id`, the tools' `user_id`), never from an identity set around the run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import grpc
import grpc.aio
from agentplane.inference.v1 import inference_pb2, inference_service_pb2, inference_service_pb2_grpc
from agentplane.toolexec.v1 import toolexec_service_pb2, toolexec_service_pb2_grpc
from google.protobuf import duration_pb2

from services.chat.loop import ModelError, ModelLimits, ToolOutcome
from services.common import auth, nul_guard, rpc_errors
from services.config.client import ConfigClient


def _on_behalf_of(user_id: str) -> tuple[tuple[str, str], ...]:
    """Call metadata naming the user a call acts for (it wins over any ambient identity)."""
    return ((auth.ON_BEHALF_OF_METADATA_KEY, user_id),) if user_id else ()


def _model_error(exc: grpc.aio.AioRpcError) -> ModelError:
    info = rpc_errors.error_info(exc)
    reason = info[0] if info else exc.code().name
    return ModelError(reason.removeprefix("ERROR_REASON_"), exc.details() or exc.code().name)


class InferenceModel:
    """`loop.Model` over InferenceService.Generate."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._stub = inference_service_pb2_grpc.InferenceServiceStub(channel)

    async def generate(
        self, request: inference_service_pb2.GenerateRequest
    ) -> AsyncIterator[inference_service_pb2.GenerateResponse]:
        """Stream Generate; the call is cancelled when the consumer stops early."""
        call = self._stub.Generate(request, metadata=_on_behalf_of(request.user_id))
        try:
            async for event in call:
                # A model may emit NUL (a provider's "\u0000"), which Postgres cannot store: the
                # persisted message would fail the run.
                yield nul_guard.scrub(event)
        except grpc.aio.AioRpcError as exc:
            raise _model_error(exc) from None
        finally:
            call.cancel()


# Answers after which the call may or may not have run (the request itself was not refused).
_OUTCOME_UNKNOWN = frozenset(
    {
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
    }
)


class ToolExecTools:
    """`loop.Tools` over ToolExecService (tool list cached for a minute)."""

    def __init__(
        self,
        channel: grpc.aio.Channel,
        *,
        call_timeout_seconds: float = 300.0,
        unavailable_retry_seconds: float = 30.0,
    ) -> None:
        self._stub = toolexec_service_pb2_grpc.ToolExecServiceStub(channel)
        self._timeout = call_timeout_seconds
        self._retry_seconds = unavailable_retry_seconds
        self._tools: list[inference_pb2.ToolDefinition] | None = None
        self._tools_at = 0.0
        self._lock = asyncio.Lock()

    async def list_tools(self) -> list[inference_pb2.ToolDefinition]:
        """Every tool of toolexec, converted field by field (the schema JSON is passed unchanged)."""
        async with self._lock:
            if self._tools is not None and time.monotonic() - self._tools_at < 60:
                return self._tools
            tools: list[inference_pb2.ToolDefinition] = []
            token = ""
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self._retry_seconds
            delay = 0.1
            while True:
                try:
                    resp = await self._stub.ListTools(
                        toolexec_service_pb2.ListToolsRequest(page_size=100, page_token=token), timeout=10
                    )
                except grpc.aio.AioRpcError as exc:
                    # toolexec restarting: listing is safe to repeat, within the same bound as calls.
                    if exc.code() == grpc.StatusCode.UNAVAILABLE and loop.time() + delay <= deadline:
                        await asyncio.sleep(delay)
                        delay = min(delay * 2, 2.0)
                        continue
                    raise _model_error(exc) from None
                tools += [
                    inference_pb2.ToolDefinition(
                        name=t.name, description=t.description, input_schema_json=t.input_schema_json
                    )
                    for t in resp.tools
                ]
                token = resp.next_page_token
                if not token:
                    break
            self._tools, self._tools_at = tools, time.monotonic()
            return tools

    async def call(
        self, workspace_id: str, tool_call_id: str, name: str, arguments_json: str, *, user_id: str = ""
    ) -> ToolOutcome:
        """CallTool on behalf of `user_id` (none: as the channel's own identity); transport
        failures become error results the model sees."""
        request = toolexec_service_pb2.CallToolRequest(
            workspace_id=workspace_id,
            tool_call_id=tool_call_id,
            name=name,
            arguments_json=arguments_json,
            timeout=duration_pb2.Duration(seconds=int(self._timeout)),
        )
        # toolexec unreachable (restarting, a replica gone): the same tool_call_id is safe to send
        # again — the ledger and the workspace agent answer a repeated id without running it twice.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._retry_seconds
        delay = 0.1
        while True:
            try:
                resp = await self._stub.CallTool(
                    request, timeout=self._timeout + 30, metadata=_on_behalf_of(user_id)
                )
                break
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _OUTCOME_UNKNOWN:
                    return ToolOutcome(
                        f"The tool service failed while running this {name} call "
                        f"({exc.details() or exc.code().name}), so its outcome is unknown: it may have run, "
                        "fully or in part. Check the workspace (for example with read_file or execute) "
                        "before repeating it.",
                        True,
                    )
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    return ToolOutcome(f"The tool call failed: {exc.details() or exc.code().name}", True)
                if loop.time() + delay > deadline:
                    return ToolOutcome(
                        f"The tool service could not be reached for {self._retry_seconds:g} s "
                        f"({exc.details() or exc.code().name}), so the outcome of this {name} call is "
                        "unknown: it may have run, fully or in part. Check the workspace (for example "
                        "with read_file or execute) before repeating it.",
                        True,
                    )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        return ToolOutcome(
            content=resp.content,
            is_error=resp.is_error,
            structured_json=resp.structured_json,
            duration_ms=resp.duration.ToMilliseconds(),
        )


class ConfigPrompts:
    """`loop.Prompts` over the config client library (cached, invalidated through Redis)."""

    def __init__(self, client: ConfigClient) -> None:
        self._client = client

    async def model(self, model_config_id: str) -> ModelLimits:
        """The model config's limits (the default when `model_config_id` is empty)."""
        try:
            resolved = await self._client.resolve_model(model_config_id)
        except Exception as exc:  # a config outage must not crash the loop; skip compaction then
            del exc
            return ModelLimits(model_config_id, 0, 0)
        m = resolved.model_config
        return ModelLimits(m.id, int(m.context_limit), int(m.compaction_threshold_percent))

    async def system_prompt(self) -> str:
        """The deployment system prompt."""
        return await self._client.get_system_prompt()

    async def user_prompt(self, user_id: str) -> str:
        """The user's prompt, read acting for that user (the least the chat service needs)."""
        with auth.acting_for(user_id):
            return await self._client.get_user_prompt(user_id)
