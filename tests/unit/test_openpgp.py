"""Unit and property tests for reconciler.openpgp: only signature packets reach gpg."""

from __future__ import annotations

import base64
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconciler.core.openpgp import ARMORED_LIMIT, crc24, detached_signature
from reconciler.errors import VerificationError

PROPERTY = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Made by gpg 2.2 (`gpg --armor --detach-sign`): RSA-2048, Ed25519, and one file
# signed by both keys (two signature packets).
RSA = b"""\
-----BEGIN PGP SIGNATURE-----

iQEzBAABCgAdFiEEiI/7Zmqke+vay9OBiUXvvt/QC5gFAmsILzsACgkQiUXvvt/Q
C5i5JggAs2lArSxNZEKL0PbBoaGiOPOp1oC4rJMzGkHHmpz3GfoghPs01B7QIrz1
po6MHJKE66/sxb4Qoe3irSUgQSkJpUjhmEzUDB2NoGISYe1Fbi/zbZuG0IMzpcca
Rmses9I32lpgKNZ9a1qbrnOBL9vNqOouVfayka+MCOBYyLHIsOKfFYB8fBS4NHGp
uJfE+pC85tKuqYGu6nqwPHGxYEF/yzMCYqF84cJVvFPiii2LuF6L9Fh7aSK1kpCV
jqxnJEAOIInyvnPYTWlrPN/gp3/bHU/n7dsN8HoI8kd+NlOC0PoItA/ckzNeuQ2U
WEuCkEvQAr8luRzs8ESdyuObNZ7fMg==
=iCc4
-----END PGP SIGNATURE-----
"""
ED25519 = b"""\
-----BEGIN PGP SIGNATURE-----

iHUEABYIAB0WIQSrUMc5etLhyXzUQFdp7618Cuf4OQUCawgwAAAKCRBp7618Cuf4
OaYDAQCIU354ZBAFKH1fiIHLHdeR0l+wU08Vo/47ZfSUJN8u/QD/YIVOUIbTEPF7
cfZYnGKnNXnG2Eig9RvN93YAsr8LFgE=
=n313
-----END PGP SIGNATURE-----
"""
TWO_SIGNERS = b"""\
-----BEGIN PGP SIGNATURE-----

iQEzBAABCgAdFiEEiI/7Zmqke+vay9OBiUXvvt/QC5gFAmsIMAAACgkQiUXvvt/Q
C5h3Tgf/clS0OKbtq6HR87fiaUvKzOQvY5a8FCJXqY2u5dE25sqci4qMtFTxt/S1
hoCjkrpGOWmOkl+kXRgOP28N8x2ngGa4pYLL8t1Y6AuTFMiTdbAEA2EbZjBBdEYu
siTeJyfqFdju8vp999CKReiFK5IwyBS1MIG7Rl3mI+f5efKtqET4h9JM3xaZj4v+
3YjmDR2d/PYBvF6X92uFXzIcjurH+UDVFGR85wLX2BihCofwjttMfyEcPbPT5hsj
SE89oBYRSC+lB0uXRhTji3fQA1M4DLZbjbOHpjFu+J6i0QUJg83vkBHfSSkP7729
MXQq/24AMkt4WwzSbXnv8hsMO/iVIYh1BAAWCAAdFiEEq1DHOXrS4cl81EBXae+t
fArn+DkFAmsIMAAACgkQae+tfArn+DmmAwEAiFN+eGQQBSh9X4iByx3XkdJfsFNP
FaP+O2X0lCTfLv0A/2CFTlCG0xDxe3H2WJxipzV5xthIoPUbzfd2ALK/CxYB
=d2o8
-----END PGP SIGNATURE-----"""
REAL = {"rsa": RSA, "ed25519": ED25519, "two signers": TWO_SIGNERS}

SIGNATURE, COMPRESSED, LITERAL, MARKER = 2, 8, 11, 10
# How a packet's length is written (RFC 4880 §4.2): old format with 1, 2 or 4
# octets, new format with 1, 2 or 5.
FORMATS = ("old1", "old2", "old4", "new1", "new2", "new5")


def fits(fmt: str, size: int, tag: int) -> bool:
    if fmt.startswith("old") and tag >= 16:
        return False
    limit = {"old1": 256, "old2": 1 << 16, "old4": 1 << 32, "new1": 192, "new2": 8384, "new5": 1 << 32}
    return size < limit[fmt] and not (fmt == "new2" and size < 192)


