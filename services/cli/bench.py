"""`agentplane bench NAME`: run one of the benchmarks in services/bench and print its result."""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

from services.bench import BENCHMARKS


def register(subparsers: Any) -> None:
    """Add the `bench` command group with one subcommand per benchmark module."""
    bench = subparsers.add_parser("bench", help="run a benchmark and print its results")
    names = bench.add_subparsers(dest="bench_name", required=True)
    for module_name in BENCHMARKS:
        module = importlib.import_module(module_name)
        parser = names.add_parser(module.NAME, help=module.HELP)
        parser.add_argument("--output", choices=["text", "json"], default="text")
        module.add_arguments(parser)
        parser.set_defaults(func=_runner(module))


def _runner(module: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        result: dict[str, Any] = module.run(args)
        if args.output == "json":
            print(json.dumps(result, indent=2, sort_keys=True))
        else:
            for key, value in result.items():
                print(f"{key}: {value}")
        return 0

    return run
