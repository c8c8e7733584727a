"""Generate end to end: real config server + real inference server + the simulator, over real channels."""

from __future__ import annotations

import json
import math

import grpc
import pytest
from agentplane.config.v1 import config_pb2, config_service_pb2, config_service_pb2_grpc
from agentplane.inference.v1 import inference_pb2, inference_service_pb2
from google.protobuf import field_mask_pb2

from services.common import auth
from services.common.client import create_channel
from services.simulator.script import Script
from tests.helpers import wait_until
from tests.inference.conftest import Stack
from tests.inference.helpers import (
    PNG_1PX,
    TOOLS,
    image,
    joined,
    kinds,
    reason_of,
    request,
    text,
    tool_calls,
    user,
)

OPENAI = config_pb2.PROVIDER_TYPE_OPENAI
ANTHROPIC = config_pb2.PROVIDER_TYPE_ANTHROPIC
COMPATIBLE = config_pb2.PROVIDER_TYPE_OPENAI_COMPATIBLE
TOOL_SCRIPT = Script.from_data(
    [
        {
            "turns": [
                {
                    "text": "Let me look.",
                    "tool_calls": [
                        {"name": "read_file", "arguments": {"path": "src/app.py"}},
                        {"name": "list_dir", "arguments": {"path": "src/components/widgets"}},
                    ],
                    "usage": {"input_tokens": 1000, "output_tokens": 40, "cache_read_tokens": 200},
                }
            ]
        }
    ]
)


async def test_text_streams_coalesced_and_ends_with_usage_and_finish(stack: Stack) -> None:
    model = await stack.model(OPENAI)
    events = await stack.generate(request(model, "say something [[words=50]]"))
    names = kinds(events)
    assert names[-2:] == ["usage", "finish"]
    assert set(names[:-2]) == {"text_delta"}
    assert len(joined(events, "text_delta").split()) == 50
    # The first delta goes out at once (one token); the burst behind it is coalesced.
    assert len(events[0].text_delta.text.split()) == 1
    assert names.count("text_delta") < 10
    assert events[-1].finish.reason == inference_pb2.FINISH_REASON_STOP
    assert events[-1].finish.provider_response_id.startswith("chatcmpl-")
    assert events[-2].usage.output_tokens == 50
    assert not events[-2].usage.HasField("cost_micros")  # no pricing -> no cost


async def test_deltas_are_sent_at_most_every_interval(stack: Stack) -> None:
    model = await stack.model(OPENAI)
    stack.sim.state.token_delay_ms = 4
    events = await stack.generate(request(model, "[[words=60]]"))
    deltas = [e for e in events if e.HasField("text_delta")]
    # ~240 ms of tokens at one flush per 20 ms: far fewer messages than tokens, more than one.
    assert 3 <= len(deltas) <= 25
    assert len(joined(events, "text_delta").split()) == 60


@pytest.mark.parametrize("provider_type", [OPENAI, ANTHROPIC, COMPATIBLE])
async def test_parallel_tool_calls_arrive_whole(stack: Stack, provider_type: int) -> None:
    stack.sim.set_script(TOOL_SCRIPT)
    model = await stack.model(provider_type)
    events = await stack.generate(request(model, "fix it", tools=TOOLS))
    assert tool_calls(events) == [
        ("read_file", {"path": "src/app.py"}),
        ("list_dir", {"path": "src/components/widgets"}),
    ]
    names = kinds(events)
    # Text is flushed before the first tool call; the finish says TOOL_CALLS.
    assert names.index("tool_call") > max(i for i, n in enumerate(names) if n == "text_delta")
    assert joined(events, "text_delta") == "Let me look."
    assert events[-1].finish.reason == inference_pb2.FINISH_REASON_TOOL_CALLS
    assert all(e.tool_call.id for e in events if e.HasField("tool_call"))
    sent = stack.sim.requests[-1].body
    tools = sent["tools"]
    assert len(tools) == 2


async def test_responses_api_when_the_model_asks_for_it(stack: Stack) -> None:
    stack.sim.set_script(TOOL_SCRIPT)
    model = await stack.model(OPENAI, options={"useResponsesApi": True})
    events = await stack.generate(request(model, "fix it", tools=TOOLS))
    assert stack.sim.requests[-1].path == "/v1/responses"
    assert [name for name, _ in tool_calls(events)] == ["read_file", "list_dir"]
    assert events[-2].usage.input_tokens == 1000 and events[-2].usage.cache_read_tokens == 200


