"""The tool definitions the model sees: name, description (with the limits) and JSON Schema."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from services.agent.output import OUTPUT_LIMIT_BYTES
from services.agent.tools import exec as exec_tools
from services.agent.tools import files


@dataclass(frozen=True)
class ToolSpec:
    """One tool's model-facing definition."""

    name: str
    description: str
    schema: dict[str, Any]

    @property
    def schema_json(self) -> str:
        """The schema as compact JSON text."""
        return json.dumps(self.schema, separators=(",", ":"), sort_keys=True)


_PATH = {
    "type": "string",
    "minLength": 1,
    "maxLength": 4096,
    "description": "Path relative to the workspace root, e.g. 'src/app.py'.",
}
_KIB = OUTPUT_LIMIT_BYTES // 1024

TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        "read_file",
        (
            "Read a text file in the workspace. Returns lines prefixed with their 1-based line numbers "
            f"and a tab, the total line count, and whether more remains. Reads {files.DEFAULT_READ_LINES} "
            f"lines by default (at most {files.MAX_READ_LINES}) and at most {files.READ_BYTE_CAP // 1024} "
            f"KiB of text per call; lines longer than {files.MAX_LINE_CHARS} characters are cut. Use "
            "offset to continue where the result says. Binary files and files over "
            f"{files.MAX_READ_FILE_BYTES // (1024 * 1024)} MiB are refused."
        ),
        {
            "type": "object",
            "properties": {
                "path": _PATH,
                "offset": {
                    "type": "integer",
                    "minimum": 1,
                    "description": "1-based line to start from (default 1).",
                },
                "limit": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": files.MAX_READ_LINES,
                    "description": f"Number of lines to read (default {files.DEFAULT_READ_LINES}).",
                },
            },
            "required": ["path"],
            "additionalProperties": False,
        },
    ),
    ToolSpec(
        "write_file",
        (
            "Create or overwrite a file in the workspace with the given content (UTF-8 text). The write "
            "is atomic, missing parent directories are created, and an existing file keeps its "
            "permissions. To change part of a file, prefer edit_files."
        ),
        {
            "type": "object",
            "properties": {
                "path": _PATH,
                "content": {
                    "type": "string",
                    "maxLength": files.MAX_FILE_BYTES,
                    "description": "The complete new content of the file.",
                },
            },
            "required": ["path", "content"],
            "additionalProperties": False,
        },
    ),
    ToolSpec(
        "edit_files",
        (
            "Replace exact text in one or more files. Each old_text must match the file exactly once "
            "(including whitespace and indentation) unless replace_all is true; edits to the same file "
            "apply in order. All edits are checked before anything is written: either every file "
            "changes or none does. Returns a unified diff per file. At most 50 edits per call; files "
            f"over {files.MAX_FILE_BYTES // (1024 * 1024)} MiB and binary files are refused."
        ),
        {
            "type": "object",
            "properties": {
                "edits": {
                    "type": "array",
                    "minItems": 1,
                    "maxItems": 50,
                    "items": {
                        "type": "object",
                        "properties": {
                            "path": _PATH,
                            "old_text": {
                                "type": "string",
                                "minLength": 1,
                                "description": "Exact text to replace.",
                            },
                            "new_text": {"type": "string", "description": "Replacement text."},
                            "replace_all": {
                                "type": "boolean",
                                "description": "Replace every occurrence instead of requiring one match.",
                            },
                        },
                        "required": ["path", "old_text", "new_text"],
                        "additionalProperties": False,
                    },
                },
            },
            "required": ["edits"],
            "additionalProperties": False,
        },
    ),
    ToolSpec(
        "execute",
        (
            "Run a shell command (sh -c) in the workspace, non-interactively (no terminal, stdin "
            "closed, PAGER=cat). Returns the exit code, the duration and the combined stdout+stderr, "
            f"capped at {_KIB} KiB (the start and the end are kept, the middle is cut). Default timeout "
            f"{exec_tools.DEFAULT_TIMEOUT_SECONDS:g} s, maximum {exec_tools.MAX_TIMEOUT_SECONDS / 3600:g} h. "
            "A command still running at the timeout is not killed: it continues in the background and "
            "the result gives its process_id for process_output / process_signal. Set "
            "run_in_background for servers and watchers: it returns a process_id at once. The "
            "workspace may have no network (unless its template allows it): if a download cannot "
            "resolve or reach a host, say so instead of retrying."
        ),
        {
            "type": "object",
            "properties": {
                "command": {"type": "string", "minLength": 1, "maxLength": 100_000},
                "workdir": {
                    "type": "string",
                    "maxLength": 4096,
                    "description": "Directory to run in, relative to the workspace root (default: the root).",
                },
                "timeout_seconds": {
                    "type": "number",
                    "exclusiveMinimum": 0,
                    "maximum": exec_tools.MAX_TIMEOUT_SECONDS,
                    "description": f"Seconds to wait (default {exec_tools.DEFAULT_TIMEOUT_SECONDS:g}).",
                },
                "run_in_background": {
                    "type": "boolean",
                    "description": "Return at once with a process_id instead of waiting.",
                },
            },
            "required": ["command"],
            "additionalProperties": False,
        },
    ),
    ToolSpec(
        "process_output",
        (
            "Get the output so far of a background process started by execute, and whether it is still "
            "running (with its exit code once it has exited). Waits up to wait_seconds (default 0, "
            f"maximum {exec_tools.MAX_WAIT_SECONDS:g}) for the process to exit or print something new. "
            f"Output is capped at {_KIB} KiB, keeping the start and the end."
        ),
        {
            "type": "object",
            "properties": {
                "process_id": {"type": "string", "minLength": 1, "maxLength": 64},
                "wait_seconds": {"type": "number", "minimum": 0, "maximum": exec_tools.MAX_WAIT_SECONDS},
            },
            "required": ["process_id"],
            "additionalProperties": False,
        },
    ),
    ToolSpec(
        "process_list",
        "List this workspace's background processes (running and recently finished) with their ids, "
        "commands, status and exit codes.",
        {"type": "object", "properties": {}, "additionalProperties": False},
    ),
    ToolSpec(
        "process_signal",
        (
            "Stop a background process and everything it started: TERMINATE sends SIGTERM (lets it "
            "clean up), KILL sends SIGKILL. The signal goes to the whole process group."
        ),
        {
            "type": "object",
            "properties": {
                "process_id": {"type": "string", "minLength": 1, "maxLength": 64},
                "signal": {"type": "string", "enum": ["TERMINATE", "KILL"]},
            },
            "required": ["process_id", "signal"],
            "additionalProperties": False,
        },
    ),
)

TOOLS_BY_NAME: dict[str, ToolSpec] = {t.name: t for t in TOOLS}
