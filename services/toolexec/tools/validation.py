"""Checks a tool call against its definition: known name, JSON arguments, JSON Schema (jsonschema).

A bad call becomes a `ToolError` whose message says what was wrong and how to call the tool.
"""

from __future__ import annotations

import json
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError

from services.agent.tools.base import ToolError
from services.toolexec.tools.definitions import TOOLS, TOOLS_BY_NAME, ToolSpec

_VALIDATORS: dict[str, Draft202012Validator] = {
    t.name: Draft202012Validator(t.schema, format_checker=None) for t in TOOLS
}
MAX_REPORTED_ERRORS = 5


def usage(spec: ToolSpec) -> str:
    """A one-line summary of a tool's arguments, e.g. ``read_file(path: string, offset?: integer)``."""
    props: dict[str, Any] = spec.schema.get("properties", {})
    required = set(spec.schema.get("required", []))
    parts = []
    for name, prop in props.items():
        kind = prop.get("type", "any")
        if "enum" in prop:
            kind = " | ".join(json.dumps(v) for v in prop["enum"])
        parts.append(f"{name}{'' if name in required else '?'}: {kind}")
    return f"{spec.name}({', '.join(parts)})"


def parse_arguments(name: str, arguments_json: str) -> dict[str, Any]:
    """The validated arguments of a call to tool `name`, or a `ToolError` for the model."""
    spec = TOOLS_BY_NAME.get(name)
    if spec is None:
        known = ", ".join(t.name for t in TOOLS)
        raise ToolError(f"unknown tool {name!r}. The workspace tools are: {known}.", code="unknown_tool")
    text = arguments_json.strip() or "{}"
    try:
        args = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ToolError(
            f"the arguments of {name} are not valid JSON "
            f"({exc.msg} at line {exc.lineno} column {exc.colno}). "
            f"Send one JSON object: {usage(spec)}.",
            code="invalid_arguments",
        ) from None
    except RecursionError:
        raise _too_deep(spec) from None
    if not isinstance(args, dict):
        raise ToolError(
            f"the arguments of {name} must be a JSON object, got {type(args).__name__}. "
            f"Call it as {usage(spec)}.",
            code="invalid_arguments",
        )
    try:
        errors = sorted(_VALIDATORS[name].iter_errors(args), key=lambda e: list(e.absolute_path))
    except RecursionError:
        raise _too_deep(spec) from None
    if errors:
        lines = [_describe(e) for e in errors[:MAX_REPORTED_ERRORS]]
        raise ToolError(
            f"invalid arguments for {name}:\n- " + "\n- ".join(lines) + f"\nCall it as {usage(spec)}.",
            code="invalid_arguments",
            errors=lines,
        )
    return args


def _too_deep(spec: ToolSpec) -> ToolError:
    return ToolError(
        f"the arguments of {spec.name} are nested too deeply to read. "
        f"Send one flat JSON object: {usage(spec)}.",
        code="invalid_arguments",
    )


def _describe(error: ValidationError) -> str:
    where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    message = error.message
    if len(message) > 300:
        message = message[:300] + "..."
    return f"{where.lstrip('.') or 'arguments'}: {message}"
