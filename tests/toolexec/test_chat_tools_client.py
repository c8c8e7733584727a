"""The chat service's ToolExecTools when toolexec is unreachable: it sends the same tool_call_id
again (safe: the ledger and the agent answer a repeat without running it twice), and after its
bound it tells the model the outcome is unknown instead of a bare transport error."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from agentplane.toolexec.v1 import toolexec_service_pb2, toolexec_service_pb2_grpc

from services.chat.clients import ToolExecTools
from services.chat.loop import ModelError
from services.common.client import create_channel
from services.common.embedded import free_port
from services.toolexec import server as toolexec_server
from services.toolexec.settings import ToolexecSettings
from tests.helpers import make_test_settings
from tests.toolexec.conftest import StaticTemplates

pytestmark = pytest.mark.timeout(60)


async def test_unreachable_toolexec_is_an_unknown_outcome() -> None:
    channel = create_channel(f"127.0.0.1:{free_port()}", token="unused")
    try:
        tools = ToolExecTools(channel, unavailable_retry_seconds=0.3)
        outcome = await tools.call("ws_00000000000000000000", "call-1", "execute", '{"command": "true"}')
    finally:
        await channel.close()
    assert outcome.is_error
    assert "outcome of this execute call is unknown" in outcome.content and "may have run" in outcome.content


async def test_call_is_retried_until_toolexec_is_back(
    database_url: str,
    redis_url: str,
    tx_settings: ToolexecSettings,
    make_token: Callable[..., str],
) -> None:
    port = free_port()
    fixed = make_test_settings(
        database_url=database_url,
        redis_url=redis_url,
        extra_env={"AGENTPLANE_TOOLEXEC_PORT": str(port)},
    )
    templates = StaticTemplates()
    first = await toolexec_server.start(fixed, toolexec_settings=tx_settings, templates=templates)
    user = create_channel(first.address, token=make_token("alice"))
    ws = (
        await toolexec_service_pb2_grpc.ToolExecServiceStub(user).CreateWorkspace(
            toolexec_service_pb2.CreateWorkspaceRequest(name="retry")
        )
    ).workspace.id
    await user.close()
    await first.stop(0)
    channel = create_channel(f"127.0.0.1:{port}", token=make_token("alice"))
    second = None
    try:
        tools = ToolExecTools(channel, unavailable_retry_seconds=30)
        args = '{"command": "echo once >> side.txt"}'
        pending = asyncio.ensure_future(tools.call(ws, "call-1", "execute", args))
        # The first attempt has failed once the channel reports TRANSIENT_FAILURE: now bring it back.
        state = channel.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            await channel.wait_for_state_change(state)
            state = channel.get_state()
        assert not pending.done()
        second = await toolexec_server.start(fixed, toolexec_settings=tx_settings, templates=templates)
        outcome = await pending
        assert not outcome.is_error, outcome.content
        again = await tools.call(ws, "call-1", "execute", args)
        assert again.content == outcome.content
    finally:
        await channel.close()
        if second is not None:
            await second.stop(0)
    assert Path(tx_settings.workspaces_dir, ws, "side.txt").read_text() == "once\n"  # noqa: ASYNC240


async def test_listing_tools_waits_for_toolexec_within_the_bound(
    database_url: str, redis_url: str, tx_settings: ToolexecSettings
) -> None:
    port = free_port()
    fixed = make_test_settings(
        database_url=database_url,
        redis_url=redis_url,
        extra_env={"AGENTPLANE_TOOLEXEC_PORT": str(port)},
    )
    channel = create_channel(f"127.0.0.1:{port}", token="unused-by-list-tools")
    server = None
    try:
        tools = ToolExecTools(channel, unavailable_retry_seconds=30)
        pending = asyncio.ensure_future(tools.list_tools())
        # Nothing listens yet: once the first attempt has failed, start toolexec.
        state = channel.get_state(try_to_connect=True)
        while state != grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            await channel.wait_for_state_change(state)
            state = channel.get_state()
        assert not pending.done()
        server = await toolexec_server.start(
            fixed, toolexec_settings=tx_settings, templates=StaticTemplates()
        )
        with pytest.raises(ModelError) as refused:
            await pending
        # It got through to toolexec (which refuses the made-up token): not a transport error.
        assert refused.value.reason != "UNAVAILABLE", refused.value
    finally:
        await channel.close()
        if server is not None:
            await server.stop(0)
    # Without toolexec at all, the bound ends the wait with the model-facing error.
    gone = create_channel(f"127.0.0.1:{free_port()}", token="x")
    try:
        with pytest.raises(ModelError) as unavailable:
            await ToolExecTools(gone, unavailable_retry_seconds=0.3).list_tools()
        assert unavailable.value.reason == "UNAVAILABLE"
    finally:
        await gone.close()