def packet(tag: int, body: bytes, fmt: str) -> bytes:
    n = len(body)
    assert fits(fmt, n, tag)
    if fmt.startswith("old"):
        kind = {"old1": 0, "old2": 1, "old4": 2}[fmt]
        return bytes([0x80 | tag << 2 | kind]) + n.to_bytes((1, 2, 4)[kind], "big") + body
    if fmt == "new1":
        return bytes([0xC0 | tag, n]) + body
    if fmt == "new2":
        return bytes([0xC0 | tag, ((n - 192) >> 8) + 192, (n - 192) & 0xFF]) + body
    return bytes([0xC0 | tag, 255]) + n.to_bytes(4, "big") + body


def armor(data: bytes, headers: tuple[str, ...] = ()) -> bytes:
    b64 = base64.b64encode(data).decode()
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    crc = base64.b64encode(crc24(data).to_bytes(3, "big")).decode()
    text = [
        "-----BEGIN PGP SIGNATURE-----",
        *headers,
        "",
        *lines,
        "=" + crc,
        "-----END PGP SIGNATURE-----",
    ]
    return ("\n".join(text) + "\n").encode()


def refused(armored: bytes, why: str = "") -> str:
    with pytest.raises(VerificationError) as err:
        detached_signature(armored, "sig.asc")
    assert str(err.value).startswith("sig.asc: "), err.value
    assert why in str(err.value), err.value
    return str(err.value)


def body_of(armored: bytes) -> bytes:
    lines = armored.decode().strip().splitlines()
    return base64.b64decode("".join(ln for ln in lines[2:-1] if not ln.startswith("=")))


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_gpg_signatures_are_accepted_and_returned_as_their_packets(name: str) -> None:
    armored = REAL[name]
    assert detached_signature(armored, "sig.asc") == body_of(armored)
    # As git stores them in a commit's gpgsig header, and as a mail client may mangle them.
    assert detached_signature(armored.replace(b"\n", b"\r\n"), "sig.asc") == body_of(armored)
    assert detached_signature(armor(body_of(armored), ("Comment: made by gpg",)), "x") == body_of(armored)


def test_compressed_and_literal_packets_are_refused() -> None:
    real = body_of(RSA)
    # 8 KB of compressed zeros that gpg would inflate to 8 MiB (nested, to gigabytes).
    bomb = zlib.compress(b"\0" * (8 << 20), 9)
    compressed = packet(COMPRESSED, b"\x02" + bomb, "new5")
    literal = packet(LITERAL, b"b\x00\x00\x00\x00\x00hello", "old1")
    for data in (compressed, literal, real + compressed, literal + real, packet(MARKER, b"PGP", "old1")):
        refused(armor(data), "not a signature")
    # Lengths only data packets may have: indeterminate (old format), partial (new format).
    refused(armor(bytes([0x80 | SIGNATURE << 2 | 3]) + real[3:]), "indeterminate length")
    refused(armor(bytes([0xC0 | SIGNATURE, 0xE0 | 9]) + real[3:]), "partial length")


