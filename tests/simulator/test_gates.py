"""Gates: a scripted reply holds where the script says until the test opens the gate."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest

from services.simulator.script import Script, ScriptError
from services.simulator.server import SimulatorHandle
from tests.helpers import wait_until


def _user(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


def _gated(gate: object, text: str = "one two three four five") -> Script:
    return Script.from_data([{"turns": [{"text": text, "gate": gate}]}])


async def _read_words(stream: Any, words: list[str]) -> None:
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            words.append(chunk.choices[0].delta.content.strip())


async def test_a_reply_holds_mid_stream_until_the_gate_opens(sim: SimulatorHandle, oai: Any) -> None:
    sim.set_script(_gated({"name": "mid", "after_chunks": 2}))
    stream = await oai.chat.completions.create(model="sim-gpt", messages=_user("x"), stream=True)
    words: list[str] = []
    reader = asyncio.create_task(_read_words(stream, words))
    held = await sim.wait_held("mid")
    assert (held.held, held.arrived, held.open) == (1, 1, False)
    # Held after exactly two output chunks: the client gets them and the stream stays open.
    await wait_until(lambda: len(words) == 2, what="the two chunks before the gate")
    assert words == ["one", "two"] and not reader.done() and sim.open_streams == 1
    await sim.open_gate("mid")
    await asyncio.wait_for(reader, 10)
    assert words == ["one", "two", "three", "four", "five"]
    assert sim.gate("mid").held == 0 and sim.streams[-1].completed
    # Open stays open: the next reply passes without holding, and is counted.
    second = await oai.chat.completions.create(model="sim-gpt", messages=_user("x"))
    assert second.choices[0].message.content == "one two three four five"
    assert sim.gate("mid").arrived == 2


async def test_chunks_before_the_gate_reach_the_client_while_it_holds(sim: SimulatorHandle, oai: Any) -> None:
    sim.set_script(_gated({"name": "g", "after_chunks": 3}))
    stream = await oai.chat.completions.create(model="sim-gpt", messages=_user("x"), stream=True)
    words: list[str] = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            words.append(chunk.choices[0].delta.content.strip())
            if len(words) == 3:
                break
    assert words == ["one", "two", "three"]
    await sim.wait_held("g")
    await stream.close()
    # A held reply whose client left is released and recorded as closed by the client.
    await sim.wait_until(lambda: sim.client_closed_streams == 1)
    assert sim.gate("g").held == 0 and not sim.streams[-1].completed


async def test_closing_the_gate_holds_later_replies_again(sim: SimulatorHandle, oai: Any) -> None:
    sim.set_script(_gated("start"))
    await sim.open_gate("start")
    assert (await oai.chat.completions.create(model="sim-gpt", messages=_user("x"))).choices
    closed = await sim.close_gate("start")
    assert (closed.open, closed.arrived) == (False, 1)
    # Not streamed, held before anything is answered; a gate can hold several replies at once.
    calls = [
        asyncio.create_task(oai.chat.completions.create(model="sim-gpt", messages=_user(f"x{i}")))
        for i in range(2)
    ]
    await sim.wait_held("start", count=2)
    assert not any(c.done() for c in calls)
    await sim.open_gate("start")
    replies = await asyncio.wait_for(asyncio.gather(*calls), 10)
    assert [r.choices[0].message.content for r in replies] == ["one two three four five"] * 2


async def test_anthropic_and_responses_replies_hold_too(sim: SimulatorHandle, oai: Any, ant: Any) -> None:
    sim.set_script(_gated("g"))
    message = asyncio.create_task(
        ant.messages.create(model="sim-claude", max_tokens=100, messages=_user("x"))
    )
    response = asyncio.create_task(oai.responses.create(model="sim-gpt", input="x"))
    await sim.wait_held("g", count=2)
    await sim.open_gate("g")
    assert (await message).content[0].text == "one two three four five"
    assert (await response).output_text == "one two three four five"


async def test_a_gate_after_more_chunks_than_the_reply_has_holds_before_its_end(
    sim: SimulatorHandle, oai: Any
) -> None:
    sim.set_script(_gated({"name": "end", "after_chunks": 50}, text="short reply"))
    stream = await oai.chat.completions.create(model="sim-gpt", messages=_user("x"), stream=True)
    words: list[str] = []
    reader = asyncio.create_task(_read_words(stream, words))
    await sim.wait_held("end")
    await sim.open_gate("end")
    await asyncio.wait_for(reader, 10)
    assert words == ["short", "reply"]


async def test_wait_held_names_the_gate_when_nothing_arrives(sim: SimulatorHandle) -> None:
    with pytest.raises(TimeoutError, match=r"gate 'never': waited 0.05 s for 1 held replies; it holds 0"):
        await sim.wait_held("never", within=0.05)


async def test_gates_over_http(sim: SimulatorHandle, oai: Any) -> None:
    sim.set_script(_gated("http"))
    call = asyncio.create_task(oai.chat.completions.create(model="sim-gpt", messages=_user("x")))
    base = f"{sim.base_url}/_sim/gates"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/http/wait", params={"held": "1", "timeout": "10"}) as r:
            assert r.status == 200
            assert await r.json() == {"name": "http", "open": False, "held": 1, "arrived": 1}
        async with session.get(f"{base}/http/wait", params={"held": "2", "timeout": "0.05"}) as r:
            assert r.status == 504
            assert "held 1 replies after 0.05 s, not 2" in (await r.json())["error"]
        async with session.post(f"{base}/http/open") as r:
            assert r.status == 200 and (await r.json())["open"] is True
        assert (await asyncio.wait_for(call, 10)).choices[0].message.content == "one two three four five"
        async with session.post(f"{base}/http/close") as r:
            assert (await r.json()) == {"name": "http", "open": False, "held": 0, "arrived": 1}
        async with session.get(base) as r:
            assert [g["name"] for g in await r.json()] == ["http"]
        async with session.get(f"{sim.base_url}/_sim/stats") as r:
            assert (await r.json())["gates"] == [{"name": "http", "open": False, "held": 0, "arrived": 1}]
        async with session.post(f"{sim.base_url}/_sim/script", json=[{"turns": [{"gate": 3}]}]) as r:
            assert r.status == 400 and "gate must be a name" in (await r.json())["error"]


def test_gate_validation_names_the_problem() -> None:
    with pytest.raises(ScriptError, match="gate must be a name"):
        Script.from_data([{"turns": [{"gate": {"after_chunks": 1}}]}])
    with pytest.raises(ScriptError, match=r"gate\.after_chunks"):
        Script.from_data([{"turns": [{"gate": {"name": "g", "after_chunks": -1}}]}])
