"""The ErrorReason enums are the complete list of reasons: the code sends nothing else.

One test reads every `reason=` given to a domain error in services/ and checks the enums list it;
others exercise the refusal of an unknown reason (over a real server too) and the string <-> enum
helpers a client uses.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import agentplane
import grpc
import grpc.aio
import pytest
from agentplane.chat.v1 import error_reason_pb2 as chat_reasons
from agentplane.common.v1 import error_reason_pb2 as common_reasons
from agentplane.config.v1 import error_reason_pb2 as config_reasons
from agentplane.inference.v1 import inference_pb2
from agentplane.toolexec.v1 import error_reason_pb2 as toolexec_reasons
from google.protobuf.descriptor import EnumDescriptor
from prometheus_client import CollectorRegistry

from services.common import errors, reasons
from services.common.errors import AgentplaneError, FailedPrecondition, InvalidArgument, NotFound
from services.common.metrics import RpcMetrics
from services.common.rpc_errors import STATUS_CODES, error_info, from_rpc_error, reason_of
from services.common.server import create_server
from services.inference import classify
from tests.helpers import RunningService, make_test_settings, running_server

ROOT = Path(__file__).resolve().parents[2]
ERROR_CLASSES = {
    name for name, obj in vars(errors).items() if isinstance(obj, type) and issubclass(obj, AgentplaneError)
}


def _module_constants(trees: dict[Path, ast.Module]) -> dict[str, set[str]]:
    """Module-level ``NAME = "string"`` assignments of every module, by name (reasons kept in constants)."""
    found: dict[str, set[str]] = {}
    for tree in trees.values():
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                if isinstance(node.value.value, str):
                    for target in node.targets:
                        if isinstance(target, ast.Name):
                            found.setdefault(target.id, set()).add(node.value.value)
    return found


def _reason_expressions(tree: ast.Module) -> Iterator[tuple[int, ast.expr]]:
    """The `reason=` argument of every construction of a domain error class."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
        if name not in ERROR_CLASSES:
            continue
        for keyword in node.keywords:
            if keyword.arg == "reason":
                yield node.lineno, keyword.value


def _scan() -> tuple[dict[str, list[str]], list[str]]:
    """Reason strings used in services/ (with where), and the sites whose reason is computed."""
    trees = {
        path: ast.parse(path.read_text(), str(path)) for path in sorted((ROOT / "services").rglob("*.py"))
    }
    constants = _module_constants(trees)
    used: dict[str, list[str]] = {}
    computed: list[str] = []
    for path, tree in trees.items():
        for line, expr in _reason_expressions(tree):
            where = f"{path.relative_to(ROOT)}:{line}"
            values: set[str] = set()
            for sub in ast.walk(expr):  # both branches of `"A" if sent else "B"` too
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    values.add(sub.value)
                elif isinstance(sub, ast.Name | ast.Attribute):
                    ident = sub.id if isinstance(sub, ast.Name) else sub.attr
                    values |= constants.get(ident, set()) if ident.isupper() else set()
            if not values:
                computed.append(f"{where}: {ast.unparse(expr)}")
            for value in values:
                used.setdefault(value, []).append(where)
    return used, computed


def test_every_reason_given_in_services_is_in_an_enum() -> None:
    used, computed = _scan()
    # The scan really sees the code: well-known reasons of every layer are found.
    for reason in (
        "TOKEN_EXPIRED",
        "PROVIDER_IN_USE",
        "WORKSPACE_NOT_READY",
        "CHAT_NOT_FOUND",
        "STREAM_INTERRUPTED",
    ):
        assert reason in used, reason
    unknown = {reason: sites for reason, sites in used.items() if reason not in reasons.OWNERS}
    assert not unknown, f"reasons missing from the ErrorReason enums: {unknown}"
    # A computed reason is only allowed where it passes on one already checked: the reason of a
    # caught domain error (config) or a classified provider failure (inference, checked below).
    # A new computed site needs its own check here.
    passing_on = {"services/config/service.py", "services/inference/classify.py"}
    assert {site.split(":")[0] for site in computed} <= passing_on, computed


def test_inference_failure_classes_are_inference_reasons() -> None:
    # classify passes ProviderFailure.reason through: its reason constants must be inference's.
    names = [name for name, value in vars(classify).items() if name.isupper() and value == name]
    assert len(names) >= 8
    for name in names:
        assert reasons.domain_of(name) == "agentplane.inference.v1", name


def test_the_generic_reasons_are_the_status_code_names() -> None:
    for cls, code in STATUS_CODES.items():
        assert cls.default_reason == code.name
        assert reasons.domain_of(cls.default_reason) == reasons.COMMON_DOMAIN
        assert common_reasons.ErrorReason.Value(reasons.PREFIX + code.name) == code.value[0]
    # And a status without ErrorInfo comes back with its code's name, which the common enum lists.
    for code in grpc.StatusCode:
        if code is not grpc.StatusCode.OK:
            assert reasons.domain_of(code.name) == reasons.COMMON_DOMAIN


def _enums_in_gen() -> list[EnumDescriptor]:
    found = []
    for module in pkgutil.walk_packages(agentplane.__path__, "agentplane."):
        if module.name.endswith("_pb2"):
            enum = importlib.import_module(module.name).DESCRIPTOR.enum_types_by_name.get("ErrorReason")
            if enum is not None:
                found.append(enum)
    return found