async def test_same_script_same_events_over_openai_and_anthropic(stack: Stack) -> None:
    stack.sim.set_script(TOOL_SCRIPT)
    normalized = []
    for provider_type in (OPENAI, ANTHROPIC, COMPATIBLE):
        model = await stack.model(provider_type)
        events = await stack.generate(request(model, "fix it", tools=TOOLS))
        usage = events[-2].usage
        normalized.append(
            (
                joined(events, "text_delta"),
                tool_calls(events),
                (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens, usage.cache_write_tokens),
                events[-1].finish.reason,
                [n for n in kinds(events) if n != "text_delta"],
            )
        )
    assert normalized[0] == normalized[1] == normalized[2]


async def test_anthropic_reasoning_keeps_its_signature_and_marks_cache(stack: Stack) -> None:
    turns = [{"text": "Earlier answer."}, {"reasoning": "Think it through.", "text": "Answer."}]
    stack.sim.set_script(Script.from_data([{"turns": turns}]))
    model = await stack.model(ANTHROPIC, model_name="sim-claude", options={"thinkingBudgetTokens": 2048})
    req = request(model, "why?", system_prompt="You are helpful.")
    req.messages.extend(
        [
            inference_pb2.Message(role=inference_pb2.ROLE_ASSISTANT, parts=[text("Earlier answer.")]),
            user(text("And now?")),
        ]
    )
    events = await stack.generate(req)
    reasoning = [e.reasoning_delta for e in events if e.HasField("reasoning_delta")]
    assert "".join(r.text for r in reasoning) == "Think it through."
    assert reasoning[-1].signature.startswith("sig_") and reasoning[-1].text == ""
    assert joined(events, "text_delta") == "Answer."
    names = kinds(events)
    assert names.index("text_delta") > max(i for i, n in enumerate(names) if n == "reasoning_delta")
    body = stack.sim.requests[-1].body
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert body["system"][0]["cache_control"] == {"type": "ephemeral"}
    marked = ["cache_control" in m["content"][-1] for m in body["messages"]]
    assert marked == [False, True, True]


async def test_openai_reasoning_content_becomes_reasoning_deltas(stack: Stack) -> None:
    stack.sim.set_script(Script.from_data([{"turns": [{"reasoning": "Hmm, let me see.", "text": "Yes."}]}]))
    model = await stack.model(COMPATIBLE)
    events = await stack.generate(request(model, "q"))
    assert joined(events, "reasoning_delta") == "Hmm, let me see."
    assert joined(events, "text_delta") == "Yes."
    assert events[-2].usage.reasoning_tokens == 4


@pytest.mark.parametrize("provider_type", [OPENAI, ANTHROPIC])
async def test_images_are_sent_inline(stack: Stack, provider_type: int) -> None:
    model = await stack.model(provider_type)
    req = inference_service_pb2.GenerateRequest(
        model_config_id=model, messages=[user(text("what is this?"), image(PNG_1PX))]
    )
    events = await stack.generate(req)
    assert events[-1].HasField("finish")
    content = stack.sim.requests[-1].body["messages"][-1]["content"]
    if provider_type == OPENAI:
        assert content[1]["image_url"]["url"].startswith("data:image/png;base64,iVBOR")
    else:
        assert content[1]["source"]["media_type"] == "image/png"


async def test_usage_cost_is_rounded_up_from_pricing(stack: Stack) -> None:
    stack.sim.set_script(TOOL_SCRIPT)
    pricing = {
        "inputMicrosPerMillion": 3_000_000,
        "outputMicrosPerMillion": 15_000_000,
        "cacheReadMicrosPerMillion": 300_000,
        "cacheWriteMicrosPerMillion": 3_750_000,
    }
    model = await stack.model(ANTHROPIC, pricing=pricing)
    events = await stack.generate(request(model, "x", tools=TOOLS))
    usage = events[-2].usage
    assert (usage.input_tokens, usage.output_tokens, usage.cache_read_tokens) == (1000, 40, 200)
    expected = math.ceil((1000 * 3_000_000 + 40 * 15_000_000 + 200 * 300_000) / 1_000_000)
    assert usage.cost_micros == expected == 3660


async def test_rate_limit_is_retried_with_retry_after_and_announced(stack: Stack) -> None:
    model = await stack.model(OPENAI)
    stack.sim.inject_fault("rate_limit", count=1, retry_after=0.05)
    events = await stack.generate(request(model, "hello"))
    assert kinds(events)[0] == "retry"
    notice = events[0].retry
    assert (notice.attempt, notice.max_attempts, notice.delay_ms, notice.reason) == (2, 3, 50, "RATE_LIMITED")
    assert events[-1].HasField("finish")
    assert len(stack.sim.requests) == 2


