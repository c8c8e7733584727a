"""Printing helpers shared by commands: every command that prints data takes `--output json`.

- Data goes to stdout: JSON with ``--output json``, else text; lists print a header row
  (`table`).
- Errors and notices go to stderr: ``error: CODE (REASON): message`` in text; with
  ``--output json`` one JSON object per line, ``{"error": {"code", "reason", "message"[,
  "metadata"]}}`` or ``{"notice": {"message"}}``, so stdout only ever holds the result.
- A command that fails for a reason of its own (bad input, no key to mint a token, an unknown
  model name) raises `CliError`; `services.cli.main` prints it as above and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any


class CliError(SystemExit):
    """A failure the command itself detected: printed by `main` as an error, exit code 1.

    A `SystemExit` so that code run outside `main` still ends with the message and exit 1.
    `code_name` is the gRPC status code name it corresponds to, `reason` a machine-readable cause.
    """

    def __init__(self, message: str, *, code: str = "INVALID_ARGUMENT", reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code_name = code
        self.reason = reason


def add_output_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--output {text,json}`` (default text)."""
    parser.add_argument("--output", "-o", choices=["text", "json"], default="text", help="output format")


def json_mode(args: argparse.Namespace | None) -> bool:
    """True when the command runs with ``--output json``."""
    return args is not None and getattr(args, "output", "text") == "json"


def emit(args: argparse.Namespace, data: Any, text: str | None = None) -> None:
    """Print `data` as JSON with ``--output json``, else `text` (or a key: value listing)."""
    if json_mode(args):
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


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], empty: str) -> str:
    """Rows under a header row, columns aligned (two spaces apart, the last one unpadded);
    `empty` when there are no rows. Put free text (titles, descriptions) in the last column."""
    if not rows:
        return empty
    cells = [[_cell(v) for v in row] for row in rows]
    all_rows = [list(headers), *cells]
    widths = [max(len(r[i]) for r in all_rows) for i in range(len(headers) - 1)]
    lines = []
    for row in all_rows:
        padded = [value.ljust(width) for value, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*padded, row[-1]]).rstrip())
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    text = str(value).replace("\t", " ")
    first, _, rest = text.partition("\n")
    return first + " …" if rest else first


def error(
    args: argparse.Namespace | None,
    message: str,
    *,
    code: str = "UNKNOWN",
    reason: str = "",
    metadata: Mapping[str, str] | None = None,
    show_code: bool = True,
) -> None:
    """Print an error on stderr: a JSON object with ``--output json``, else ``error: ...``
    (``error: CODE (REASON): message``, or ``error: message`` without `show_code`)."""
    if json_mode(args):
        body: dict[str, Any] = {"code": code, "reason": reason, "message": message}
        if metadata:
            body["metadata"] = dict(metadata)
        print(json.dumps({"error": body}, sort_keys=True), file=sys.stderr, flush=True)
        return
    if not show_code:
        print(f"error: {message}", file=sys.stderr, flush=True)
        return
    label = f"{code} ({reason})" if reason else code
    print(f"error: {label}: {message}", file=sys.stderr, flush=True)


def notice(args: argparse.Namespace | None, message: str) -> None:
    """Print a note on stderr (retries, deprecations): ``{"notice": ...}`` with ``--output json``."""
    if json_mode(args):
        print(json.dumps({"notice": {"message": message}}), file=sys.stderr, flush=True)
    else:
        print(message, file=sys.stderr, flush=True)
