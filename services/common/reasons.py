"""The API's ErrorReason enums: which error reasons exist, the domain of each, string <-> enum.

A failed call carries a google.rpc.ErrorInfo. Its `reason` is the name of a value of one of the
protos' ErrorReason enums without the ``ERROR_REASON_`` prefix (``CHAT_NOT_FOUND`` for
``agentplane.chat.v1.ERROR_REASON_CHAT_NOT_FOUND``), so the enum documents every reason while the
wire carries the readable string; its `domain` is that enum's proto package
(``agentplane.chat.v1``). Every name is defined in exactly one enum, so a reason alone determines
its enum and domain. `AgentplaneError` refuses a reason that no enum lists (`UnknownReason`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, TypeVar

from agentplane.chat.v1 import error_reason_pb2 as chat_reasons
from agentplane.common.v1 import error_reason_pb2 as common_reasons
from agentplane.config.v1 import error_reason_pb2 as config_reasons
from agentplane.inference.v1 import inference_pb2
from agentplane.toolexec.v1 import error_reason_pb2 as toolexec_reasons
from google.protobuf.descriptor import EnumDescriptor

if TYPE_CHECKING:
    from google.protobuf.internal.enum_type_wrapper import _EnumTypeWrapper

V = TypeVar("V", bound=int)

PREFIX = "ERROR_REASON_"
# Every ErrorReason enum of the API; the common one first. A new service adds its enum here.
ENUMS: tuple[EnumDescriptor, ...] = (
    common_reasons.ErrorReason.DESCRIPTOR,
    config_reasons.ErrorReason.DESCRIPTOR,
    inference_pb2.ErrorReason.DESCRIPTOR,
    toolexec_reasons.ErrorReason.DESCRIPTOR,
    chat_reasons.ErrorReason.DESCRIPTOR,
)
COMMON_DOMAIN = common_reasons.DESCRIPTOR.package


class UnknownReason(ValueError):
    """A reason that no ErrorReason enum lists: a bug in the code that tried to send it."""


def domain_of_enum(enum: EnumDescriptor) -> str:
    """The ErrorInfo domain of an enum's reasons: its proto package."""
    return enum.file.package


def _owners(enums: tuple[EnumDescriptor, ...]) -> dict[str, EnumDescriptor]:
    owners: dict[str, EnumDescriptor] = {}
    for enum in enums:
        for value in enum.values:
            if value.number == 0:
                continue
            name = value.name.removeprefix(PREFIX)
            if name in owners:
                # Would make the domain of a reason ambiguous; tests/common/test_error_reasons.py
                # names the clash, but refusing to import keeps it from ever shipping.
                raise RuntimeError(
                    f"error reason {name} is defined by {owners[name].full_name} and {enum.full_name}"
                )
            owners[name] = enum
    return owners


OWNERS: Mapping[str, EnumDescriptor] = _owners(ENUMS)


def domain_of(reason: str) -> str:
    """The ErrorInfo domain of `reason`; `UnknownReason` when no ErrorReason enum lists it."""
    enum = OWNERS.get(reason)
    if enum is None:
        raise UnknownReason(
            f"error reason {reason!r} is not in any ErrorReason enum; add it (with a comment saying when "
            "it is sent and what the client should do) to the owning service's error_reason.proto, "
            "or use an existing one"
        )
    return domain_of_enum(enum)


def name_of(value: int, enum: _EnumTypeWrapper[V]) -> str:
    """The ErrorInfo reason string of an enum value (``ERROR_REASON_CHAT_BUSY`` -> ``CHAT_BUSY``)."""
    if value == 0:
        raise UnknownReason(f"{enum.DESCRIPTOR.full_name}'s zero value is never sent")
    return enum.Name(value).removeprefix(PREFIX)  # type: ignore[arg-type]


def value_of(reason: str, domain: str, enum: _EnumTypeWrapper[V]) -> V:
    """The value of `enum` that an ErrorInfo (reason, domain) names, or its zero value (UNSPECIFIED).

    Zero when the domain is another enum's or the reason is unknown to this version (a newer
    server): the caller then acts on the status code alone.
    """
    if domain == domain_of_enum(enum.DESCRIPTOR) and reason:
        value = enum.DESCRIPTOR.values_by_name.get(PREFIX + reason)
        if value is not None and value.number != 0:
            return enum.Value(value.name)
    return enum.Value(PREFIX + "UNSPECIFIED")
