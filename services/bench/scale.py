"""`agentplane bench scale`: many users chatting at once through the whole product.

In the spirit of a chat scale test: the four services and the LLM simulator run as separate
processes (time to first token 500 ms, then the reply streamed in chunks of 5 tokens every
100 ms). N users each create a chat, open its event stream and run T turns, one after the
other. For each turn we measure, at the client, the time from sending the message to the
first text delta (minus the simulator's time to first token) and to the end of the turn.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from agentplane.chat.v1 import chat_pb2, chat_service_pb2, chat_service_pb2_grpc

from services.bench.stack import LocalStack, StackOptions, cpu_share, percentile, rss_mib
from services.common import aio
from services.common.client import create_channel

NAME = "scale"
HELP = "N users x T turns through all services against the simulator"
IDLE = (chat_pb2.CHAT_STATUS_WAITING, chat_pb2.CHAT_STATUS_ERROR)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Benchmark flags."""
    parser.add_argument("--chats", type=int, default=500, help="concurrent users, one chat each")
    parser.add_argument("--turns", type=int, default=10, help="turns per chat")
    parser.add_argument("--ttft-ms", type=float, default=500.0, help="simulator time to first token")
    parser.add_argument("--token-delay-ms", type=float, default=100.0, help="simulator delay between chunks")
    parser.add_argument("--chunk-tokens", type=int, default=5, help="tokens per simulator chunk")
    parser.add_argument("--words", type=int, default=50, help="tokens per reply")
    parser.add_argument(
        "--turn-timeout", type=float, default=120.0, help="seconds before a turn counts as failed"
    )
    parser.add_argument("--channels", type=int, default=8, help="client connections to the chat service")
    parser.add_argument(
        "--ramp-seconds",
        type=float,
        default=0.0,
        help="spread the users' starts evenly over this many seconds (default 0: all at once)",
    )
    parser.add_argument(
        "--target-first-delta-p99-ms",
        type=float,
        default=500.0,
        help="the latency target a run must meet (with zero failures) to count in --find-max",
    )
    parser.add_argument(
        "--find-max",
        action="store_true",
        help="search for the largest N (up to --chats) that meets the target; one fresh stack per try",
    )
    parser.add_argument("--min-chats", type=int, default=25, help="where --find-max starts")


