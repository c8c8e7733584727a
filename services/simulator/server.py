"""The simulator's HTTP server (aiohttp) and the handle tests use to drive and observe it.

Endpoints: OpenAI `POST /v1/chat/completions`, `POST /v1/responses`, Anthropic `POST /v1/messages`,
`GET /v1/models` (OpenAI or Anthropic format, by the `anthropic-version` header), and control
endpoints under `/_sim/` for out-of-process use (faults, script, gates, stats).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from aiohttp import web

from services.simulator import wire_anthropic, wire_openai, wire_responses
from services.simulator.gates import CLOSED_POLL_SECONDS, Gates, GateView
from services.simulator.plan import ReplyPlan, build_plan
from services.simulator.script import Fault, Gate, Script, ScriptError, Turn
from services.simulator.wire_common import ModelInfo, Step, WireError

DEFAULT_MODELS = (
    ModelInfo("sim-gpt", "Simulated GPT"),
    ModelInfo("sim-gpt-mini", "Simulated GPT mini"),
    ModelInfo("sim-claude", "Simulated Claude"),
)
ERROR_FAULTS = ("rate_limit", "server_error", "overloaded", "invalid_key", "context_length")
REQUEST_LOG_LIMIT = 5000


@dataclass
class RecordedRequest:
    """A request the simulator received (body parsed as JSON when possible)."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    api_key: str | None
    received_at: float


@dataclass
class StreamRecord:
    """One streamed response: whether it completed or the client closed the connection first."""

    path: str
    started_at: float
    ended_at: float | None = None
    completed: bool = False
    client_closed: bool = False


@dataclass
class _Wire:
    module: ModuleType
    error_module: ModuleType
    call_id_prefix: str
    id_prefix: str


WIRES = {
    "chat": _Wire(wire_openai, wire_openai, "call_", "chatcmpl-"),
    "responses": _Wire(wire_responses, wire_openai, "call_", "resp_"),
    "messages": _Wire(wire_anthropic, wire_anthropic, "toolu_", "msg_"),
}


@dataclass
class _InjectedFault:
    fault: Fault
    remaining: int


@dataclass
class SimulatorState:
    """Mutable state shared by the handlers and the handle."""

    script: Script | None
    ttft_ms: float
    token_delay_ms: float
    chunk_tokens: int
    expected_api_key: str | None
    models: tuple[ModelInfo, ...] = DEFAULT_MODELS
    requests: deque[RecordedRequest] = field(default_factory=lambda: deque(maxlen=REQUEST_LOG_LIMIT))
    streams: deque[StreamRecord] = field(default_factory=lambda: deque(maxlen=REQUEST_LOG_LIMIT))
    injected: list[_InjectedFault] = field(default_factory=list)
    turn_fault_hits: dict[tuple[int, int], int] = field(default_factory=dict)
    open_streams: int = 0
    completed_streams: int = 0
    client_closed_streams: int = 0
    request_count: int = 0
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    ids: itertools.count[int] = field(default_factory=itertools.count)
    id_salt: str = field(default_factory=lambda: secrets.token_hex(3))
    gates: Gates = field(init=False)

    def __post_init__(self) -> None:
        self.gates = Gates(self.notify)

    async def notify(self) -> None:
        """Wake waiters of `SimulatorHandle.wait_until`."""
        async with self.changed:
            self.changed.notify_all()


