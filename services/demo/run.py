"""`agentplane demo`: bring the stack up, let an agent fix a failing test in a sandboxed workspace,
check the result, summarise, and stop everything.

Offline (no OPENAI_API_KEY / ANTHROPIC_API_KEY, or ``--offline``) the LLM simulator plays the model
from `script.json`; every tool still really runs through the workspace agent in its sandbox. With a
key, a real model does the same task. The stack is an ordinary `agentplane up` in a child process,
on free ports and its own data directory (``<data dir>/demo``), so it never meets another `up`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from agentplane.chat.v1 import chat_pb2, chat_service_pb2, chat_service_pb2_grpc
from agentplane.config.v1 import config_pb2, config_service_pb2, config_service_pb2_grpc
from agentplane.toolexec.v1 import toolexec_pb2, toolexec_service_pb2, toolexec_service_pb2_grpc

from services.cli.up import PROVIDER_KEY_VARIABLES
from services.common.client import create_channel
from services.common.embedded import free_port
from services.common.settings import SERVICE_NAMES, Settings
from services.demo.render import LiveView, clip_lines

HERE = Path(__file__).resolve().parent
PROJECT_DIR = HERE / "project"
SCRIPT_FILE = HERE / "script.json"
TEMPLATE_NAME = "demo-python-calc"
PROMPT = (
    "This workspace is a small Python project whose tests fail. Please make the failing tests pass: "
    "run them with `python3 -m unittest`, find the bug in the code, fix the code (not the tests), and "
    "run the tests again to confirm."
)
VERIFY_COMMAND = "python3 -m unittest 2>&1"
TURN_TIMEOUT_SECONDS = 600.0


class DemoError(Exception):
    """The demo could not finish; the message says where and why."""


@dataclass
class Summary:
    """What `agentplane demo` prints at the end (and as JSON with ``-o json``)."""

    model: str
    offline: bool
    chat_id: str
    workspace_id: str
    status: str
    tests_pass: bool
    steps: int
    tool_calls: int
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cost_usd: float
    wall_seconds: float


async def run_demo(*, offline: bool, keep: bool, json_output: bool, data_dir: str | None) -> int:
    """The whole demo; 0 when the agent made the tests pass."""
    began = time.monotonic()
    # A stack of its own: none of the caller's AGENTPLANE_ settings (addresses, keys, data directory)
    # leaks in, except how to log and how to sandbox workspaces.
    keep_vars = ("AGENTPLANE_LOG_LEVEL", "AGENTPLANE_WORKSPACE_SANDBOX")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTPLANE_") or k in keep_vars}
    offline = offline or not any(env.get(k) for k in PROVIDER_KEY_VARIABLES)
    if offline:
        for key in PROVIDER_KEY_VARIABLES:
            env.pop(key, None)
    env["AGENTPLANE_DATA_DIR"] = data_dir or str(Path(Settings.from_env(os.environ).data_dir) / "demo")
    for name in SERVICE_NAMES:
        port = free_port()
        env[f"AGENTPLANE_{name.upper()}_PORT"] = str(port)
        env[f"AGENTPLANE_{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
        env[f"AGENTPLANE_{name.upper()}_METRICS_PORT"] = "-1"
    view = LiveView(sys.stderr if json_output else sys.stdout)
    say = _sayer(json_output)
    say(
        f"starting the stack in {env['AGENTPLANE_DATA_DIR']} ("
        + ("offline: the simulator plays the model" if offline else "with a real model")
        + ")"
    )
    log_path = Path(env["AGENTPLANE_DATA_DIR"]) / "demo.log"
    try:
        up, relay, info = await _start_up(env, offline, log_path)
    except DemoError as exc:
        print(f"agentplane demo: {exc}; its output is in {log_path}", file=sys.stderr)
        return 1
    try:
        summary = await _session(info, offline=offline, keep=keep, view=view, say=say)
    except DemoError as exc:
        view.close()
        print(f"agentplane demo: {exc} (the stack's logs: {log_path})", file=sys.stderr)
        return 1
    finally:
        say("stopping the stack")
        await _stop(up, relay)
    summary.wall_seconds = round(time.monotonic() - began, 1)
    if json_output:
        print(json.dumps(asdict(summary), indent=2))
    else:
        print(_summary_text(summary))
    return 0 if summary.tests_pass and summary.status == "waiting" else 1


def _sayer(json_output: bool) -> Any:
    def say(text: str) -> None:
        print(f"==> {text}", file=sys.stderr if json_output else sys.stdout, flush=True)

    return say


async def _start_up(
    env: dict[str, str], offline: bool, log_path: Path
) -> tuple[asyncio.subprocess.Process, asyncio.Task[None], dict[str, Any]]:
    """Start `agentplane up` and wait for its JSON description of the running stack.

    Everything the stack writes goes to `log_path`; up's own progress lines and warnings are shown
    as they come (the services' JSON logs are not: they would drown the conversation)."""
    argv = [sys.executable, "-m", "services.cli.main", "up", "--output", "json"]
    if offline:
        argv += ["--simulator", "always", "--simulator-port", str(free_port())]
        argv += ["--simulator-script", str(SCRIPT_FILE)]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    proc = await asyncio.create_subprocess_exec(
        *argv, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None and proc.stderr is not None
    relay = asyncio.create_task(_relay_stderr(proc.stderr, log))
    try:
        return proc, relay, await _ready_info(proc.stdout, log)
    except BaseException:
        await _stop(proc, relay)
        raise


async def _relay_stderr(stream: asyncio.StreamReader, log: Any) -> None:
    with log:
        async for line in stream:
            log.write(line)
            log.flush()
            if line.startswith((b"agentplane up", b"WARNING")):
                sys.stderr.write(line.decode(errors="replace"))
                sys.stderr.flush()


async def _ready_info(stdout: asyncio.StreamReader, log: Any) -> dict[str, Any]:
    """The JSON object up prints once ready: from a line ``{`` to a line ``}`` (other lines on the
    same stdout, such as the simulator's "listening" line, are logged and skipped)."""
    captured: list[bytes] | None = None
    async for line in stdout:
        log.write(line)
        if captured is None:
            if line.rstrip() == b"{":
                captured = [line]
            continue
        captured.append(line)
        if line.rstrip() == b"}":
            return dict(json.loads(b"".join(captured)))
    raise DemoError("`agentplane up` exited before the stack was ready")


async def _stop(proc: asyncio.subprocess.Process, relay: asyncio.Task[None]) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 90)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    with contextlib.suppress(Exception):
        await relay


async def _session(info: dict[str, Any], *, offline: bool, keep: bool, view: LiveView, say: Any) -> Summary:
    token = info["admin_token"]
    services = info["services"]
    async with (
        create_channel(services["config"], token=token) as config_ch,
        create_channel(services["toolexec"], token=token) as toolexec_ch,
        create_channel(services["chat"], token=token) as chat_ch,
    ):
        config = config_service_pb2_grpc.ConfigServiceStub(config_ch)
        toolexec = toolexec_service_pb2_grpc.ToolExecServiceStub(toolexec_ch)
        chat = chat_service_pb2_grpc.ChatServiceStub(chat_ch)
        template_id = await _template(config)
        model = await _default_model_name(config)
        say(f"creating a workspace from the sample template {TEMPLATE_NAME!r} (Python, failing tests)")
        workspace = await _workspace(toolexec, template_id)
        try:
            say(f"asking the agent ({model}) to make the tests pass")
            created = await _rpc(
                "creating the chat",
                chat.CreateChat(
                    chat_service_pb2.CreateChatRequest(
                        request_id=str(uuid.uuid4()),
                        content=[chat_pb2.ContentPart(text=chat_pb2.TextPart(text=PROMPT))],
                        workspace_id=workspace.id,
                        title="make demo: fix the failing tests",
                    )
                ),
            )
            chat_id = created.chat.id
            await _follow(chat, chat_id, view)
            final = (
                await _rpc("reading the chat", chat.GetChat(chat_service_pb2.GetChatRequest(chat_id=chat_id)))
            ).chat
            messages = await _messages(chat, chat_id)
            say("checking in the workspace that the tests pass: " + VERIFY_COMMAND)
            passed, output = await _verify(toolexec, workspace.id)
            for line in clip_lines(output, 8):
                print(f"    │ {line}", file=view.stream)
            status = str(chat_pb2.ChatStatus.Name(final.status)).removeprefix("CHAT_STATUS_").lower()
            if final.status == chat_pb2.CHAT_STATUS_ERROR:
                say(f"the chat ended in error: {final.last_error.reason}: {final.last_error.message}")
            return Summary(
                model=model,
                offline=offline,
                chat_id=chat_id,
                workspace_id=workspace.id,
                status=status,
                tests_pass=passed,
                steps=sum(1 for m in messages if m.role == chat_pb2.MESSAGE_ROLE_ASSISTANT),
                tool_calls=sum(1 for m in messages for p in m.parts if p.WhichOneof("part") == "tool_call"),
                input_tokens=final.usage.input_tokens,
                output_tokens=final.usage.output_tokens,
                cache_read_tokens=final.usage.cache_read_tokens,
                cost_usd=final.usage.cost_micros / 1_000_000,
                wall_seconds=0.0,
            )
        finally:
            if not keep:
                with contextlib.suppress(grpc.aio.AioRpcError):
                    await toolexec.DeleteWorkspace(
                        toolexec_service_pb2.DeleteWorkspaceRequest(workspace_id=workspace.id), timeout=60
                    )


async def _rpc(doing: str, call: Any) -> Any:
    try:
        return await call
    except grpc.aio.AioRpcError as exc:
        raise DemoError(f"{doing} failed: {exc.code().name}: {exc.details()}") from None


async def _template(config: config_service_pb2_grpc.ConfigServiceStub) -> str:
    """The sample template's id, created on the demo's first run."""
    listed = await _rpc(
        "listing templates",
        config.ListWorkspaceTemplates(
            config_service_pb2.ListWorkspaceTemplatesRequest(page_size=1000, include_disabled=True)
        ),
    )
    for template in listed.workspace_templates:
        if template.name == TEMPLATE_NAME:
            return str(template.id)
    template = config_pb2.WorkspaceTemplate(
        name=TEMPLATE_NAME,
        enabled=True,
        description="make demo's sample: a small Python calculator whose tests fail (python3 -m unittest)",
    )
    template.source.directory.path = str(PROJECT_DIR)
    created = await _rpc(
        "creating the sample template",
        config.CreateWorkspaceTemplate(
            config_service_pb2.CreateWorkspaceTemplateRequest(workspace_template=template)
        ),
    )
    return str(created.workspace_template.id)


async def _default_model_name(config: config_service_pb2_grpc.ConfigServiceStub) -> str:
    resolved = await _rpc(
        "resolving the default model", config.ResolveModel(config_service_pb2.ResolveModelRequest())
    )
    model = resolved.model_config
    return str(model.display_name or model.model_name or model.id)


async def _workspace(
    toolexec: toolexec_service_pb2_grpc.ToolExecServiceStub, template_id: str
) -> toolexec_pb2.Workspace:
    created = await _rpc(
        "creating the workspace",
        toolexec.CreateWorkspace(
            toolexec_service_pb2.CreateWorkspaceRequest(
                request_id=str(uuid.uuid4()),
                name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}",
                template_id=template_id,
            ),
            timeout=300,
        ),
    )
    workspace = created.workspace
    if workspace.state != toolexec_pb2.WORKSPACE_STATE_READY:
        raise DemoError(f"the workspace is not ready: {workspace.failure_message or workspace.state}")
    return workspace


