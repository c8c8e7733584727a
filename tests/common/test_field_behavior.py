"""Every field a client may send, and every field of a resource, says how it behaves
(google.api.field_behavior: REQUIRED, OPTIONAL, OUTPUT_ONLY, IMMUTABLE, IDENTIFIER)."""

from __future__ import annotations

from pathlib import Path

from agentplane.chat.v1 import chat_pb2, chat_service_pb2
from agentplane.config.v1 import config_pb2, config_service_pb2, token_service_pb2
from agentplane.inference.v1 import inference_service_pb2
from agentplane.toolexec.v1 import toolexec_pb2, toolexec_service_pb2, workspace_agent_service_pb2
from google.api import field_behavior_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor

ROOT = Path(__file__).resolve().parents[2]
MODULES = (
    chat_service_pb2,
    config_service_pb2,
    token_service_pb2,
    inference_service_pb2,
    toolexec_service_pb2,
    workspace_agent_service_pb2,
)
# Resources that requests never carry whole (their ids travel as strings): annotated all the same.
RESOURCES = (
    chat_pb2.Message.DESCRIPTOR,
    chat_pb2.QueuedMessage.DESCRIPTOR,
    config_pb2.SystemPrompt.DESCRIPTOR,
    config_pb2.UserPrompt.DESCRIPTOR,
    toolexec_pb2.Workspace.DESCRIPTOR,
)
F = field_behavior_pb2
ALLOWED = {F.REQUIRED, F.OPTIONAL, F.OUTPUT_ONLY, F.IMMUTABLE, F.IDENTIFIER}


def _walk(message: Descriptor, seen: dict[str, Descriptor]) -> None:
    if message.full_name in seen or message.full_name.startswith("google."):
        return
    seen[message.full_name] = message
    for field in message.fields:
        target = field.message_type
        if target is None:
            continue
        if target.GetOptions().map_entry:
            target = target.fields_by_name["value"].message_type
            if target is None:
                continue
        _walk(target, seen)


def annotated_messages() -> dict[str, Descriptor]:
    """The request messages, every message reachable from them, and the resources."""
    seen: dict[str, Descriptor] = {}
    for module in MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                _walk(method.input_type, seen)
    for resource in RESOURCES:
        _walk(resource, seen)
    return seen


def behaviors(field: FieldDescriptor) -> list[int]:
    return list(field.GetOptions().Extensions[field_behavior_pb2.field_behavior])


def test_every_request_and_resource_field_is_annotated() -> None:
    messages = annotated_messages()
    assert len(messages) > 90
    missing, odd = [], []
    for message in messages.values():
        for field in message.fields:
            found = behaviors(field)
            if not found:
                missing.append(field.full_name)
            elif not set(found) <= ALLOWED:
                odd.append(f"{field.full_name}: {[F.FieldBehavior.Name(b) for b in found]}")
    assert not missing, f"add a (google.api.field_behavior) to: {missing}"
    assert not odd, odd


def test_request_fields_are_inputs() -> None:
    """A request's own fields are never output only: a client sends them."""
    wrong = [
        field.full_name
        for message in annotated_messages().values()
        if message.name.endswith("Request")
        for field in message.fields
        if F.OUTPUT_ONLY in behaviors(field)
    ]
    assert not wrong


def test_a_resource_id_identifies_it() -> None:
    for resource in (
        chat_pb2.Chat,
        config_pb2.Provider,
        config_pb2.ModelConfig,
        config_pb2.WorkspaceTemplate,
    ):
        assert behaviors(resource.DESCRIPTOR.fields_by_name["id"]) == [F.IDENTIFIER]
    # Provider type is chosen once: required at creation, never changed.
    assert behaviors(config_pb2.Provider.DESCRIPTOR.fields_by_name["type"]) == [F.REQUIRED, F.IMMUTABLE]


def test_the_vendored_proto_is_the_one_the_python_package_ships() -> None:
    """buf reads proto/google/api/field_behavior.proto; the generated code imports the module
    googleapis-common-protos ships. Both must describe the same options (scripts/gen.py)."""
    vendored = ROOT / "proto" / "google" / "api" / "field_behavior.proto"
    shipped = Path(field_behavior_pb2.__file__).with_name("field_behavior.proto")
    assert vendored.read_bytes() == shipped.read_bytes()
    # gen/ holds only our packages: the vendored file is never generated a second time.
    assert not (ROOT / "gen" / "google").exists()