class SimulatorHandle:
    """A running simulator: its URLs, its script and faults, and what it has seen."""

    def __init__(self, runner: web.AppRunner, state: SimulatorState, host: str, port: int) -> None:
        self._runner = runner
        self.state = state
        self.host = host
        self.port = port

    @property
    def base_url(self) -> str:
        """`http://host:port`."""
        return f"http://{self.host}:{self.port}"

    @property
    def openai_base_url(self) -> str:
        """Base URL for the OpenAI SDK (`<base>/v1`)."""
        return f"{self.base_url}/v1"

    @property
    def anthropic_base_url(self) -> str:
        """Base URL for the Anthropic SDK (it appends `/v1/messages` itself)."""
        return self.base_url

    @property
    def requests(self) -> list[RecordedRequest]:
        """Requests received so far (the most recent 5000), oldest first."""
        return list(self.state.requests)

    @property
    def streams(self) -> list[StreamRecord]:
        """Streamed responses so far (the most recent 5000), oldest first."""
        return list(self.state.streams)

    @property
    def open_streams(self) -> int:
        """Streams currently being written."""
        return self.state.open_streams

    @property
    def client_closed_streams(self) -> int:
        """Streams the client closed before they completed."""
        return self.state.client_closed_streams

    def set_script(self, script: Script | None) -> None:
        """Replace the script (None: default mode) and reset per-turn fault counters."""
        self.state.script = script
        self.state.turn_fault_hits.clear()

    def set_expected_api_key(self, key: str | None) -> None:
        """Answer 401 to requests whose key differs from `key` (None: accept any key)."""
        self.state.expected_api_key = key

    def inject_fault(self, fault: Fault | str, count: int = 1, **params: Any) -> None:
        """Make the next `count` requests fail with `fault` (a Fault, or a kind plus Fault fields)."""
        if isinstance(fault, str):
            fault = Fault.from_dict({"kind": fault, **params})
        self.state.injected.append(_InjectedFault(fault, count))

    def clear_faults(self) -> None:
        """Drop every injected fault that has not fired yet."""
        self.state.injected.clear()

    def clear_requests(self) -> None:
        """Forget the request and stream logs."""
        self.state.requests.clear()
        self.state.streams.clear()

    async def wait_until(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        """Wait (at most `within` seconds) until `predicate()` holds; raises TimeoutError otherwise."""
        async with asyncio.timeout(within), self.state.changed:
            await self.state.changed.wait_for(predicate)

    def gate(self, name: str) -> GateView:
        """The state of gate `name`: open or not, replies held there now, replies that reached it."""
        return self.state.gates.view(name)

    async def open_gate(self, name: str) -> GateView:
        """Release the replies held at `name` and let later ones through (until `close_gate`)."""
        return await self.state.gates.open(name)

    async def close_gate(self, name: str) -> GateView:
        """Make later replies that reach `name` hold again."""
        return await self.state.gates.close(name)

    async def wait_held(self, name: str, count: int = 1, within: float = 10.0) -> GateView:
        """Wait until `count` replies are held at gate `name` ("the model is generating now").

        Raises TimeoutError naming the gate and what reached it when that does not happen
        within `within` seconds (a script that never reaches the gate, a request never sent).
        """
        try:
            await self.wait_until(lambda: self.state.gates.view(name).held >= count, within)
        except TimeoutError:
            view = self.state.gates.view(name)
            raise TimeoutError(
                f"gate {name!r}: waited {within} s for {count} held replies; it holds {view.held} "
                f"({view.arrived} reached it, open={view.open})"
            ) from None
        return self.state.gates.view(name)

    async def stop(self) -> None:
        """Stop serving and close every connection."""
        await self._runner.cleanup()


async def start_simulator(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    script: Script | None = None,
    ttft_ms: float = 0,
    token_delay_ms: float = 0,
    chunk_tokens: int = 1,
    expected_api_key: str | None = None,
) -> SimulatorHandle:
    """Start the simulator in this event loop and return its handle (port 0: pick a free port)."""
    state = SimulatorState(
        script=script,
        ttft_ms=ttft_ms,
        token_delay_ms=token_delay_ms,
        chunk_tokens=max(1, chunk_tokens),
        expected_api_key=expected_api_key,
    )
    app = build_app(state)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound = port
    sockets: Any = getattr(site._server, "sockets", None)
    if sockets:
        bound = sockets[0].getsockname()[1]
    return SimulatorHandle(runner, state, host, bound)


def build_app(state: SimulatorState) -> web.Application:
    """The aiohttp application serving every endpoint."""
    handlers = _Handlers(state)
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", handlers.chat)
    app.router.add_post("/v1/responses", handlers.responses)
    app.router.add_post("/v1/messages", handlers.messages)
    app.router.add_get("/v1/models", handlers.models)
    app.router.add_post("/_sim/faults", handlers.post_faults)
    app.router.add_delete("/_sim/faults", handlers.delete_faults)
    app.router.add_post("/_sim/script", handlers.post_script)
    app.router.add_get("/_sim/stats", handlers.stats)
    app.router.add_get("/_sim/gates", handlers.list_gates)
    app.router.add_get("/_sim/gates/{name}", handlers.get_gate)
    app.router.add_post("/_sim/gates/{name}/open", handlers.open_gate)
    app.router.add_post("/_sim/gates/{name}/close", handlers.close_gate)
    app.router.add_get("/_sim/gates/{name}/wait", handlers.wait_gate)
    return app


class _Handlers:
    def __init__(self, state: SimulatorState) -> None:
        self.state = state

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "chat")

    async def responses(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "responses")

    async def messages(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "messages")

    async def models(self, request: web.Request) -> web.StreamResponse:
        self._record(request, None)
        if "anthropic-version" in request.headers:
            if self._bad_key(request):
                return _error_response(wire_anthropic.error("invalid_key", None))
            data = [
                {
                    "type": "model",
                    "id": m.id,
                    "display_name": m.display_name,
                    "created_at": "2025-01-01T00:00:00Z",
                }
                for m in self.state.models
            ]
            body = {
                "data": data,
                "has_more": False,
                "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None,
            }
            return web.json_response(body)
        if self._bad_key(request):
            return _error_response(wire_openai.error("invalid_key", None))
        return web.json_response(
            {
                "object": "list",
                "data": [
                    {"id": m.id, "object": "model", "created": 1735689600, "owned_by": "simulator"}
                    for m in self.state.models
                ],
            }
        )

    async def post_faults(self, request: web.Request) -> web.StreamResponse:
        try:
            data = await request.json()
            fault = Fault.from_dict(data)
            count = int(data.get("count", 1))
        except (json.JSONDecodeError, ScriptError, ValueError, TypeError, AttributeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.state.injected.append(_InjectedFault(fault, count))
        return web.json_response({"queued": sum(f.remaining for f in self.state.injected)})

    async def delete_faults(self, request: web.Request) -> web.StreamResponse:
        self.state.injected.clear()
        return web.json_response({"queued": 0})

    async def post_script(self, request: web.Request) -> web.StreamResponse:
        try:
            data = await request.json()
            script = None if data is None else Script.from_data(data)
        except (json.JSONDecodeError, ScriptError, ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        self.state.script = script
        self.state.turn_fault_hits.clear()
        return web.json_response({"conversations": len(script.conversations) if script else 0})

    async def stats(self, request: web.Request) -> web.StreamResponse:
        s = self.state
        return web.json_response(
            {
                "requests": s.request_count,
                "open_streams": s.open_streams,
                "completed_streams": s.completed_streams,
                "client_closed_streams": s.client_closed_streams,
                "gates": [g.as_json() for g in s.gates.views()],
            }
        )

    async def list_gates(self, request: web.Request) -> web.StreamResponse:
        return web.json_response([g.as_json() for g in self.state.gates.views()])

    async def get_gate(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.state.gates.view(request.match_info["name"]).as_json())

    async def open_gate(self, request: web.Request) -> web.StreamResponse:
        return web.json_response((await self.state.gates.open(request.match_info["name"])).as_json())

    async def close_gate(self, request: web.Request) -> web.StreamResponse:
        return web.json_response((await self.state.gates.close(request.match_info["name"])).as_json())

    async def wait_gate(self, request: web.Request) -> web.StreamResponse:
        """`?held=N&timeout=S`: answer once N replies are held at the gate, or 504 after S seconds."""
        name = request.match_info["name"]
        try:
            held = int(request.query.get("held", "1"))
            timeout = float(request.query.get("timeout", "10"))
        except ValueError as exc:
            return web.json_response({"error": f"held and timeout must be numbers: {exc}"}, status=400)
        changed = self.state.changed
        try:
            async with asyncio.timeout(timeout), changed:
                await changed.wait_for(lambda: self.state.gates.view(name).held >= held)
        except TimeoutError:
            view = self.state.gates.view(name)
            message = f"gate {name!r} held {view.held} replies after {timeout} s, not {held}"
            return web.json_response({"error": message, **view.as_json()}, status=504)
        return web.json_response(self.state.gates.view(name).as_json())

    # -- generation -------------------------------------------------------------------------

    async def _generate(self, request: web.Request, kind: str) -> web.StreamResponse:
        wire = WIRES[kind]
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        self._record(request, body)
        if not isinstance(body, dict):
            return _error_response(
                wire.error_module.error("bad_request", None, "the body must be a JSON object")
            )
        if self._bad_key(request):
            return _error_response(wire.error_module.error("invalid_key", None))
        try:
            view = wire.module.parse(body)
        except WireError as exc:
            return _error_response(wire.error_module.error("bad_request", None, str(exc)))
        turn, fault = self._select(view.first_user_text, view.assistant_turns)
        plan = build_plan(
            view,
            turn,
            response_id=f"{wire.id_prefix}{self.state.id_salt}{next(self.state.ids):08d}",
            chunk_tokens=self.state.chunk_tokens,
            ttft_ms=self.state.ttft_ms,
            token_delay_ms=self.state.token_delay_ms,
            call_id_prefix=wire.call_id_prefix,
        )
        if fault is not None:
            if fault.kind in ERROR_FAULTS:
                return _error_response(wire.error_module.error(fault.kind, fault.retry_after))
            if fault.kind == "slow_headers":
                await asyncio.sleep(fault.delay_ms / 1000)
                fault = None
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            steps = wire.module.render_stream(plan, include_usage)
            return await self._stream(request, plan, steps, fault, wire.module.malformed_chunk())
        if fault is not None and fault.kind == "drop":
            if request.transport is not None:
                request.transport.close()
            raise ConnectionResetError("simulated dropped connection")
        if fault is not None and fault.kind == "malformed":
            return web.Response(body=b'{"id": "broken", "choices": [', content_type="application/json")
        if plan.gate is not None and not await self.state.gates.hold(plan.gate.name, _connected(request)):
            return web.Response(status=499, text="client closed the request while it was held")
        await _pause(plan.ttft_ms)
        return web.json_response(wire.module.render_json(plan))

    def _select(self, first_user_text: str, assistant_turns: int) -> tuple[Turn | None, Fault | None]:
        state = self.state
        turn: Turn | None = None
        fault: Fault | None = None
        if state.script is not None:
            selected = state.script.select(first_user_text, assistant_turns)
            if selected is not None:
                conv, index, turn = selected
                if turn.fault is not None:
                    hits = state.turn_fault_hits.get((conv, index), 0)
                    if hits < turn.fault.times:
                        state.turn_fault_hits[(conv, index)] = hits + 1
                        fault = turn.fault
        if state.injected:
            # An injected fault wins over a scripted one: it was asked for explicitly.
            injected = state.injected[0]
            injected.remaining -= 1
            if injected.remaining <= 0:
                state.injected.pop(0)
            fault = injected.fault
        return turn, fault

    async def _stream(
        self, request: web.Request, plan: ReplyPlan, steps: list[Step], fault: Fault | None, malformed: bytes
    ) -> web.StreamResponse:
        state = self.state
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "x-request-id": plan.response_id,
            }
        )
        record = StreamRecord(path=request.path, started_at=time.monotonic())
        state.streams.append(record)
        state.open_streams += 1
        await state.notify()
        try:
            await response.prepare(request)
            started = False
            output_sent = 0
            hold_at = _hold_index(steps, plan.gate)
            for index, (payload, is_output) in enumerate(steps):
                if plan.gate is not None and index == hold_at:
                    if not await state.gates.hold(plan.gate.name, _connected(request)):
                        record.client_closed = True
                        break
                delay = 0.0
                if not started:
                    delay = plan.ttft_ms
                    started = True
                elif is_output and output_sent > 0:
                    delay = plan.token_delay_ms
                if delay > 0 and not await _pause_unless_closed(request, delay):
                    record.client_closed = True
                    break
                if is_output:
                    if fault is not None and output_sent >= fault.after_chunks:
                        await self._apply_stream_fault(request, response, fault, malformed)
                        break
                    output_sent += 1
                await response.write(payload)
            else:
                record.completed = True
                with contextlib.suppress(ConnectionError):
                    await response.write_eof()
        except ConnectionError:
            record.client_closed = True
        except asyncio.CancelledError:
            record.client_closed = True
            raise
        finally:
            record.ended_at = time.monotonic()
            state.open_streams -= 1
            if record.completed:
                state.completed_streams += 1
            if record.client_closed:
                state.client_closed_streams += 1
            # Shielded: a cancelled handler must still wake the waiters.
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(state.notify())
        return response

    async def _apply_stream_fault(
        self, request: web.Request, response: web.StreamResponse, fault: Fault, malformed: bytes
    ) -> None:
        if fault.kind == "malformed":
            await response.write(malformed)
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
            return
        # "drop": cut the TCP connection without finishing the HTTP response.
        if request.transport is not None:
            request.transport.abort()

    def _record(self, request: web.Request, body: Any) -> None:
        self.state.request_count += 1
        self.state.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                headers=dict(request.headers),
                body=body,
                api_key=_api_key(request),
                received_at=time.time(),
            )
        )

    def _bad_key(self, request: web.Request) -> bool:
        expected = self.state.expected_api_key
        return expected is not None and _api_key(request) != expected