@pytest.mark.parametrize(
    ("provider_type", "kind", "reason"),
    [
        (OPENAI, "server_error", "PROVIDER_UNAVAILABLE"),
        (ANTHROPIC, "overloaded", "PROVIDER_UNAVAILABLE"),
        (ANTHROPIC, "slow_headers", None),
    ],
)
async def test_transient_faults_are_retried(
    stack: Stack, provider_type: int, kind: str, reason: str | None
) -> None:
    model = await stack.model(provider_type)
    stack.sim.inject_fault(kind, count=1, delay_ms=100)
    events = await stack.generate(request(model, "hello"))
    retries = [e.retry.reason for e in events if e.HasField("retry")]
    assert retries == ([reason] if reason else [])
    assert events[-1].HasField("finish")


async def test_drop_before_output_is_retried(stack: Stack) -> None:
    model = await stack.model(OPENAI)
    stack.sim.inject_fault("drop", after_chunks=0)
    events = await stack.generate(request(model, "[[words=5]]"))
    assert [e.retry.reason for e in events if e.HasField("retry")] == ["PROVIDER_UNAVAILABLE"]
    assert len(joined(events, "text_delta").split()) == 5


async def test_rate_limit_that_persists_surfaces_resource_exhausted(stack: Stack) -> None:
    model = await stack.model(ANTHROPIC)
    stack.sim.inject_fault("rate_limit", count=10, retry_after=0.01)
    seen = []
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for event in stack.stub.Generate(request(model, "x"), timeout=30):
            seen.append(event)
    assert exc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert reason_of(exc.value) == "RATE_LIMITED"
    assert "after 3 attempts" in (exc.value.details() or "")
    assert kinds(seen) == ["retry", "retry"]


@pytest.mark.parametrize("provider_type", [OPENAI, ANTHROPIC])
async def test_context_length_is_its_own_reason_and_not_retried(stack: Stack, provider_type: int) -> None:
    model = await stack.model(provider_type)
    stack.sim.inject_fault("context_length", count=5)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stack.generate(request(model, "x"))
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason_of(exc.value) == "CONTEXT_LENGTH_EXCEEDED"
    assert len(stack.sim.requests) == 1


@pytest.mark.parametrize("kind", ["drop", "malformed"])
async def test_failure_after_output_ends_the_stream(stack: Stack, kind: str) -> None:
    model = await stack.model(OPENAI)
    stack.sim.inject_fault(kind, after_chunks=3)
    seen = []
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for event in stack.stub.Generate(request(model, "[[words=30]]"), timeout=30):
            seen.append(event)
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE
    assert reason_of(exc.value) == "STREAM_INTERRUPTED"
    assert seen and all(e.HasField("text_delta") for e in seen)
    assert len(stack.sim.requests) == 1  # nothing retried once output started


@pytest.mark.parametrize("provider_type", [OPENAI, ANTHROPIC])
async def test_wrong_key_is_provider_auth_failed(stack: Stack, provider_type: int) -> None:
    model = await stack.model(provider_type, api_key="sk-wrong-key-abcdef")
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stack.generate(request(model, "x"))
    assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(exc.value) == "PROVIDER_AUTH_FAILED"
    details = exc.value.details() or ""
    assert "provider" in details and "sim-gpt" in details and "sk-wrong-key-abcdef" not in details


async def test_client_is_rebuilt_when_the_provider_key_changes(stack: Stack) -> None:
    model = await stack.model(OPENAI)
    await stack.generate(request(model, "x"))
    stack.sim.set_expected_api_key("sk-rotated-key-999")
    with pytest.raises(grpc.aio.AioRpcError):
        await stack.generate(request(model, "x"))
    channel = create_channel(stack.config.address, token=stack.admin_token)
    try:
        admin = config_service_pb2_grpc.ConfigServiceStub(channel)
        resolved = await admin.ResolveModel(config_service_pb2.ResolveModelRequest(model_config_id=model))
        await admin.UpdateProvider(
            config_service_pb2.UpdateProviderRequest(
                provider=config_pb2.Provider(id=resolved.provider.id),
                update_mask=field_mask_pb2.FieldMask(paths=["api_key"]),
                api_key="sk-rotated-key-999",
            )
        )
    finally:
        await channel.close()

    async def succeeds() -> bool:
        try:
            await stack.generate(request(model, "x"))
        except grpc.aio.AioRpcError:
            return False
        return True

    # The invalidation reaches the inference service's config client through Redis; each try is an RPC.
    await wait_until(succeeds, what="Generate to use the rotated key")
    assert stack.sim.requests[-1].api_key == "sk-rotated-key-999"


