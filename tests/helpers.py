"""Reusable test helpers: settings for tests, in-process servers, channels.

Typical use in a service's tests::

    from services.chat import server as chat_server
    from tests.helpers import serve_in_process

    async def test_x(settings, make_token):
        async with serve_in_process(chat_server.build, settings, token=make_token("alice")) as svc:
            stub = chat_service_pb2_grpc.ChatServiceStub(svc.channel)
            ...

Waiting for something to happen is `await wait_until(condition, what="...")`, the one polling
helper of the test suite.
"""

from __future__ import annotations

import asyncio
import inspect
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, overload

import grpc
import grpc.aio

from services.common import keys
from services.common.client import create_channel
from services.common.server import ServerHandle
from services.common.settings import SERVICE_NAMES, Settings

_TEST_KEYS_DIR: str | None = None
T = TypeVar("T")
# How often `wait_until` looks again: short enough not to slow tests, long enough not to spin.
POLL_INTERVAL_SECONDS = 0.02


def deployment_keys_dir() -> str:
    """The test deployment's key directory (made once per test process): the user issuer key, one
    signing key per service, and the public key set."""
    global _TEST_KEYS_DIR
    if _TEST_KEYS_DIR is None:
        directory = tempfile.mkdtemp(prefix="agentplane-test-keys-")
        keys.init_dir(directory, SERVICE_NAMES)
        _TEST_KEYS_DIR = directory
    return _TEST_KEYS_DIR


def deployment_keys() -> keys.Keys:
    """Every key of `deployment_keys_dir()` (tests mint any identity's tokens)."""
    return keys.from_dir(deployment_keys_dir(), SERVICE_NAMES)


def issuer_key_material() -> str:
    """The base64 body of the user issuer's private key: what must never leak anywhere."""
    pem = (Path(deployment_keys_dir()) / keys.ISSUER_KEY_FILENAME).read_text()
    return "".join(line for line in pem.splitlines() if not line.startswith("-----"))


# The config service's API-key encryption key in tests (`id:secret`; key id "test").
TEST_ENCRYPTION_KEY = "test:agentplane-test-encryption-key-0123456789"


def make_test_settings(
    database_url: str | None = None,
    redis_url: str | None = None,
    keys_dir: str | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> Settings:
    """Settings for in-process tests: every service on 127.0.0.1 port 0, metrics off, grace 1 s,
    and a fixed encryption key (`TEST_ENCRYPTION_KEY`) for the config service."""
    env = {
        "AGENTPLANE_KEYS_DIR": keys_dir or deployment_keys_dir(),
        "AGENTPLANE_ENCRYPTION_KEY": TEST_ENCRYPTION_KEY,
        "AGENTPLANE_HOST": "127.0.0.1",
        "AGENTPLANE_SHUTDOWN_GRACE_SECONDS": "1",
        "AGENTPLANE_LOG_LEVEL": "DEBUG",
    }
    for name in SERVICE_NAMES:
        env[f"AGENTPLANE_{name.upper()}_PORT"] = "0"
        env[f"AGENTPLANE_{name.upper()}_METRICS_PORT"] = "0"
    if database_url:
        env["DATABASE_URL"] = database_url
    if redis_url:
        env["REDIS_URL"] = redis_url
    env.update(extra_env or {})
    return Settings.from_env(env)


@dataclass
class RunningService:
    """A started in-process server and a channel to it."""

    handle: ServerHandle
    channel: grpc.aio.Channel

    @property
    def address(self) -> str:
        """`127.0.0.1:<port>` of the server."""
        return self.handle.address

    def with_address_in(self, settings: Settings, service_name: str) -> Settings:
        """`settings` in which `service_name` is reached at this server (wire services together)."""
        return settings.with_service(service_name, address=self.address)


@asynccontextmanager
async def running_server(
    handle: ServerHandle, *, token: str | None = None, grace: float | None = 0
) -> AsyncIterator[RunningService]:
    """Start a built server, yield it with a channel (authenticated with `token`), stop both after."""
    await handle.start()
    channel = create_channel(handle.address, token=token)
    try:
        yield RunningService(handle, channel)
    finally:
        await channel.close()
        await handle.stop(grace)


@asynccontextmanager
async def serve_in_process(
    build: Callable[[Settings], Awaitable[ServerHandle]],
    settings: Settings,
    *,
    token: str | None = None,
) -> AsyncIterator[RunningService]:
    """Build a service with its real `build(settings)` (port 0 from test settings), start it, yield it."""
    handle = await build(settings)
    async with running_server(handle, token=token) as running:
        yield running


def channel_to(service: RunningService | ServerHandle, token: str | None = None) -> grpc.aio.Channel:
    """Another channel to a running server, e.g. with a different token. Close it yourself."""
    handle = service.handle if isinstance(service, RunningService) else service
    return create_channel(handle.address, token=token)


def kill_agents(workspaces_dir: str) -> None:
    """SIGKILL every agent (and everything it ran) of a workspaces directory."""
    from services.toolexec.local_driver import kill_agents as kill

    kill(workspaces_dir)


@overload
async def wait_until(
    condition: Callable[[], Awaitable[T]],
    *,
    what: str,
    timeout: float = 10.0,  # noqa: ASYNC109 (the poll knows its deadline to report it)
    until: Callable[[T], bool] | None = None,
) -> T: ...


@overload
async def wait_until(
    condition: Callable[[], T],
    *,
    what: str,
    timeout: float = 10.0,  # noqa: ASYNC109 (the poll knows its deadline to report it)
    until: Callable[[T], bool] | None = None,
) -> T: ...


async def wait_until(
    condition: Callable[[], Any],
    *,
    what: str,
    timeout: float = 10.0,  # noqa: ASYNC109 (the poll knows its deadline to report it)
    until: Callable[[Any], bool] | None = None,
) -> Any:
    """Poll `condition()` (sync or async: state the test can observe, never a guess at timing)
    every 20 ms until its value is truthy, or until `until(value)` holds when `until` is given,
    and return that value.

    After `timeout` seconds the test fails with an AssertionError naming `what` was awaited and
    the last value seen, so a probe that returns the observed state (a chat, a status, a list)
    with `until` saying what it should be explains a timeout by itself. Exceptions raised by
    `condition` fail the test at once; a probe that expects some (a server still starting)
    catches them itself.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = condition()
        if inspect.isawaitable(value):
            value = await value
        if until(value) if until is not None else value:
            return value
        if loop.time() >= deadline:
            seen = repr(value)
            if len(seen) > 500:
                seen = seen[:500] + "..."
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last value seen: {seen}")
        await asyncio.sleep(POLL_INTERVAL_SECONDS)
