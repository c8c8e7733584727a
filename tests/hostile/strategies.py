"""Hypothesis strategies that build any request message from its descriptor.

`Fuzzer(known_strings, page_tokens).message(descriptor)` draws a message of that type: each field
set or not, oneofs with at most one member, values by field type — odd unicode (NULs, direction
marks, astral characters), huge and empty strings, ids of the seeded world and look-alikes, page
tokens (random, and real ones with their contents tampered with), JSON that is and is not valid,
negative and extreme numbers, NaN and infinities, enum numbers no enum has, timestamps and
durations outside their valid range, field masks naming real and unreal fields. A new RPC, field
or message is fuzzed without any change here.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from functools import cache
from typing import Any

from google.protobuf import descriptor as d
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st

F = d.FieldDescriptor
MAX_DEPTH = 3
INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
UINT32 = (0, 2**32 - 1)
UINT64 = (0, 2**64 - 1)
# Timestamp/Duration limits (google/protobuf/timestamp.proto): just inside and just outside.
TIME_EDGES = (-62135596800, -62135596801, 253402300799, 253402300800, 315576000000, 315576000001)

ODD_STRINGS = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\t\n\r",
    "\u202e\u200b\ufeff",
    "\U0001d54f\U0001f600",
    "é" * 201,
    "../../../etc/passwd",
    "/proc/self/environ",
    "' OR '1'='1' --",
    "%s%n%x",
    "${HOME}",
    "{}",
    "[]",
    "null",
    "-1",
    "1e999",
    "service:chat",
    "service:",
    "ws_",
    "ws_" + "0" * 20,
    "ws_" + "G" * 20,
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "o",
    "o-1",
    "o\u00b2",
    "o\u0663",
    "o" + "9" * 5000,
)


def _json_leaves() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=20),
        st.sampled_from(["2020-01-01T00:00:00+00:00", "9999-12-31T23:59:59", "0001-01-01", "x"]),
        st.uuids().map(str),
    )


def json_values() -> st.SearchStrategy[Any]:
    """Any JSON value, nested a little."""
    return st.recursive(
        _json_leaves(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )


def json_texts() -> st.SearchStrategy[str]:
    """Valid JSON of any shape, JSON with NaN/Infinity, truncated JSON, and plain text."""
    valid = json_values().map(json.dumps)
    return st.one_of(
        valid,
        valid.map(lambda s: s[: max(1, len(s) // 2)]),
        st.sampled_from(
            ['{"a": NaN}', "[Infinity]", '{"a": 1, "a": 2}', "{" * 5000, '"\\ud800"', '{"a": "\\u0000"}']
        ),
        # Nested past any parser's recursion limit, closed and not.
        st.sampled_from(["[" * 100_000, "[" * 50_000 + "]" * 50_000, '{"a":' * 30_000 + "1" + "}" * 30_000]),
        st.text(max_size=50),
    )


def _b64(raw: bytes, padded: bool) -> str:
    text = base64.urlsafe_b64encode(raw).decode()
    return text if padded else text.rstrip("=")


def _leaf_map(value: Any, replacements: list[Any]) -> Any:
    """`value` with its leaves replaced, in order, by `replacements` (cycled)."""
    if isinstance(value, dict):
        return {k: _leaf_map(v, replacements) for k, v in value.items()}
    if isinstance(value, list):
        return [_leaf_map(v, replacements) for v in value]
    if not replacements:
        return value
    head = replacements.pop(0)
    replacements.append(head)
    return head


@st.composite
def tampered_tokens(draw: st.DrawFn, real: Sequence[str]) -> str:
    """A real page token with its decoded contents changed, or cut, or padded oddly."""
    token = draw(st.sampled_from(list(real)))
    how = draw(st.sampled_from(["leaves", "cut", "flip", "pad"]))
    if how == "cut":
        return token[: draw(st.integers(0, max(0, len(token) - 1)))]
    if how == "pad":
        return token + draw(st.sampled_from(["=", "==", "===", "!", " "]))
    if how == "flip":
        i = draw(st.integers(0, max(0, len(token) - 1)))
        return token[:i] + draw(st.sampled_from("A/+_-=\x00")) + token[i + 1 :]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    except (binascii.Error, ValueError):
        decoded = None
    if decoded is None:
        return _b64(draw(st.binary(max_size=40)), draw(st.booleans()))
    replacements = draw(st.lists(_json_leaves(), min_size=1, max_size=4))
    changed = _leaf_map(decoded, replacements)
    return _b64(json.dumps(changed).encode(), draw(st.booleans()))


class Fuzzer:
    """Request strategies over the seeded world's ids (`known`) and real page tokens (`tokens`)."""

    def __init__(self, known: Sequence[str], tokens: Sequence[str] = ()) -> None:
        self.known = tuple(dict.fromkeys(k for k in known if k))
        self.tokens = tuple(dict.fromkeys(t for t in tokens if t))

    def __repr__(self) -> str:
        return f"Fuzzer({len(self.known)} known strings, {len(self.tokens)} page tokens)"

    def message(self, descriptor: d.Descriptor) -> st.SearchStrategy[Message]:
        """A message of `descriptor`'s type with fuzzed fields."""
        return self._message(descriptor, 0)

    @cache  # noqa: B019 (one fuzzer per test module: the cache dies with it)
    def _message(self, descriptor: d.Descriptor, depth: int) -> st.SearchStrategy[Message]:
        cls = GetMessageClass(descriptor)
        special = _WELL_KNOWN.get(descriptor.full_name)
        if special is not None:
            return special()
        if depth > MAX_DEPTH:
            return st.just(cls())
        groups = [o for o in descriptor.oneofs]
        loose = [f for f in descriptor.fields if f.containing_oneof is None]
        sibling_names = sorted(
            {
                sub.name
                for f in descriptor.fields
                if f.message_type is not None
                for sub in f.message_type.fields
            }
        )

        @st.composite
        def build(draw: st.DrawFn) -> Message:
            msg = cls()
            for field in loose:
                if draw(st.booleans()):
                    self._set(draw, msg, field, depth, sibling_names)
            for group in groups:
                chosen = draw(st.sampled_from([None, *group.fields]))
                if chosen is not None:
                    self._set(draw, msg, chosen, depth, sibling_names)
            return msg

        return build()

    def _set(self, draw: st.DrawFn, msg: Message, field: Any, depth: int, sibling_names: list[str]) -> None:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key_field = field.message_type.fields_by_name["key"]
            value_field = field.message_type.fields_by_name["value"]
            entries = draw(
                st.dictionaries(
                    self._scalar(key_field, sibling_names),
                    self._value(value_field, depth, sibling_names),
                    max_size=3,
                )
            )
            target = getattr(msg, field.name)
            for k, v in entries.items():
                if isinstance(v, Message):
                    target[k].CopyFrom(v)
                else:
                    target[k] = v
            return
        if field.is_repeated:
            # Long lists of scalars only: forty nested messages per level would build 40**3 of them.
            many = 3 if field.type == F.TYPE_MESSAGE else 40
            count = draw(st.sampled_from([0, 1, 1, 2, 3, many]))
            values = [draw(self._value(field, depth, sibling_names)) for _ in range(count)]
            target = getattr(msg, field.name)
            for v in values:
                if isinstance(v, Message):
                    target.add().CopyFrom(v)
                else:
                    target.append(v)
            return
        value = draw(self._value(field, depth, sibling_names))
        if isinstance(value, Message):
            getattr(msg, field.name).CopyFrom(value)
        else:
            setattr(msg, field.name, value)

    def _value(self, field: Any, depth: int, sibling_names: list[str]) -> st.SearchStrategy[Any]:
        if field.type == F.TYPE_MESSAGE:
            if field.message_type.full_name == "google.protobuf.FieldMask":
                return _field_masks(sibling_names)
            return self._message(field.message_type, depth + 1)
        return self._scalar(field, sibling_names)

    def _scalar(self, field: Any, sibling_names: list[str]) -> st.SearchStrategy[Any]:
        t = field.type
        if t == F.TYPE_STRING:
            return self._strings(field.name)
        if t == F.TYPE_BYTES:
            return st.one_of(
                st.binary(max_size=64),
                st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF0000WEBP"]).flatmap(
                    lambda head: st.binary(max_size=32).map(lambda tail: head + tail)
                ),
            )
        if t == F.TYPE_BOOL:
            return st.booleans()
        if t in (F.TYPE_DOUBLE,):
            return st.floats()
        if t == F.TYPE_FLOAT:
            return st.floats(width=32)
        if t == F.TYPE_ENUM:
            numbers = [v.number for v in field.enum_type.values]
            return st.one_of(
                st.sampled_from(numbers), st.integers(min(numbers) - 3, max(numbers) + 3), _int(INT32)
            )
        if t in (F.TYPE_INT32, F.TYPE_SINT32, F.TYPE_SFIXED32):
            return _int(INT32)
        if t in (F.TYPE_INT64, F.TYPE_SINT64, F.TYPE_SFIXED64):
            return _int(INT64)
        if t in (F.TYPE_UINT32, F.TYPE_FIXED32):
            return _int(UINT32)
        if t in (F.TYPE_UINT64, F.TYPE_FIXED64):
            return _int(UINT64)
        raise AssertionError(f"no strategy for field {field.full_name} of type {t}")

    def _strings(self, name: str) -> st.SearchStrategy[str]:
        options: list[st.SearchStrategy[str]] = [
            st.text(st.characters(codec="utf-8"), max_size=30),
            st.sampled_from(ODD_STRINGS),
            st.uuids().map(str),
            st.integers(1_000, 100_000).map(lambda n: "x" * n),
            st.binary(max_size=48).map(lambda b: _b64(b, True)),
        ]
        if self.known:
            options += [st.sampled_from(self.known)] * 3
        if name.endswith("page_token"):
            options.append(
                st.dictionaries(
                    st.sampled_from(["k", "p", "u", "i", "s", "o", "t"]), json_values(), max_size=4
                ).flatmap(lambda data: st.booleans().map(lambda p: _b64(json.dumps(data).encode(), p)))
            )
            if self.tokens:
                options += [tampered_tokens(self.tokens)] * 3
        if "json" in name:
            options += [json_texts()] * 3
        return st.one_of(options)


