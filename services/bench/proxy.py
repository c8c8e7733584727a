"""`agentplane bench proxy`: what Generate adds on top of calling the provider directly.

Three processes besides this one: the simulator, the inference server (with a static model
resolver, so the hot path is the same as with a warm config cache) and, per measurement, a
client process (the OpenAI SDK directly, or a gRPC client of Generate). All traffic stays on
127.0.0.1. Replies are 50 tokens with no added latency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from services.common import aio
from services.common.embedded import free_port
from services.common.keys import init_dir as init_keys
from services.common.settings import SERVICE_NAMES

NAME = "proxy"
HELP = "Generate vs direct OpenAI SDK against the simulator: TTFT, total, rps and RSS growth"
# A key directory of the benchmark's own (the server and the client processes find it by env).
KEYS_DIR = os.path.join(tempfile.gettempdir(), f"agentplane-bench-proxy-keys-{os.getpid()}")
PROMPT = "benchmark [[words=50]]"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags to bound the run."""
    parser.add_argument("--latency-streams", type=int, default=300, help="streams per side at concurrency 1")
    parser.add_argument("--rps-streams", type=int, default=1000, help="streams per side at concurrency 20")
    parser.add_argument("--rss-streams", type=int, default=10_000, help="streams before the final RSS sample")
    parser.add_argument("--rss-baseline", type=int, default=1_000, help="streams before the first RSS sample")
    parser.add_argument("--coalesce-ms", type=float, default=20.0)


def _wait_port(port: int, proc: subprocess.Popen[bytes], within: float = 30.0) -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port} after {within} s")


