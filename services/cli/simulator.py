"""`agentplane simulator`: run the LLM simulator (OpenAI- and Anthropic-compatible) until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import Any


def register(subparsers: Any) -> None:
    """Add the `simulator` command."""
    parser = subparsers.add_parser(
        "simulator", help="run the LLM simulator (OpenAI and Anthropic wire formats)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8800)
    parser.add_argument("--script", help="JSON script file of scripted conversations (docs/simulator.md)")
    parser.add_argument("--ttft-ms", type=float, default=0.0, help="delay before the first chunk")
    parser.add_argument("--token-delay-ms", type=float, default=0.0, help="delay between chunks")
    parser.add_argument("--chunk-tokens", type=int, default=1, help="tokens per streamed chunk")
    parser.add_argument("--api-key", help="answer 401 to requests that do not carry this key")
    parser.set_defaults(func=run)


async def run(args: argparse.Namespace) -> int:
    """Start the simulator and serve until SIGINT/SIGTERM."""
    from services.simulator.script import Script, ScriptError
    from services.simulator.server import start_simulator

    script = None
    if args.script:
        try:
            script = Script.load(args.script)
        except (OSError, ScriptError) as exc:
            print(f"agentplane simulator: {exc}", file=sys.stderr)
            return 2
    handle = await start_simulator(
        host=args.host,
        port=args.port,
        script=script,
        ttft_ms=args.ttft_ms,
        token_delay_ms=args.token_delay_ms,
        chunk_tokens=args.chunk_tokens,
        expected_api_key=args.api_key,
    )
    print(f"simulator listening on {handle.base_url} (OpenAI base URL {handle.openai_base_url})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await handle.stop()
    return 0
