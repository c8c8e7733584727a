"""Benchmarks behind `agentplane bench NAME`; each prints JSON with `--output json`.

Each benchmark is a module here exposing `NAME: str`, `HELP: str`,
`add_arguments(parser: argparse.ArgumentParser) -> None` and `run(args: argparse.Namespace) -> dict`.
Add a module to BENCHMARKS to make it a subcommand.
"""

BENCHMARKS: list[str] = [
    "services.bench.config",
    "services.bench.proxy",
    "services.bench.toolexec",
    "services.bench.loop",
    "services.bench.scale",
    "services.bench.recovery",
]
