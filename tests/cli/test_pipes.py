"""`agentplane ... | head`: a reader that goes away early ends the command quietly (exit 141, the
shell's code for a process a closed pipe stopped), never with a BrokenPipeError traceback."""

from __future__ import annotations

import asyncio
import fcntl
import os
import subprocess
import uuid

from agentplane.chat.v1 import chat_service_pb2
from agentplane.config.v1 import config_pb2, config_service_pb2_grpc
from agentplane.config.v1 import config_service_pb2 as config_pb

from services.common.client import create_channel
from tests.chat.conftest import text
from tests.cli.conftest import CLI, REPO_ROOT, CliStack, cli_env

EXIT_BROKEN_PIPE = 141
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


def _assert_quiet(code: int, err: str) -> None:
    assert code == EXIT_BROKEN_PIPE, (code, err)
    assert err == "", err  # no traceback, no "Exception ignored ... BrokenPipeError"


def test_keys_show_into_a_pipe_closed_before_it_writes(keys_dir: str) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # `head -0`: the reader is gone before the command prints anything
    try:
        done = subprocess.run(
            [*CLI, "keys", "show", keys_dir],
            stdout=write_end, stderr=subprocess.PIPE, env=cli_env(keys_dir), cwd=REPO_ROOT, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write_end)
    _assert_quiet(done.returncode, done.stderr.decode())


def test_help_into_a_closed_pipe(keys_dir: str) -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        done = subprocess.run(
            [*CLI, "chat", "--help"],
            stdout=write_end, stderr=subprocess.PIPE, env=cli_env(keys_dir), cwd=REPO_ROOT, timeout=60,
        )  # fmt: skip
    finally:
        os.close(write_end)
    # argparse drops its own write errors and exits 0; either way, nothing on stderr.
    assert done.returncode in (0, EXIT_BROKEN_PIPE) and done.stderr == b"", done.stderr


def _read_line(fd: int) -> bytes:
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(fd, 1)
        if not chunk:
            break
        line += chunk
    return line


async def test_a_long_list_read_one_line_then_closed(cli_stack: CliStack) -> None:
    """`agentplane admin template list | head -1` with more output than the pipe holds: the command
    is blocked writing when the reader closes, so it surely meets the closed pipe."""
    read_end, write_end = os.pipe()
    capacity = fcntl.fcntl(read_end, F_GETPIPE_SZ)
    description = "d" * 7000
    channel = create_channel(
        cli_stack.stack.settings.address("config"), token=cli_stack.stack.make_token("admin", "admin")
    )
    try:
        stub = config_service_pb2_grpc.ConfigServiceStub(channel)
        for i in range(4 * capacity // len(description) + 1):
            template = config_pb2.WorkspaceTemplate(name=f"t{i}", description=description, enabled=True)
            template.source.directory.path = "/srv/templates/py"
            await stub.CreateWorkspaceTemplate(
                config_pb.CreateWorkspaceTemplateRequest(workspace_template=template)
            )
    finally:
        await channel.close()
    proc = await asyncio.create_subprocess_exec(
        *CLI, "admin", "template", "list", "--user", "ops",
        env=cli_stack.env, cwd=REPO_ROOT, stdout=write_end, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    os.close(write_end)
    try:
        first = await asyncio.to_thread(_read_line, read_end)
    finally:
        os.close(read_end)
    assert proc.stderr is not None
    err = await asyncio.wait_for(proc.stderr.read(), 60)
    code = await asyncio.wait_for(proc.wait(), 60)
    assert first.split() == [b"ID", b"NAME", b"ENABLED", b"NETWORK_ACCESS", b"DESCRIPTION"]
    _assert_quiet(code, err.decode())


async def test_chat_list_and_watch_into_a_closed_pipe(cli_stack: CliStack) -> None:
    stub = cli_stack.stack.stub("alice")
    created = await stub.CreateChat(
        chat_service_pb2.CreateChatRequest(request_id=str(uuid.uuid4()), content=text("hello"))
    )
    for argv in (["chat", "list"], ["chat", "watch", created.chat.id], ["chat", "list", "-o", "json"]):
        read_end, write_end = os.pipe()
        os.close(read_end)
        proc = await asyncio.create_subprocess_exec(
            *CLI, *argv, "--user", "alice",
            env=cli_stack.env, cwd=REPO_ROOT, stdout=write_end, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        os.close(write_end)
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode is not None
        _assert_quiet(proc.returncode, err.decode())
