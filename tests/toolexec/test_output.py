"""CappedOutput: head and tail kept, bounded memory, UTF-8 safe cuts, truncation flag."""

from __future__ import annotations

from services.agent.output import CappedOutput


def test_small_output_is_kept_whole() -> None:
    out = CappedOutput(limit=64)
    out.append(b"hello ")
    out.append(b"world")
    rendered = out.render()
    assert rendered.text == "hello world"
    assert not rendered.truncated
    assert rendered.total_bytes == 11


def test_large_output_keeps_head_and_tail() -> None:
    out = CappedOutput(limit=32 * 1024)
    for i in range(10_000):
        out.append(f"line {i:05d}\n".encode())
    rendered = out.render()
    assert rendered.truncated
    assert rendered.text.startswith("line 00000\n")
    assert rendered.text.endswith("line 09999\n")
    assert "bytes of output omitted" in rendered.text
    assert rendered.total_bytes == 110_000
    assert len(rendered.text.encode()) <= 32 * 1024 + 100


def test_cuts_never_split_a_utf8_character() -> None:
    # 3-byte characters with a 1-byte offset, so both cut points fall inside a character.
    out = CappedOutput(limit=1000)
    out.append(b"x" + "€".encode() * 2000)
    rendered = out.render()
    assert rendered.truncated
    assert "\ufffd" not in rendered.text
    head, _, tail = rendered.text.partition("\n[...")
    assert head.startswith("x€") and set(head[1:]) == {"€"}
    assert set(tail.split("\n", 1)[1]) == {"€"}


def test_chunks_split_inside_characters_are_reassembled() -> None:
    out = CappedOutput(limit=1 << 20)
    data = "héllo wörld ✓".encode()
    for b in data:
        out.append(bytes([b]))
    assert out.render().text == "héllo wörld ✓"