async def _follow(chat: chat_service_pb2_grpc.ChatServiceStub, chat_id: str, view: LiveView) -> None:
    """Stream the chat from its start until the turn ends (the first idle status after running)."""
    last_seq = 0
    running_seen = False
    deadline = time.monotonic() + TURN_TIMEOUT_SECONDS
    try:
        while True:
            stream = chat.StreamChat(
                chat_service_pb2.StreamChatRequest(chat_id=chat_id, after_seq=last_seq),
                timeout=max(1.0, deadline - time.monotonic()),
            )
            try:
                async for reply in stream:
                    event = reply.event
                    if event.seq <= last_seq:
                        continue
                    last_seq = event.seq
                    view.event(event)
                    if event.WhichOneof("event") == "status_changed":
                        status = event.status_changed.status
                        if status == chat_pb2.CHAT_STATUS_RUNNING:
                            running_seen = True
                        elif running_seen and status in (
                            chat_pb2.CHAT_STATUS_WAITING,
                            chat_pb2.CHAT_STATUS_ERROR,
                        ):
                            return
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise DemoError(f"the agent did not finish within {TURN_TIMEOUT_SECONDS:.0f} s") from None
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise DemoError(
                        f"following the chat failed: {exc.code().name}: {exc.details()}"
                    ) from None
    finally:
        view.close()