def _int(bounds: tuple[int, int]) -> st.SearchStrategy[int]:
    low, high = bounds
    edges = [v for v in (0, 1, -1, 2, 1000, low, high, low + 1, high - 1, *TIME_EDGES) if low <= v <= high]
    return st.one_of(
        st.sampled_from(edges), st.integers(low, high), st.integers(max(low, -100), min(high, 100))
    )


def _field_masks(names: list[str]) -> st.SearchStrategy[Message]:
    from google.protobuf import field_mask_pb2

    path = st.one_of(
        st.sampled_from(names or ["x"]), st.text(max_size=12), st.sampled_from(["", "*", "id", "a.b"])
    )
    return st.lists(path, max_size=4).map(lambda paths: field_mask_pb2.FieldMask(paths=paths))


def _timestamps() -> st.SearchStrategy[Message]:
    from google.protobuf import timestamp_pb2

    return st.builds(timestamp_pb2.Timestamp, seconds=_int(INT64), nanos=_int(INT32))


def _durations() -> st.SearchStrategy[Message]:
    from google.protobuf import duration_pb2

    return st.builds(duration_pb2.Duration, seconds=_int(INT64), nanos=_int(INT32))


def _structs() -> st.SearchStrategy[Message]:
    from google.protobuf import struct_pb2

    def make(data: dict[str, Any]) -> Message:
        s = struct_pb2.Struct()
        s.update(data)
        return s

    return st.dictionaries(st.text(max_size=8), json_values(), max_size=4).map(make)


_WELL_KNOWN = {
    "google.protobuf.Timestamp": _timestamps,
    "google.protobuf.Duration": _durations,
    "google.protobuf.Struct": _structs,
}