@dataclass
class Results:
    """What the users observed."""

    first_delta_ms: list[float] = field(default_factory=list)
    # The same, split: each user's first turn (all users start together unless ramped) and the rest.
    first_turn_ms: list[float] = field(default_factory=list)
    later_turns_ms: list[float] = field(default_factory=list)
    turn_ms: list[float] = field(default_factory=list)
    completed: int = 0
    failures: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def fail(self, why: str) -> None:
        self.failures += 1
        self.errors[why] = self.errors.get(why, 0) + 1


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the benchmark (or the search for the largest N) and return its JSON-ready results."""
    if not args.find_max:
        return aio.run(_run(args, args.chats))
    runs: list[dict[str, Any]] = []

    def attempt(chats: int) -> bool:
        result = aio.run(_run(args, chats))
        runs.append({k: result[k] for k in SUMMARY_KEYS})
        return bool(result["meets_target"])

    largest = largest_passing(attempt, start=args.min_chats, cap=args.chats)
    return {
        "largest_chats_meeting_target": largest,
        "turns": args.turns,
        "target": {"failures": 0, "first_delta_p99_ms": args.target_first_delta_p99_ms},
        "ramp_seconds": args.ramp_seconds,
        "runs": runs,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


SUMMARY_KEYS = (
    "chats",
    "completed_turns",
    "failures",
    "first_delta_p50_ms",
    "first_delta_p99_ms",
    "first_turn_first_delta_p99_ms",
    "later_turns_first_delta_p99_ms",
    "turn_p99_ms",
    "turns_per_second",
    "meets_target",
)


def largest_passing(attempt: Callable[[int], bool], *, start: int, cap: int, resolution: float = 0.1) -> int:
    """The largest N in [1, cap] for which `attempt(N)` passes, assuming passing is monotone.

    Doubles from `start` until a try fails (or `cap` passes), then bisects between the last pass
    and the first failure until they are within `resolution` of each other (relative, at least
    one). Returns 0 when even N = 1 fails.
    """
    cap = max(1, cap)
    n = max(1, min(start, cap))
    good, bad = 0, cap + 1
    while True:
        if attempt(n):
            good = n
            if n >= cap:
                return n
            n = min(cap, n * 2)
        else:
            bad = n
            break
    while bad - good > max(1, int(good * resolution)):
        n = (good + bad) // 2
        if n in (good, bad):
            break
        if attempt(n):
            good = n
        else:
            bad = n
    return good


async def _run(args: argparse.Namespace, chats: int) -> dict[str, Any]:
    options = StackOptions(
        simulator_args=(
            "--ttft-ms",
            str(args.ttft_ms),
            "--token-delay-ms",
            str(args.token_delay_ms),
            "--chunk-tokens",
            str(args.chunk_tokens),
        ),
        env={"AGENTPLANE_CHAT_MAX_CONCURRENT": str(max(64, chats))},
    )
    results = Results()
    async with LocalStack(options) as stack:
        channels = [create_channel(stack.addresses["chat"]) for _ in range(max(1, args.channels))]
        cpu_before = stack.cpu_seconds()
        started = time.perf_counter()
        try:
            ramp = args.ramp_seconds / chats
            users = [
                _user(i, stack, channels[i % len(channels)], args, results, delay=ramp * i)
                for i in range(chats)
            ]
            await asyncio.gather(*users)
        finally:
            for channel in channels:
                await channel.close()
        elapsed = time.perf_counter() - started
        cores = cpu_share(cpu_before, stack.cpu_seconds(), elapsed)
        rss = rss_mib(stack)
    first_delta_p99 = percentile(results.first_delta_ms, 99)
    turns = max(1, results.completed)
    return {
        "chats": chats,
        "turns": args.turns,
        "ramp_seconds": args.ramp_seconds,
        "completed_turns": results.completed,
        "failures": results.failures,
        "failure_reasons": results.errors,
        "first_delta_p50_ms": round(percentile(results.first_delta_ms, 50), 1),
        "first_delta_p99_ms": round(first_delta_p99, 1),
        "first_turn_first_delta_p99_ms": round(percentile(results.first_turn_ms, 99), 1),
        "later_turns_first_delta_p99_ms": round(percentile(results.later_turns_ms, 99), 1),
        "turn_p50_ms": round(percentile(results.turn_ms, 50), 1),
        "turn_p99_ms": round(percentile(results.turn_ms, 99), 1),
        "meets_target": results.failures == 0
        and results.completed == chats * args.turns
        and first_delta_p99 <= args.target_first_delta_p99_ms,
        "duration_s": round(elapsed, 1),
        "turns_per_second": round(results.completed / elapsed, 1) if elapsed > 0 else 0.0,
        "simulator_ttft_ms": args.ttft_ms,
        # Average cores each process used during the run; machine_busy includes everything else
        # running on the machine at the time (the 1-minute load average too).
        "cores_used": cores,
        # CPU time each process spent per completed turn (cores x wall time / turns).
        "cpu_ms_per_turn": {name: round(c * elapsed * 1000 / turns, 2) for name, c in cores.items()},
        "load_average_1m": round(os.getloadavg()[0], 2),
        **rss,
    }


async def _user(
    index: int,
    stack: LocalStack,
    channel: grpc.aio.Channel,
    args: argparse.Namespace,
    results: Results,
    *,
    delay: float,
) -> None:
    """One user: create a chat, follow its stream, run the turns one after the other."""
    if delay > 0:
        await asyncio.sleep(delay)
    user = f"scale-user-{index}"
    metadata = (("authorization", f"Bearer {stack.token(user)}"),)
    stub = chat_service_pb2_grpc.ChatServiceStub(channel)
    prompt = f"Turn {{n}} of user {index}: tell me something. [[words={args.words}]]"
    events: asyncio.Queue[chat_pb2.ChatEvent | BaseException] = asyncio.Queue()
    reader: asyncio.Task[None] | None = None
    try:
        sent = time.perf_counter()
        created = await stub.CreateChat(
            chat_service_pb2.CreateChatRequest(
                request_id=str(uuid.uuid4()), content=_text(prompt.format(n=1)), title=f"scale {index}"
            ),
            metadata=metadata,
        )
        chat_id = created.chat.id
        reader = asyncio.create_task(_read(stub, chat_id, metadata, events))
        floor = created.message.seq
        for turn in range(args.turns):
            if turn > 0:
                sent = time.perf_counter()
                reply = await stub.SendMessage(
                    chat_service_pb2.SendMessageRequest(
                        chat_id=chat_id,
                        request_id=str(uuid.uuid4()),
                        content=_text(prompt.format(n=turn + 1)),
                    ),
                    metadata=metadata,
                )
                floor = reply.message.seq if reply.HasField("message") else reply.chat.last_seq
            outcome = await _await_turn(events, floor, sent, args, results, first=turn == 0)
            if outcome is not None:
                results.fail(outcome)
                return
    except grpc.aio.AioRpcError as exc:
        results.fail(exc.code().name)
    finally:
        if reader is not None:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await reader


async def _read(
    stub: chat_service_pb2_grpc.ChatServiceStub,
    chat_id: str,
    metadata: tuple[tuple[str, str], ...],
    events: asyncio.Queue[chat_pb2.ChatEvent | BaseException],
) -> None:
    try:
        stream = stub.StreamChat(chat_service_pb2.StreamChatRequest(chat_id=chat_id), metadata=metadata)
        async for reply in stream:
            events.put_nowait(reply.event)
    except grpc.aio.AioRpcError as exc:
        events.put_nowait(exc)


async def _await_turn(
    events: asyncio.Queue[chat_pb2.ChatEvent | BaseException],
    floor: int,
    sent: float,
    args: argparse.Namespace,
    results: Results,
    *,
    first: bool,
) -> str | None:
    """Consume events until the turn after seq `floor` ends; None on success, else why it failed."""
    deadline = sent + args.turn_timeout
    first_delta: float | None = None
    while True:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            return "turn_timeout"
        try:
            event = await asyncio.wait_for(events.get(), remaining)
        except TimeoutError:
            return "turn_timeout"
        if isinstance(event, BaseException):
            code = event.code().name if isinstance(event, grpc.aio.AioRpcError) else type(event).__name__
            return f"stream_{code}"
        if event.seq <= floor:
            continue
        kind = event.WhichOneof("event")
        if kind == "part_delta" and first_delta is None:
            first_delta = time.perf_counter()
            latency = (first_delta - sent) * 1000 - args.ttft_ms
            results.first_delta_ms.append(latency)
            (results.first_turn_ms if first else results.later_turns_ms).append(latency)
        elif kind == "status_changed" and event.status_changed.status in IDLE:
            if event.status_changed.status == chat_pb2.CHAT_STATUS_ERROR:
                return f"chat_error_{event.status_changed.error.reason or 'unknown'}"
            if first_delta is None:
                return "no_delta"
            results.turn_ms.append((time.perf_counter() - sent) * 1000)
            results.completed += 1
            return None


def _text(text: str) -> list[chat_pb2.ContentPart]:
    return [chat_pb2.ContentPart(text=chat_pb2.TextPart(text=text))]
