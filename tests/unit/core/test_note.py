"""Signed notes (reconciler.core.note): c2sp.org/signed-note's format both ways."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.core.note import Note, Signature, add_signature, openpgp_key_id, parse_note
from reconciler.core.tlog import Checkpoint, LogFormatError

FPR = "0123456789ABCDEF0123456789ABCDEF01234567"
TEXT = Checkpoint("example.com/log", 3, bytes(32)).text()


def test_the_spec_s_example_parses() -> None:
    note = (
        "Ognuno sta solo sul cuor della terra\ntrafitto da un raggio di sole:\n\ned è subito sera.\n\n"
        "— quasimodo.example/salvatore NnugSzTjtVAewIS+Z/iJhUPeFDkO/5QQ2i5ddnGITLlC+"
        "EhfLW9oJKONrMouFSQU0xMcXxj99ihAQwaqP3ZekRwNtIc=\n"
    ).encode()
    parsed = parse_note(note)
    assert parsed.text.endswith(b"sera.\n")
    assert b"\n\n" in parsed.text  # the text may hold a blank line; the last one separates
    (sig,) = parsed.signatures
    assert sig.name == "quasimodo.example/salvatore"
    assert sig.key_id == bytes.fromhex("367ba04b")
    assert parsed.to_bytes() == note


@given(st.binary(min_size=1, max_size=200), st.sampled_from(["example.com/log", "witness/abc"]))
def test_a_signed_note_reads_back(sig: bytes, name: str) -> None:
    note = Note(TEXT, (Signature(name, openpgp_key_id(name, FPR), sig),))
    assert parse_note(note.to_bytes()) == note


def test_the_openpgp_key_id_binds_name_and_key() -> None:
    expected = hashlib.sha256(b"example.com/log\n\xffopenpgp" + bytes.fromhex(FPR)).digest()[:4]
    assert openpgp_key_id("example.com/log", FPR) == expected
    assert openpgp_key_id("example.com/log", FPR.lower()) == expected
    assert openpgp_key_id("other", FPR) != expected
    assert openpgp_key_id("example.com/log", "F" + FPR[1:]) != expected
    for bad_name, fpr in (("a b", FPR), ("a+b", FPR), ("", FPR), ("ok", "1234")):
        with pytest.raises(ValueError):
            openpgp_key_id(bad_name, fpr)


def test_a_cosignature_is_added_and_replaces_its_own_older_one() -> None:
    a = Signature("example.com/log", b"aaaa", b"sig-a")
    w = Signature("witness", b"wwww", b"sig-w1")
    note = add_signature(Note(TEXT, (a,)), w)
    assert note.signatures == (a, w)
    again = add_signature(note, Signature("witness", b"wwww", b"sig-w2"))
    assert [s.signature for s in again.signatures] == [b"sig-a", b"sig-w2"]
    assert again.signed_by("witness", b"wwww") == [again.signatures[1]]


@pytest.mark.parametrize(
    "bad",
    [
        TEXT,  # no signatures
        TEXT + b"\n",
        TEXT + b"\n- example.com/log AAAAAAA=\n",  # a hyphen, not an em dash
        TEXT + "\n— example.com/log AAAA\n".encode(),  # shorter than a key ID and a byte
        TEXT + "\n— example.com/log not-base64!\n".encode(),
        TEXT + "\n— example.com/log AAAAAAA=".encode(),  # no final newline
        TEXT + "\n— two words AAAAAAA= extra\n".encode(),
        TEXT.replace(b"3", b"\x013") + "\n— example.com/log AAAAAAA=\n".encode(),
        b"\xff\n\n" + "— example.com/log AAAAAAA=\n".encode(),
        TEXT + b"\n" + "— example.com/log AAAAAAA=\n".encode() * 17,
    ],
)
def test_malformed_notes_are_refused(bad: bytes) -> None:
    with pytest.raises(LogFormatError):
        parse_note(bad)