async def _messages(chat: chat_service_pb2_grpc.ChatServiceStub, chat_id: str) -> list[chat_pb2.Message]:
    out: list[chat_pb2.Message] = []
    token = ""
    while True:
        page = await _rpc(
            "listing the chat's messages",
            chat.ListMessages(
                chat_service_pb2.ListMessagesRequest(chat_id=chat_id, page_size=200, page_token=token)
            ),
        )
        out += page.messages
        token = page.next_page_token
        if not token:
            return out


async def _verify(
    toolexec: toolexec_service_pb2_grpc.ToolExecServiceStub, workspace_id: str
) -> tuple[bool, str]:
    """Run the tests in the workspace ourselves: the demo trusts the workspace, not the model's word."""
    result = await _rpc(
        "running the tests in the workspace",
        toolexec.CallTool(
            toolexec_service_pb2.CallToolRequest(
                workspace_id=workspace_id,
                tool_call_id=f"demo-verify-{uuid.uuid4()}",
                name="execute",
                arguments_json=json.dumps({"command": VERIFY_COMMAND}),
            ),
            timeout=120,
        ),
    )
    structured = json.loads(result.structured_json or "{}")
    return (not result.is_error and structured.get("exit_code") == 0), result.content


def _summary_text(s: Summary) -> str:
    verdict = "the tests pass" if s.tests_pass else "the tests STILL FAIL"
    return "\n".join(
        [
            "",
            f"Summary: {verdict}; chat {s.status}",
            f"  model        {s.model}" + (" (simulator, offline)" if s.offline else ""),
            f"  steps        {s.steps} model calls, {s.tool_calls} tool calls",
            f"  tokens       {s.input_tokens} in ({s.cache_read_tokens} from cache), {s.output_tokens} out",
            f"  cost         ${s.cost_usd:.4f}",
            f"  wall time    {s.wall_seconds:.1f} s",
            f"  chat         {s.chat_id}",
        ]
    )
