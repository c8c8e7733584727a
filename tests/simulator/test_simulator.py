"""The simulator through the official SDKs: scripts, default mode, wire formats, faults, disconnects."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from services.simulator.script import Script, ScriptError
from services.simulator.server import SimulatorHandle

AGENT_SCRIPT = Script.from_data(
    {
        "conversations": [
            {
                "match": "fix the bug",
                "turns": [
                    {
                        "reasoning": "I should read the file first.",
                        "tool_calls": [
                            {"name": "read_file", "arguments": {"path": "src/app.py"}},
                            {"name": "list_dir", "arguments": {"path": "src", "depth": 2}},
                        ],
                    },
                    {
                        "text": "The bug is fixed now.",
                        "usage": {"input_tokens": 100, "cache_read_tokens": 40},
                    },
                ],
            },
            {"turns": [{"text": "fallback reply"}]},
        ]
    }
)


def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


async def _collect_openai(stream: Any) -> tuple[str, dict[int, dict[str, str]], str | None, Any]:
    text = ""
    calls: dict[int, dict[str, str]] = {}
    finish = None
    usage = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for tc in choice.delta.tool_calls or []:
                entry = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += tc.id or ""
                if tc.function is not None:
                    entry["name"] += tc.function.name or ""
                    entry["arguments"] += tc.function.arguments or ""
            finish = choice.finish_reason or finish
    return text, calls, finish, usage


async def test_default_mode_replies_with_the_requested_length(sim: SimulatorHandle, oai: Any) -> None:
    stream = await oai.chat.completions.create(
        model="sim-gpt",
        messages=_user("write something [[words=50]]"),
        stream=True,
        stream_options={"include_usage": True},
    )
    text, calls, finish, usage = await _collect_openai(stream)
    assert len(text.split()) == 50
    assert calls == {}
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == 50
    assert sim.requests[-1].api_key == "sk-test"


async def test_script_drives_a_multi_step_run_over_openai(sim: SimulatorHandle, oai: Any) -> None:
    sim.set_script(AGENT_SCRIPT)
    messages: list[dict[str, Any]] = _user("please fix the bug in app.py")
    stream = await oai.chat.completions.create(model="sim-gpt", messages=messages, stream=True)
    text, calls, finish, _ = await _collect_openai(stream)
    assert finish == "tool_calls"
    assert [c["name"] for c in calls.values()] == ["read_file", "list_dir"]
    assert json.loads(calls[0]["arguments"]) == {"path": "src/app.py"}
    assert json.loads(calls[1]["arguments"]) == {"path": "src", "depth": 2}
    messages.append(
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": c["arguments"]},
                }
                for c in calls.values()
            ],
        }
    )
    for c in calls.values():
        messages.append({"role": "tool", "tool_call_id": c["id"], "content": "ok"})
    stream = await oai.chat.completions.create(
        model="sim-gpt",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, calls, finish, usage = await _collect_openai(stream)
    assert (text, calls, finish) == ("The bug is fixed now.", {}, "stop")
    assert usage.prompt_tokens == 140 and usage.prompt_tokens_details.cached_tokens == 40
    other = await oai.chat.completions.create(model="sim-gpt", messages=_user("hello"))
    assert other.choices[0].message.content == "fallback reply"


async def test_tool_arguments_arrive_in_fragments_and_interleave(sim: SimulatorHandle, oai: Any) -> None:
    sim.set_script(AGENT_SCRIPT)
    stream = await oai.chat.completions.create(model="sim-gpt", messages=_user("fix the bug"), stream=True)
    order: list[int] = []
    async for chunk in stream:
        for choice in chunk.choices:
            for tc in choice.delta.tool_calls or []:
                if tc.function is not None and tc.function.arguments:
                    order.append(tc.index)
    assert order.count(0) >= 2 and order.count(1) >= 2
    assert order != sorted(order), "parallel calls should interleave"


async def test_anthropic_stream_has_thinking_text_and_tool_use(sim: SimulatorHandle, ant: Any) -> None:
    sim.set_script(AGENT_SCRIPT)
    async with ant.messages.stream(
        model="sim-claude", max_tokens=1000, messages=_user("fix the bug")
    ) as stream:
        async for _ in stream:
            pass
        message = await stream.get_final_message()
    kinds = [b.type for b in message.content]
    assert kinds == ["thinking", "tool_use", "tool_use"]
    assert message.content[0].thinking == "I should read the file first."
    assert message.content[0].signature.startswith("sig_")
    assert message.content[1].input == {"path": "src/app.py"}
    assert message.stop_reason == "tool_use"


async def test_anthropic_usage_reports_cache_tokens(sim: SimulatorHandle, ant: Any) -> None:
    sim.set_script(
        Script.from_data(
            [
                {
                    "turns": [
                        {
                            "text": "hi",
                            "usage": {"input_tokens": 10, "cache_read_tokens": 5, "cache_write_tokens": 7},
                        }
                    ]
                }
            ]
        )
    )
    reply = await ant.messages.create(model="sim-claude", max_tokens=100, messages=_user("x"))
    assert reply.usage.input_tokens == 10
    assert reply.usage.cache_read_input_tokens == 5
    assert reply.usage.cache_creation_input_tokens == 7


async def test_responses_api_streams_text_and_function_calls(sim: SimulatorHandle, oai: Any) -> None:
    sim.set_script(AGENT_SCRIPT)
    stream = await oai.responses.create(model="sim-gpt", input="fix the bug", stream=True)
    args: dict[str, str] = {}
    final = None
    async for event in stream:
        if event.type == "response.function_call_arguments.delta":
            args[event.item_id] = args.get(event.item_id, "") + event.delta
        if event.type == "response.completed":
            final = event.response
    assert final is not None and final.usage is not None
    assert sorted(json.loads(a)["path"] for a in args.values()) == ["src", "src/app.py"]
    calls = [item for item in final.output if item.type == "function_call"]
    assert [c.name for c in calls] == ["read_file", "list_dir"]


@pytest.mark.parametrize(
    ("kind", "openai_error", "anthropic_error", "status"),
    [
        ("rate_limit", openai.RateLimitError, anthropic.RateLimitError, 429),
        ("server_error", openai.InternalServerError, anthropic.InternalServerError, 500),
        ("context_length", openai.BadRequestError, anthropic.BadRequestError, 400),
    ],
)
async def test_error_faults_in_both_formats(
    sim: SimulatorHandle,
    oai: Any,
    ant: Any,
    kind: str,
    openai_error: type[Exception],
    anthropic_error: type[Exception],
    status: int,
) -> None:
    sim.inject_fault(kind, count=2, retry_after=2)
    with pytest.raises(openai_error) as oe:
        await oai.chat.completions.create(model="sim-gpt", messages=_user("x"))
    with pytest.raises(anthropic_error) as ae:
        await ant.messages.create(model="sim-claude", max_tokens=10, messages=_user("x"))
    oerr: Any = oe.value
    aerr: Any = ae.value
    assert oerr.status_code == status and aerr.status_code == status
    if kind == "rate_limit":
        assert oerr.response.headers["retry-after"] == "2"
    if kind == "context_length":
        assert oerr.code == "context_length_exceeded"
        assert "prompt is too long" in str(ae.value)
    # The faults were used up: the next request succeeds.
    ok = await oai.chat.completions.create(model="sim-gpt", messages=_user("x"))
    assert ok.choices[0].message.content


async def test_overloaded_is_529_in_anthropic_format(sim: SimulatorHandle, ant: Any) -> None:
    sim.inject_fault("overloaded")
    with pytest.raises(anthropic.APIStatusError) as exc:
        await ant.messages.create(model="sim-claude", max_tokens=10, messages=_user("x"))
    assert exc.value.status_code == 529
    body: Any = exc.value.body
    assert body["error"]["type"] == "overloaded_error"


async def test_wrong_key_is_401(sim: SimulatorHandle, oai: Any, ant: Any) -> None:
    sim.set_expected_api_key("the-right-key")
    with pytest.raises(openai.AuthenticationError):
        await oai.chat.completions.create(model="sim-gpt", messages=_user("x"))
    with pytest.raises(anthropic.AuthenticationError):
        await ant.messages.create(model="sim-claude", max_tokens=10, messages=_user("x"))
    good: Any = openai.AsyncOpenAI(base_url=sim.openai_base_url, api_key="the-right-key", max_retries=0)
    assert (await good.chat.completions.create(model="sim-gpt", messages=_user("x"))).choices


async def test_dropped_and_malformed_streams_fail_mid_stream(sim: SimulatorHandle, oai: Any) -> None:
    for kind in ("drop", "malformed"):
        sim.inject_fault(kind, after_chunks=3)
        stream = await oai.chat.completions.create(
            model="sim-gpt",
            messages=_user("[[words=20]]"),
            stream=True,
        )
        received = ""
        with pytest.raises(Exception) as exc:
            async for chunk in stream:
                received += chunk.choices[0].delta.content or "" if chunk.choices else ""
        assert len(received.split()) == 3, kind
        assert not isinstance(exc.value, AssertionError)


async def test_slow_headers_delay_the_response(sim: SimulatorHandle, oai: Any) -> None:
    sim.inject_fault("slow_headers", delay_ms=300)
    loop = asyncio.get_running_loop()
    start = loop.time()
    await oai.chat.completions.create(model="sim-gpt", messages=_user("x"))
    assert loop.time() - start >= 0.3


async def test_scripted_fault_hits_only_the_first_requests(sim: SimulatorHandle, oai: Any) -> None:
    sim.set_script(
        Script.from_data([{"turns": [{"text": "done", "fault": {"kind": "server_error", "times": 2}}]}])
    )
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            await oai.chat.completions.create(model="sim-gpt", messages=_user("x"))
    ok = await oai.chat.completions.create(model="sim-gpt", messages=_user("x"))
    assert ok.choices[0].message.content == "done"


async def test_client_closing_the_stream_is_observed(sim: SimulatorHandle, oai: Any) -> None:
    sim.state.token_delay_ms = 50
    stream = await oai.chat.completions.create(
        model="sim-gpt",
        messages=_user("[[words=200]]"),
        stream=True,
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    assert sim.open_streams == 1
    await stream.close()
    await sim.wait_until(lambda: sim.client_closed_streams == 1, within=5)
    assert sim.open_streams == 0
    assert not sim.streams[-1].completed


async def test_http_control_endpoints(sim: SimulatorHandle, oai: Any) -> None:
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.base_url}/_sim/faults", json={"kind": "rate_limit", "count": 1}) as r:
            assert r.status == 200
        async with session.post(f"{sim.base_url}/_sim/faults", json={"kind": "nonsense"}) as r:
            assert r.status == 400
        async with session.post(f"{sim.base_url}/_sim/script", json=[{"turns": [{"text": "scripted"}]}]) as r:
            assert r.status == 200
    with pytest.raises(openai.RateLimitError):
        await oai.chat.completions.create(model="sim-gpt", messages=_user("x"))
    ok = await oai.chat.completions.create(model="sim-gpt", messages=_user("x"))
    assert ok.choices[0].message.content == "scripted"
    async with aiohttp.ClientSession() as session, session.get(f"{sim.base_url}/_sim/stats") as r:
        stats = await r.json()
    assert stats["requests"] == 2


async def test_models_in_both_formats(oai: Any, ant: Any) -> None:
    assert "sim-gpt" in [m.id async for m in oai.models.list()]
    assert "Simulated Claude" in [m.display_name async for m in ant.models.list()]


def test_script_validation_names_the_problem() -> None:
    with pytest.raises(ScriptError, match=r"fault\.kind"):
        Script.from_data([{"turns": [{"fault": {"kind": "boom"}}]}])
    with pytest.raises(ScriptError, match="turns"):
        Script.from_data([{"match": "x"}])
    with pytest.raises(ScriptError, match="finish"):
        Script.from_data([{"turns": [{"finish": "maybe"}]}])