# A reply that holds after its first word until the test opens the gate (it never does here).
HELD_AFTER_ONE_WORD = Script.from_data(
    [{"turns": [{"text": "first then never more", "gate": {"name": "held", "after_chunks": 1}}]}]
)


async def test_cancelling_generate_closes_the_provider_stream(stack: Stack) -> None:
    model = await stack.model(ANTHROPIC)
    stack.sim.set_script(HELD_AFTER_ONE_WORD)
    call = stack.stub.Generate(request(model, "x"), timeout=30)
    async for event in call:
        assert event.text_delta.text == "first"
        break
    await stack.sim.wait_held("held")
    assert stack.sim.open_streams == 1
    call.cancel()
    await stack.sim.wait_until(lambda: stack.sim.client_closed_streams == 1, within=5)
    assert stack.sim.open_streams == 0 and stack.sim.gate("held").held == 0
    assert not stack.sim.streams[-1].completed


async def test_deadline_closes_the_provider_stream(stack: Stack) -> None:
    model = await stack.model(OPENAI)
    stack.sim.set_script(HELD_AFTER_ONE_WORD)
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in stack.stub.Generate(request(model, "x"), timeout=0.5):
            pass
    assert exc.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await stack.sim.wait_until(lambda: stack.sim.client_closed_streams == 1, within=5)
    assert stack.sim.gate("held").held == 0 and not stack.sim.streams[-1].completed


async def test_plain_users_are_refused(stack: Stack) -> None:
    model = await stack.model(OPENAI)
    stub = stack.stub_with(stack.make_token("alice", auth.Role.USER))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stub.Generate(request(model, "x")).read()
    assert exc.value.code() == grpc.StatusCode.PERMISSION_DENIED
    admin = stack.stub_with(stack.admin_token)
    events = [e async for e in admin.Generate(request(model, "x"))]
    assert events[-1].HasField("finish")


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (lambda r: r.ClearField("messages"), "messages"),
        (lambda r: r.messages.add(), "messages[1].role"),
        (lambda r: r.messages[0].parts.append(image(b"not an image")), "messages[0].parts[1].image.data"),
        (
            lambda r: r.messages[0].parts.append(image(PNG_1PX, "image/jpeg")),
            "messages[0].parts[1].image.mime_type",
        ),
        (lambda r: r.tools.add(name="bad name!"), "tools[0].name"),
        (lambda r: r.tools.add(name="t", input_schema_json="[1]"), "tools[0].input_schema_json"),
        (
            lambda r: r.messages.add(
                role=inference_pb2.ROLE_TOOL,
                parts=[
                    inference_pb2.ContentPart(tool_result=inference_pb2.ToolResultPart(tool_call_id="nope"))
                ],
            ),
            "messages[1].parts[0].tool_result.tool_call_id",
        ),
        (
            lambda r: r.tool_choice.CopyFrom(
                inference_pb2.ToolChoice(mode=inference_pb2.TOOL_CHOICE_MODE_REQUIRED)
            ),
            "tool_choice.mode",
        ),
        (lambda r: r.options.CopyFrom(inference_pb2.GenerationOptions(temperature=7)), "options.temperature"),
    ],
)
async def test_invalid_requests_name_the_field(stack: Stack, mutate: object, field: str) -> None:
    req = request("any", "x")
    mutate(req)  # type: ignore[operator]
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stack.generate(req)
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (exc.value.details() or "").startswith(field + ":")
    assert stack.sim.requests == []


async def test_list_provider_models_paginates(stack: Stack) -> None:
    await stack.model(ANTHROPIC)
    model = await stack.model(OPENAI)
    channel = create_channel(stack.config.address, token=stack.admin_token)
    try:
        admin = config_service_pb2_grpc.ConfigServiceStub(channel)
        resolved = await admin.ResolveModel(config_service_pb2.ResolveModelRequest(model_config_id=model))
    finally:
        await channel.close()
    first = await stack.stub.ListProviderModels(
        inference_service_pb2.ListProviderModelsRequest(provider_id=resolved.provider.id, page_size=2)
    )
    assert [m.id for m in first.models] == ["sim-gpt", "sim-gpt-mini"] and first.next_page_token
    rest = await stack.stub.ListProviderModels(
        inference_service_pb2.ListProviderModelsRequest(
            provider_id=resolved.provider.id, page_size=2, page_token=first.next_page_token
        )
    )
    assert [m.id for m in rest.models] == ["sim-claude"] and rest.next_page_token == ""
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        await stack.stub.ListProviderModels(inference_service_pb2.ListProviderModelsRequest())
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_scripts_are_plain_json() -> None:
    assert json.loads(json.dumps([{"turns": [{"text": "x"}]}]))