def test_signatures_beyond_the_size_limit_are_refused_unread() -> None:
    padding = tuple(f"Comment: {'x' * 60}" for _ in range(ARMORED_LIMIT // 60))
    refused(armor(body_of(RSA), padding), f"larger than {ARMORED_LIMIT} bytes")


def test_a_signature_of_exactly_the_size_limit_is_read() -> None:
    plain = armor(body_of(RSA), ("Comment: x",))
    exact = plain.replace(b"Comment: x", b"Comment: " + b"x" * (1 + ARMORED_LIMIT - len(plain)))
    assert len(exact) == ARMORED_LIMIT
    assert detached_signature(exact, "sig.asc") == body_of(RSA)
    refused(exact.replace(b"Comment: ", b"Comment:  "), f"larger than {ARMORED_LIMIT} bytes")


# Each length encoding at the edges of its range (RFC 4880 §4.2): new format one
# octet up to 191, two octets 192 to 8383, five octets; old format 1, 2 or 4 octets.
EDGES = [
    ("new1", 0),
    ("new1", 191),
    ("new2", 192),
    ("new2", 193),
    ("new2", 447),
    ("new2", 448),
    ("new2", 8383),
    ("new5", 0),
    ("new5", 8384),
    ("old1", 0),
    ("old1", 255),
    ("old2", 256),
    ("old2", 8000),
    ("old4", 300),
]


@pytest.mark.parametrize(("fmt", "size"), EDGES)
def test_every_length_encoding_is_read_to_the_exact_end_of_its_packet(fmt: str, size: int) -> None:
    # A second packet right after the first: a length read wrong by even one octet
    # puts the walk inside a packet, or past the end.
    first = packet(SIGNATURE, bytes(range(256)) * (size // 256) + bytes(size % 256), fmt)
    data = first + packet(SIGNATURE, b"\x04sig", "old1")
    assert detached_signature(armor(data), "sig.asc") == data
    refused(armor(data[:-1]), "truncated")
    refused(armor(first + packet(COMPRESSED, b"\x00", "old1")), "packet of type 8, not a signature")


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (bytes([0x08, 1, 0]), "not an OpenPGP packet"),  # bit 7 clear: would read as old-format tag 2
        (bytes([0x01, 1, 0]), "not an OpenPGP packet"),
        (bytes([0xC2]), "truncated in a packet header"),
        (bytes([0xC2, 0xC0]), "truncated in a packet header"),
        (bytes([0xC2, 0xFF, 0, 0, 1]), "truncated in a packet header"),
        (bytes([0xC2, 0xE0]), "partial length"),
        (bytes([0xC2, 0xFE]), "partial length"),
        (bytes([0x89, 0]), "truncated in a packet header"),
    ],
)
def test_packet_headers_are_read_strictly(data: bytes, why: str) -> None:
    refused(armor(data), why)


def test_the_armor_checksum_is_optional_but_must_be_base64_when_present() -> None:
    data = body_of(RSA)
    without = b"\n".join(ln for ln in armor(data).split(b"\n") if not ln.startswith(b"="))
    assert detached_signature(without, "sig.asc") == data
    crc = armor(data).split(b"\n")[-3]
    refused(armor(data).replace(crc, crc[:2] + b"!" + crc[2:]), "not valid base64")


@pytest.mark.parametrize(
    ("mangle", "why"),
    [
        (lambda a: b"junk before\n" + a, "not one armored PGP SIGNATURE block"),
        (lambda a: a + a, "not one armored PGP SIGNATURE block"),
        (lambda a: a.replace(b"SIGNATURE", b"MESSAGE"), "not one armored PGP SIGNATURE block"),
        (lambda a: a.replace(b"BEGIN PGP SIGNATURE", b"BEGIN PGP MESSAGE"), "not one armored"),
        (lambda a: a.replace(b"END PGP SIGNATURE", b"END PGP MESSAGE"), "not one armored"),
        (lambda a: a.replace(b"-----\n\n", b"-----\n-----BEGIN PGP SIGNATURE-----\n\n"), "not one armored"),
        (lambda a: a.replace(b"\n-----END", b"\n-----END PGP SIGNATURE-----\n-----END"), "not one armored"),
        (lambda a: b"-----BEGIN PGP SIGNATURE-----\n\n-----END PGP SIGNATURE-----\n", "holds no packets"),
        (lambda a: a.replace(b"=\n", b"=\x0c\n", 1), "not valid base64"),
        (lambda a: a.replace(b"-----\n\n", b"-----\n"), "no blank line"),
        (lambda a: a.replace(b"-----\n\n", b"-----\nnot a header\n\n"), "malformed header line"),
        (lambda a: a.replace(b"=iCc4", b"=iCc5"), "checksum does not match"),
        (lambda a: a.replace(b"iQEz", b"iQ!z"), "not valid base64"),
        (lambda a: a.replace(b"Mg==", b"Mg==AAAA"), "not valid base64"),
        (lambda a: "é".encode() + a, "not ASCII-armored"),
        (lambda a: armor(b""), "holds no packets"),
    ],
)
def test_armor_is_read_strictly(mangle: object, why: str) -> None:
    assert callable(mangle)
    refused(mangle(RSA), why)


packets = st.lists(
    st.tuples(st.binary(max_size=600), st.sampled_from(FORMATS)).filter(lambda p: fits(p[1], len(p[0]), 2)),
    min_size=1,
    max_size=5,
)


@PROPERTY
@given(packets)
def test_signature_packets_in_any_length_encoding_are_accepted(sigs: list[tuple[bytes, str]]) -> None:
    data = b"".join(packet(SIGNATURE, body, fmt) for body, fmt in sigs)
    assert detached_signature(armor(data), "sig.asc") == data


@PROPERTY
@given(packets, st.integers(min_value=0, max_value=63), st.sampled_from(FORMATS), st.data())
def test_any_other_packet_anywhere_is_refused(
    sigs: list[tuple[bytes, str]], tag: int, fmt: str, data: st.DataObject
) -> None:
    if tag == SIGNATURE or not fits(fmt, 20, tag):
        tag, fmt = COMPRESSED, "new1"
    stream = [packet(SIGNATURE, body, f) for body, f in sigs]
    where = data.draw(st.integers(min_value=0, max_value=len(stream)))
    stream.insert(where, packet(tag, bytes(20), fmt))
    why = refused(armor(b"".join(stream)))
    assert "not a signature" in why or "not an OpenPGP packet" in why


@PROPERTY
@given(packets, st.data())
def test_truncated_signatures_are_refused(sigs: list[tuple[bytes, str]], data: st.DataObject) -> None:
    encoded = [packet(SIGNATURE, body, fmt) for body, fmt in sigs]
    whole = b"".join(encoded)
    ends = {sum(len(p) for p in encoded[: i + 1]) for i in range(len(encoded))}
    cut = data.draw(st.integers(min_value=1, max_value=len(whole) - 1).filter(lambda n: n not in ends))
    refused(armor(whole[:cut]), "truncated")


def split_packets(data: bytes) -> list[tuple[int, bytes]]:
    """(tag, body) of each packet in ``data``, read independently of the code under
    test (RFC 4880 §4.2, definite lengths only); AssertionError if it does not split."""
    out = []
    pos = 0
    while pos < len(data):
        ctb = data[pos]
        assert ctb & 0x80, f"no packet at {pos}"
        if ctb & 0x40:
            tag, first = ctb & 0x3F, data[pos + 1]
            if first < 192:
                size, start = first, pos + 2
            elif first < 224:
                size, start = ((first - 192) << 8) + data[pos + 2] + 192, pos + 3
            else:
                assert first == 255, "partial length"
                size, start = int.from_bytes(data[pos + 2 : pos + 6], "big"), pos + 6
        else:
            tag, kind = ctb >> 2 & 0x0F, ctb & 0x03
            assert kind != 3, "indeterminate length"
            width = (1, 2, 4)[kind]
            size, start = int.from_bytes(data[pos + 1 : pos + 1 + width], "big"), pos + 1 + width
        assert start + size <= len(data), "truncated"
        out.append((tag, data[start : start + size]))
        pos = start + size
    return out


def check_accepted(armored: bytes, packets_: bytes) -> None:
    """What every accepted signature satisfies: small enough, one or more complete
    signature packets and nothing else, and the same packets once armored anew."""
    assert len(armored) <= ARMORED_LIMIT
    split = split_packets(packets_)
    assert split and all(tag == SIGNATURE for tag, _ in split)
    assert detached_signature(armor(packets_), "again.asc") == packets_


@PROPERTY
@given(st.binary(max_size=2000))
def test_any_packet_data_is_accepted_only_as_signatures_or_refused_cleanly(data: bytes) -> None:
    try:
        packets_ = detached_signature(armor(data), "sig.asc")
    except VerificationError:
        return
    assert packets_ == data
    check_accepted(armor(data), packets_)


@PROPERTY
@given(st.one_of(st.binary(max_size=4000), st.binary(max_size=1500).map(armor)))
def test_arbitrary_input_raises_nothing_but_verification_error(raw: bytes) -> None:
    try:
        packets_ = detached_signature(raw, "sig.asc")
    except VerificationError:
        return
    check_accepted(raw, packets_)


@PROPERTY
@given(st.sampled_from(sorted(REAL)), st.data())
def test_mangled_real_signatures_raise_nothing_but_verification_error(name: str, data: st.DataObject) -> None:
    armored = bytearray(REAL[name])
    at = data.draw(st.integers(min_value=0, max_value=len(armored) - 1))
    armored[at] = data.draw(st.integers(min_value=0, max_value=255))
    try:
        packets_ = detached_signature(bytes(armored), "sig.asc")
    except VerificationError:
        return
    # Accepted only where the change does not reach the data (line endings, unused
    # bits of the last base64 digit): the checksum stops every other change.
    assert packets_ == body_of(REAL[name])
    check_accepted(bytes(armored), packets_)
