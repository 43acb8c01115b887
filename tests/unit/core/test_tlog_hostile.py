"""What a hostile store or mirror may serve the agent's log check: any bytes as a
checkpoint, an inclusion file, a bundle or a tile. Each is refused with LogFormatError
(which the agent turns into a refusal) or checks out; nothing else may escape, or the
agent's update would crash instead of refusing the release."""

from __future__ import annotations

import base64
import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.core import tlog
from reconciler.core.note import MAX_NOTE, parse_note
from reconciler.core.tlog import (
    MAX_PROOF,
    MAX_SIZE,
    TILE_WIDTH,
    Bundle,
    LogFormatError,
    consistent,
    parse_checkpoint,
    parse_inclusion,
)

HASH = base64.b64encode(bytes(32)).decode()
# Values a hostile JSON document may put where a number or a list goes.
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
HUGE = st.sampled_from([-1, -(2**63), 2**63, 2**64 + 1, MAX_SIZE + 1, 10**30])


def inclusion(**doc: object) -> bytes:
    base: dict[str, object] = {
        "schema": tlog.INCLUSION_SCHEMA,
        "origin": "o",
        "index": 0,
        "size": 1,
        "proof": [],
    }
    return json.dumps({**base, **doc}).encode()


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(["index", "size", "proof", "origin", "schema"]), ANY_JSON | HUGE)
def test_an_inclusion_file_with_any_field_refused_or_in_range(field: str, value: object) -> None:
    try:
        inc = parse_inclusion(inclusion(**{field: value}), "i")
    except LogFormatError:
        return
    assert 0 <= inc.index < inc.size <= MAX_SIZE and len(inc.proof) <= MAX_PROOF


def test_sizes_indexes_and_proofs_out_of_range_are_refused() -> None:
    for doc in (
        {"index": -1},
        {"index": 1, "size": 1},
        {"size": 2**63, "index": 2**63 - 1},
        {"size": MAX_SIZE + 1},
        {"index": True},
        {"size": 1.0},
        {"proof": [HASH] * (MAX_PROOF + 1), "size": MAX_SIZE, "index": 5},
        {"proof": [HASH[:-4]]},
        {"proof": "AAAA"},
    ):
        try:
            parse_inclusion(inclusion(**doc), "i")
        except LogFormatError:
            continue
        raise AssertionError(f"accepted {doc}")
    # A number JSON cannot turn into an int in time (Python's digit limit) is refused too.
    with pytest.raises(LogFormatError):
        parse_inclusion(b'{"schema": "x", "size": ' + b"9" * 5000 + b"}", "i")
    for size in (b"-1", b"18446744073709551616", b"1" * 30, b"01", b" 1", b"1e3"):
        try:
            parse_checkpoint(b"o\n" + size + b"\n" + HASH.encode() + b"\n")
        except LogFormatError:
            continue
        raise AssertionError(f"accepted size {size!r}")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400) | st.text(max_size=400).map(str.encode))
def test_any_bytes_as_a_note_a_checkpoint_or_an_inclusion_file(data: bytes) -> None:
    for parse in (parse_note, parse_checkpoint, lambda d: parse_inclusion(d, "i")):
        with contextlib.suppress(LogFormatError):
            parse(data)


def test_base64_with_a_character_outside_ascii_is_a_format_error() -> None:
    # base64.b64decode raises a plain ValueError (not binascii.Error) for a str with a
    # character outside ASCII: it escaped the parsers, and the agent's log check, which
    # refuses on LogFormatError, crashed instead.
    with pytest.raises(LogFormatError):
        parse_checkpoint("o\n1\n\u00e9AAA\n".encode())
    with pytest.raises(LogFormatError):
        parse_note("o\n1\nx\n\n\u2014 a \u00e9AAAAAAA\n".encode())
    with pytest.raises(LogFormatError):
        parse_inclusion(inclusion(proof=["\u00e9" * 44]), "i")


def test_a_note_over_the_limit_is_refused_before_it_is_read() -> None:
    try:
        parse_note(b"o\n1\n" + b"x" * MAX_NOTE + b"\n\n")
    except LogFormatError as exc:
        assert "larger than" in str(exc)
    else:
        raise AssertionError("a note over MAX_NOTE was parsed")


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 3 * TILE_WIDTH),
    st.integers(0, 3 * TILE_WIDTH),
    st.dictionaries(st.text(max_size=30), st.binary(max_size=2 * TILE_WIDTH * 32) | st.none()),
    st.binary(min_size=32, max_size=32),
    st.data(),
)
def test_any_tiles_prove_consistency_or_are_refused(
    new: int, old: int, served: dict[str, bytes | None], root: bytes, data: st.DataObject
) -> None:
    # Tiles as a mirror serves them: any bytes (or none) at any path, and for the paths
    # the proof reads, bytes of any length.
    filler = data.draw(st.binary(max_size=TILE_WIDTH * 32 + 64))

    def read(path: str) -> bytes | None:
        return served.get(path, filler or None)

    with contextlib.suppress(LogFormatError):
        assert isinstance(consistent(read, (old, root), (new, root)), bool)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, TILE_WIDTH), st.binary(max_size=4 * 1024))
def test_any_bytes_as_a_bundle(width: int, raw: bytes) -> None:
    try:
        entries = tlog.decode_bundle(Bundle(0, width), raw)
    except LogFormatError:
        return
    assert len(entries) == width