def test_every_error_reason_enum_is_registered_and_names_are_unique() -> None:
    in_gen = {e.full_name for e in _enums_in_gen()}
    assert in_gen == {e.full_name for e in reasons.ENUMS}
    assert len(in_gen) == 5
    names = [v.name for e in reasons.ENUMS for v in e.values if v.number != 0]
    assert len(names) == len(set(v.removeprefix(reasons.PREFIX) for v in names)) == len(reasons.OWNERS)
    for enum in reasons.ENUMS:
        assert enum.values_by_number[0].name == "ERROR_REASON_UNSPECIFIED"
        assert all(v.name.startswith(reasons.PREFIX) for v in enum.values)


def test_an_unknown_reason_is_refused_when_the_error_is_made() -> None:
    with pytest.raises(reasons.UnknownReason, match="NO_SUCH_REASON"):
        NotFound("x", reason="NO_SUCH_REASON")
    with pytest.raises(reasons.UnknownReason):
        InvalidArgument("field", "bad", reason="chat_not_found")  # case matters
    assert NotFound("x", reason="CHAT_NOT_FOUND").domain == "agentplane.chat.v1"
    assert InvalidArgument("field", "bad").domain == reasons.COMMON_DOMAIN


def test_enum_values_and_reason_strings_convert_both_ways() -> None:
    enums: list[Any] = [  # five different enum types: no one static type for the loop
        common_reasons.ErrorReason,
        config_reasons.ErrorReason,
        inference_pb2.ErrorReason,
        toolexec_reasons.ErrorReason,
        chat_reasons.ErrorReason,
    ]
    for enum in enums:
        domain = reasons.domain_of_enum(enum.DESCRIPTOR)
        for value in enum.values():
            if value == 0:
                with pytest.raises(reasons.UnknownReason):
                    reasons.name_of(value, enum)
                continue
            name = reasons.name_of(value, enum)
            assert reasons.domain_of(name) == domain
            assert reasons.value_of(name, domain, enum) == value
    assert reasons.name_of(chat_reasons.ERROR_REASON_CHAT_BUSY, chat_reasons.ErrorReason) == "CHAT_BUSY"
    # Another enum's domain, an unknown (newer) reason or nothing at all: UNSPECIFIED.
    assert reasons.value_of("CHAT_BUSY", "agentplane.toolexec.v1", chat_reasons.ErrorReason) == 0
    assert reasons.value_of("CHAT_ON_FIRE", "agentplane.chat.v1", chat_reasons.ErrorReason) == 0
    assert reasons.value_of("", "", chat_reasons.ErrorReason) == 0


# --- over a real server ------------------------------------------------------------------------

SERVICE = "agentplane.test.v1.ReasonService"


async def _busy(request: bytes, context: Any) -> bytes:
    raise FailedPrecondition("chat 1 is running", reason="CHAT_BUSY", metadata={"chat_id": "1"})


async def _made_up(request: bytes, context: Any) -> bytes:
    raise FailedPrecondition("this reason is in no enum", reason="MADE_UP")


async def _no_info(request: bytes, context: Any) -> bytes:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "not here")
    return b""


def _register(server: grpc.aio.Server) -> None:
    handlers = {
        "Busy": grpc.unary_unary_rpc_method_handler(_busy),
        "MadeUp": grpc.unary_unary_rpc_method_handler(_made_up),
        "NoInfo": grpc.unary_unary_rpc_method_handler(_no_info),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))


@pytest.fixture
async def svc(user_token: str) -> AsyncIterator[RunningService]:
    handle = create_server(
        make_test_settings(),
        "chat",
        _register,
        [SERVICE],
        metrics=RpcMetrics.for_registry(CollectorRegistry()),
    )
    async with running_server(handle, token=user_token) as running:
        yield running


async def _fail(svc: RunningService, name: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await svc.channel.unary_unary(f"/{SERVICE}/{name}")(b"")
    return info.value


async def test_a_client_switches_on_the_enum(svc: RunningService) -> None:
    exc = await _fail(svc, "Busy")
    assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert reason_of(exc, chat_reasons.ErrorReason) == chat_reasons.ERROR_REASON_CHAT_BUSY
    # The same number in another service's enum does not match: the domain is checked.
    assert reason_of(exc, toolexec_reasons.ErrorReason) == toolexec_reasons.ERROR_REASON_UNSPECIFIED
    assert error_info(exc) == ("CHAT_BUSY", {"chat_id": "1"})
    err = from_rpc_error(exc)
    assert (type(err), err.reason, err.domain) == (FailedPrecondition, "CHAT_BUSY", "agentplane.chat.v1")


async def test_a_made_up_reason_never_reaches_the_wire(svc: RunningService) -> None:
    exc = await _fail(svc, "MadeUp")
    # Making the error failed: a bug, answered as such, without the made-up reason.
    assert exc.code() == grpc.StatusCode.INTERNAL
    assert error_info(exc) is None and "MADE_UP" not in (exc.details() or "")


async def test_a_status_without_error_info_keeps_its_code_name(svc: RunningService) -> None:
    exc = await _fail(svc, "NoInfo")
    assert reason_of(exc, common_reasons.ErrorReason) == common_reasons.ERROR_REASON_UNSPECIFIED
    err = from_rpc_error(exc)
    assert (err.reason, err.domain) == ("UNIMPLEMENTED", reasons.COMMON_DOMAIN)
    # A newer service's reason we do not know is carried through unchanged, not refused.
    assert NotFound("x").received("SOMETHING_NEW", "agentplane.chat.v1").reason == "SOMETHING_NEW"