def _connected(request: web.Request) -> Callable[[], bool]:
    def connected() -> bool:
        transport = request.transport
        return transport is not None and not transport.is_closing()

    return connected


def _hold_index(steps: list[Step], gate: Gate | None) -> int:
    """The step a gated reply holds before: the one after its `after_chunks`-th output chunk.

    A reply with fewer output chunks holds before its last step (the end of the stream), so a
    gate always holds, whatever the reply's length.
    """
    if gate is None or gate.after_chunks == 0:
        return 0
    sent = 0
    for index, (_, is_output) in enumerate(steps):
        if is_output:
            sent += 1
            if sent == gate.after_chunks:
                return index + 1
    return max(0, len(steps) - 1)


def _api_key(request: web.Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    auth = request.headers.get("Authorization", "")
    return auth[7:] if auth.startswith("Bearer ") else None


def _error_response(error: tuple[int, dict[str, Any], dict[str, str]]) -> web.Response:
    status, body, headers = error
    return web.json_response(body, status=status, headers=headers)


async def _pause(ms: float) -> None:
    if ms > 0:
        await asyncio.sleep(ms / 1000)


async def _pause_unless_closed(request: web.Request, ms: float) -> bool:
    """Sleep `ms`, looking at the socket meanwhile; False as soon as the client has gone."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ms / 1000
    while True:
        transport = request.transport
        if transport is None or transport.is_closing():
            return False
        remaining = deadline - loop.time()
        if remaining <= 0:
            return True
        await asyncio.sleep(min(remaining, CLOSED_POLL_SECONDS))
