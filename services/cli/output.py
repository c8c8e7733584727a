"""Printing helpers shared by commands: every command that prints data takes `--output json`."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_output_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--output {text,json}`` (default text)."""
    parser.add_argument("--output", "-o", choices=["text", "json"], default="text", help="output format")


def emit(args: argparse.Namespace, data: Any, text: str | None = None) -> None:
    """Print `data` as JSON with ``--output json``, else `text` (or a key: value listing)."""
    if getattr(args, "output", "text") == "json":
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    elif text is not None:
        print(text)
    elif isinstance(data, dict):
        for key, value in data.items():
            print(f"{key}: {value}")
    elif isinstance(data, list):
        for item in data:
            print(item)
    else:
        print(data)