def _client(mode: str, address: str, streams: int, concurrency: int) -> dict[str, Any]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.bench.proxy",
            "client",
            mode,
            address,
            str(streams),
            str(concurrency),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "AGENTPLANE_KEYS_DIR": KEYS_DIR},
    )
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Start simulator and inference server, measure both paths, return the numbers."""
    import psutil

    init_keys(KEYS_DIR, SERVICE_NAMES)
    env = {**os.environ, "AGENTPLANE_KEYS_DIR": KEYS_DIR, "AGENTPLANE_LOG_LEVEL": "WARNING"}
    sim_port, inf_port = free_port(), free_port()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        sim = subprocess.Popen(
            [sys.executable, "-m", "services.cli.main", "simulator", "--port", str(sim_port)],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        procs.append(sim)
        _wait_port(sim_port, sim)
        inf = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "services.bench.proxy",
                "serve",
                str(inf_port),
                str(sim_port),
                str(args.coalesce_ms),
            ],
            env=env,
            stdout=subprocess.DEVNULL,
        )
        procs.append(inf)
        _wait_port(inf_port, inf)
        sim_url = f"http://127.0.0.1:{sim_port}/v1"
        inf_addr = f"127.0.0.1:{inf_port}"
        # Warm up both paths (connections, caches) before measuring.
        _client("direct", sim_url, 20, 1)
        _client("proxy", inf_addr, 20, 1)
        direct_c1 = _client("direct", sim_url, args.latency_streams, 1)
        proxy_c1 = _client("proxy", inf_addr, args.latency_streams, 1)
        direct_c20 = _client("direct", sim_url, args.rps_streams, 20)
        proxy_c20 = _client("proxy", inf_addr, args.rps_streams, 20)
        done = 20 + args.latency_streams + args.rps_streams
        process = psutil.Process(inf.pid)
        if done < args.rss_baseline:
            _client("proxy", inf_addr, args.rss_baseline - done, 20)
            done = args.rss_baseline
        rss_base = process.memory_info().rss
        if done < args.rss_streams:
            _client("proxy", inf_addr, args.rss_streams - done, 20)
            done = args.rss_streams
        rss_final = process.memory_info().rss
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {
        "direct_ttft_p50_ms": direct_c1["ttft_p50_ms"],
        "proxy_ttft_p50_ms": proxy_c1["ttft_p50_ms"],
        "direct_total_p50_ms": direct_c1["total_p50_ms"],
        "proxy_total_p50_ms": proxy_c1["total_p50_ms"],
        "added_ttft_p50_ms": round(proxy_c1["ttft_p50_ms"] - direct_c1["ttft_p50_ms"], 3),
        "added_total_p50_ms": round(proxy_c1["total_p50_ms"] - direct_c1["total_p50_ms"], 3),
        "direct_ttft_p99_ms": direct_c1["ttft_p99_ms"],
        "proxy_ttft_p99_ms": proxy_c1["ttft_p99_ms"],
        "direct_rps_c20": direct_c20["rps"],
        "proxy_rps_c20": proxy_c20["rps"],
        "rps_ratio": round(proxy_c20["rps"] / direct_c20["rps"], 3) if direct_c20["rps"] else None,
        "proxy_messages_per_stream": proxy_c1["messages_per_stream"],
        "rss_after_baseline_mb": round(rss_base / 2**20, 1),
        "rss_after_all_mb": round(rss_final / 2**20, 1),
        "rss_growth_pct": round((rss_final - rss_base) / rss_base * 100, 2),
        "rss_streams": done,
        "rss_baseline_streams": args.rss_baseline,
        "latency_streams": args.latency_streams,
        "rps_streams": args.rps_streams,
    }


# --- subprocess entry points --------------------------------------------------------------


async def _serve(port: int, sim_port: int, coalesce_ms: float) -> None:
    from agentplane.config.v1 import config_pb2

    from services.common.server import run_until_signal
    from services.common.settings import Settings
    from services.inference import server as inference_server
    from services.inference.resolver import StaticModelResolver
    from services.inference.settings import InferenceSettings

    settings = Settings.from_env().with_service("inference", port=port, host="127.0.0.1", metrics_port=0)
    provider = config_pb2.Provider(
        id="bench",
        type=config_pb2.PROVIDER_TYPE_OPENAI_COMPATIBLE,
        display_name="simulator",
        base_url=f"http://127.0.0.1:{sim_port}/v1",
        enabled=True,
    )
    model = config_pb2.ModelConfig(id="bench", provider_id="bench", model_name="sim-gpt", enabled=True)
    resolver = StaticModelResolver(model, provider, "sk-bench")
    handle = await inference_server.build(settings, InferenceSettings(coalesce_ms=coalesce_ms), resolver)
    await handle.start()
    await run_until_signal(handle, 1)


async def _measure(mode: str, address: str, streams: int, concurrency: int) -> dict[str, Any]:
    ttfts: list[float] = []
    totals: list[float] = []
    messages: list[int] = []
    if mode == "direct":
        import openai

        # The same SDK transport inference uses (aiohttp), so the comparison is like for like.
        client = openai.AsyncOpenAI(
            base_url=address, api_key="sk-bench", max_retries=0, http_client=openai.DefaultAioHttpClient()
        )

        async def one() -> None:
            start = time.perf_counter()
            first = 0.0
            stream = await client.chat.completions.create(
                model="sim-gpt",
                messages=[{"role": "user", "content": PROMPT}],
                stream=True,
                stream_options={"include_usage": True},
            )
            count = 0
            async for chunk in stream:
                count += 1
                if not first and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter()
            totals.append(time.perf_counter() - start)
            ttfts.append(first - start)
            messages.append(count)

        close: Any = client.close
    else:
        from agentplane.inference.v1 import inference_pb2, inference_service_pb2, inference_service_pb2_grpc

        from services.common.auth import mint_service_token
        from services.common.client import create_channel
        from services.common.settings import Settings

        channel = create_channel(address, token=mint_service_token(Settings.from_env().keys, "chat"))
        stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
        request = inference_service_pb2.GenerateRequest(
            model_config_id="bench",
            messages=[
                inference_pb2.Message(
                    role=inference_pb2.ROLE_USER,
                    parts=[inference_pb2.ContentPart(text=inference_pb2.TextPart(text=PROMPT))],
                )
            ],
        )

        async def one() -> None:
            start = time.perf_counter()
            first = 0.0
            count = 0
            async for event in stub.Generate(request, timeout=60):
                count += 1
                if not first and event.HasField("text_delta"):
                    first = time.perf_counter()
            totals.append(time.perf_counter() - start)
            ttfts.append(first - start)
            messages.append(count)

        close = channel.close

    queue = iter(range(streams))

    async def worker() -> None:
        for _ in queue:
            await one()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    await close()
    ttfts.sort()
    return {
        "ttft_p50_ms": round(statistics.median(ttfts) * 1000, 3),
        "ttft_p99_ms": round(ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))] * 1000, 3),
        "total_p50_ms": round(statistics.median(totals) * 1000, 3),
        "rps": round(streams / elapsed, 1),
        "messages_per_stream": round(statistics.mean(messages), 1),
    }


def _main(argv: list[str]) -> None:
    if argv[0] == "serve":
        aio.run(_serve(int(argv[1]), int(argv[2]), float(argv[3])))
    elif argv[0] == "client":
        result = aio.run(_measure(argv[1], argv[2], int(argv[3]), int(argv[4])))
        print(json.dumps(result))


if __name__ == "__main__":
    _main(sys.argv[1:])
