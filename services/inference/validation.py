"""Validation of GenerateRequest and ListProviderModelsRequest; errors name the offending field."""

from __future__ import annotations

import json
import re
from functools import lru_cache

import jsonschema
from agentplane.inference.v1 import inference_pb2, inference_service_pb2

from services.common.errors import InvalidArgument

MAX_IMAGE_BYTES = 10 * 1024 * 1024
TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ALLOWED_PARTS = {
    inference_pb2.ROLE_USER: ("text", "image"),
    inference_pb2.ROLE_ASSISTANT: ("text", "reasoning", "tool_call"),
    inference_pb2.ROLE_TOOL: ("tool_result",),
}
ROLE_NAMES = {
    inference_pb2.ROLE_USER: "user",
    inference_pb2.ROLE_ASSISTANT: "assistant",
    inference_pb2.ROLE_TOOL: "tool",
}


def image_type(data: bytes) -> str | None:
    """The MIME type the magic bytes say, among PNG, JPEG, GIF and WebP."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def validate_image(image: inference_pb2.ImagePart, field: str) -> None:
    """An image must be PNG, JPEG, GIF or WebP (by its bytes), declared as such, at most 10 MB."""
    if not image.data:
        raise InvalidArgument(f"{field}.data", "the image is empty")
    if len(image.data) > MAX_IMAGE_BYTES:
        raise InvalidArgument(f"{field}.data", f"the image is {len(image.data)} bytes; the limit is 10 MB")
    actual = image_type(image.data)
    if actual is None:
        raise InvalidArgument(f"{field}.data", "the bytes are not a PNG, JPEG, GIF or WebP image")
    if image.mime_type != actual:
        raise InvalidArgument(
            f"{field}.mime_type", f"declared {image.mime_type or '(empty)'!s} but the bytes are {actual}"
        )


@lru_cache(maxsize=512)
def _check_schema(schema_json: str) -> str | None:
    """None when `schema_json` is a valid JSON Schema of an object, else the problem (cached)."""
    try:
        schema = json.loads(schema_json)
    except json.JSONDecodeError as exc:
        return f"not valid JSON: {exc.msg} at position {exc.pos}"
    except RecursionError:
        return "nested too deeply to read"
    if not isinstance(schema, dict):
        return "must be a JSON object (a JSON Schema)"
    if schema.get("type", "object") != "object":
        return 'must describe an object ("type": "object")'
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        return f"not a valid JSON Schema: {exc.message}"
    except RecursionError:
        return "nested too deeply to check"
    return None


def validate_generate(request: inference_service_pb2.GenerateRequest) -> None:
    """Raise InvalidArgument for the first problem found, naming its field."""
    if not request.messages:
        raise InvalidArgument("messages", "at least one message is required")
    tool_names: set[str] = set()
    for i, tool in enumerate(request.tools):
        field = f"tools[{i}]"
        if not TOOL_NAME.match(tool.name):
            raise InvalidArgument(
                f"{field}.name", f"{tool.name!r} must be 1-64 letters, digits, underscores or dashes"
            )
        if tool.name in tool_names:
            raise InvalidArgument(f"{field}.name", f"duplicate tool name {tool.name!r}")
        tool_names.add(tool.name)
        if tool.input_schema_json:
            problem = _check_schema(tool.input_schema_json)
            if problem:
                raise InvalidArgument(f"{field}.input_schema_json", problem)
    _validate_tool_choice(request, tool_names)
    _validate_options(request.options)
    call_ids: set[str] = set()
    for i, message in enumerate(request.messages):
        _validate_message(message, f"messages[{i}]", call_ids)


def _validate_tool_choice(request: inference_service_pb2.GenerateRequest, tool_names: set[str]) -> None:
    mode = request.tool_choice.mode
    if mode not in inference_pb2.ToolChoiceMode.values():
        raise InvalidArgument("tool_choice.mode", f"unknown mode {mode}")
    if (
        mode in (inference_pb2.TOOL_CHOICE_MODE_REQUIRED, inference_pb2.TOOL_CHOICE_MODE_TOOL)
        and not tool_names
    ):
        raise InvalidArgument("tool_choice.mode", "requires at least one tool in tools")
    if mode == inference_pb2.TOOL_CHOICE_MODE_TOOL and request.tool_choice.tool_name not in tool_names:
        raise InvalidArgument(
            "tool_choice.tool_name", f"{request.tool_choice.tool_name!r} is not one of the request's tools"
        )


def _validate_options(options: inference_pb2.GenerationOptions) -> None:
    if options.HasField("max_output_tokens") and options.max_output_tokens <= 0:
        raise InvalidArgument("options.max_output_tokens", "must be greater than zero when set")
    if options.HasField("temperature") and not 0.0 <= options.temperature <= 2.0:
        raise InvalidArgument("options.temperature", "must be between 0 and 2")
    if options.reasoning_effort not in inference_pb2.ReasoningEffort.values():
        raise InvalidArgument("options.reasoning_effort", f"unknown value {options.reasoning_effort}")


def _validate_message(message: inference_pb2.Message, field: str, call_ids: set[str]) -> None:
    allowed = ALLOWED_PARTS.get(message.role)
    if allowed is None:
        raise InvalidArgument(f"{field}.role", "must be ROLE_USER, ROLE_ASSISTANT or ROLE_TOOL")
    if not message.parts:
        raise InvalidArgument(f"{field}.parts", "a message needs at least one part")
    for j, part in enumerate(message.parts):
        pfield = f"{field}.parts[{j}]"
        kind = part.WhichOneof("part")
        if kind is None:
            raise InvalidArgument(
                pfield, "the part is empty; set text, image, reasoning, tool_call or tool_result"
            )
        if kind not in allowed:
            raise InvalidArgument(
                pfield, f"a {ROLE_NAMES[message.role]} message cannot contain a {kind} part"
            )
        if kind == "image":
            validate_image(part.image, f"{pfield}.image")
        elif kind == "tool_call":
            call = part.tool_call
            if not call.id:
                raise InvalidArgument(f"{pfield}.tool_call.id", "is required")
            if not TOOL_NAME.match(call.name):
                raise InvalidArgument(f"{pfield}.tool_call.name", f"{call.name!r} is not a valid tool name")
            call_ids.add(call.id)
        elif kind == "tool_result":
            result = part.tool_result
            if not result.tool_call_id:
                raise InvalidArgument(f"{pfield}.tool_result.tool_call_id", "is required")
            if result.tool_call_id not in call_ids:
                raise InvalidArgument(
                    f"{pfield}.tool_result.tool_call_id",
                    f"{result.tool_call_id!r} does not answer a tool call of an earlier assistant message",
                )
            for k, image in enumerate(result.images):
                validate_image(image, f"{pfield}.tool_result.images[{k}]")


MAX_PAGE_SIZE = 1000
DEFAULT_PAGE_SIZE = 100
PAGE_TOKEN = re.compile(r"o[0-9]{1,9}\Z")


def validate_list_models(request: inference_service_pb2.ListProviderModelsRequest) -> tuple[int, int]:
    """(offset, page size) of a ListProviderModels request."""
    if not request.provider_id:
        raise InvalidArgument("provider_id", "is required")
    if request.page_size < 0:
        raise InvalidArgument("page_size", "must not be negative")
    size = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    offset = 0
    if request.page_token:
        # ASCII digits only: str.isdigit() also accepts '²' and '٣', which int() refuses or reads.
        if not PAGE_TOKEN.match(request.page_token):
            raise InvalidArgument("page_token", "is not a token from a previous response")
        offset = int(request.page_token[1:])
    return offset, size
