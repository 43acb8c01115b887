"""Detached OpenPGP signatures, checked before gpg ever reads them.

gpg parses whatever packets it is handed as a "signature": a compressed-data packet
a few KB long makes it inflate gigabytes, and a literal-data packet makes it hash
whatever that holds. A detached signature is nothing but signature packets
(RFC 4880 §11.4), so anything else is refused here, from the armored text alone:
no I/O and no gpg.
"""

from __future__ import annotations

import base64
import binascii
import re
from enum import IntEnum

from reconciler.errors import VerificationError

# Real detached signatures are under 2 KiB armored (an RSA-4096 signature with the
# usual subpackets is about 900 bytes); this leaves room for several signers and
# keeps what gpg is ever given small.
ARMORED_LIMIT = 16 * 1024

BEGIN = "-----BEGIN PGP SIGNATURE-----"
END = "-----END PGP SIGNATURE-----"
# Armor headers (RFC 4880 §6.2) are "Key: Value" lines before the blank line.
ARMOR_HEADER = re.compile(r"[A-Za-z][A-Za-z0-9-]*: .*")
CRC24_INIT = 0xB704CE
CRC24_POLY = 0x1864CFB


class Tag(IntEnum):
    """Packet tags (RFC 4880 §4.3); only signatures may appear in a detached signature."""

    SIGNATURE = 2


def detached_signature(armored: bytes, what: str) -> bytes:
    """The binary packets of the ASCII-armored detached signature ``armored``.

    Refused with a VerificationError naming ``what`` unless it is at most
    ARMORED_LIMIT bytes, one armor block with a matching checksum, and nothing but
    complete signature packets.
    """
    if len(armored) > ARMORED_LIMIT:
        raise VerificationError(f"{what}: signature larger than {ARMORED_LIMIT} bytes")
    packets = dearmor(armored, what)
    check_packets(packets, what)
    return packets


def dearmor(armored: bytes, what: str) -> bytes:
    """The bytes inside one ``PGP SIGNATURE`` armor block, decoded strictly: text
    gpg might read differently (junk around the block, characters outside base64,
    data after padding) is refused rather than guessed at."""
    try:
        text = armored.decode("ascii")
    except UnicodeDecodeError:
        raise VerificationError(f"{what}: signature is not ASCII-armored") from None
    lines = [ln.rstrip(" \t\r") for ln in text.strip().split("\n")]
    inner = lines[1:-1]
    if len(lines) < 3 or lines[0] != BEGIN or lines[-1] != END or any(ln.startswith("-----") for ln in inner):
        raise VerificationError(f"{what}: signature is not one armored PGP SIGNATURE block")
    try:
        blank = lines.index("")
    except ValueError:
        raise VerificationError(f"{what}: signature armor has no blank line before its data") from None
    if not all(ARMOR_HEADER.fullmatch(h) for h in lines[1:blank]):
        raise VerificationError(f"{what}: signature armor has a malformed header line")
    body = lines[blank + 1 : -1]
    checksum = body.pop()[1:] if body and body[-1].startswith("=") else None
    try:
        data = binascii.a2b_base64("".join(body), strict_mode=True)
        crc = base64.b64decode(checksum, validate=True) if checksum is not None else None
    except binascii.Error:
        raise VerificationError(f"{what}: signature armor is not valid base64") from None
    if crc is not None and (len(crc) != 3 or int.from_bytes(crc, "big") != crc24(data)):
        raise VerificationError(f"{what}: signature armor checksum does not match")
    return data


def armor(packets: bytes) -> bytes:
    """Binary signature packets as one ``PGP SIGNATURE`` armor block (RFC 4880 §6.2),
    the form gpg and :func:`detached_signature` read."""
    body = base64.b64encode(packets).decode()
    lines = [BEGIN, "", *(body[i : i + 64] for i in range(0, len(body), 64))]
    lines += ["=" + base64.b64encode(crc24(packets).to_bytes(3, "big")).decode(), END]
    return ("\n".join(lines) + "\n").encode()


def check_packets(data: bytes, what: str) -> None:
    """Walk the packet headers (RFC 4880 §4.2) of ``data``: only complete signature
    packets with definite lengths, at least one."""
    if not data:
        raise VerificationError(f"{what}: signature holds no packets")
    pos = 0
    while pos < len(data):
        tag, pos = _packet(data, pos, what)
        if tag != Tag.SIGNATURE:
            raise VerificationError(f"{what}: signature holds a packet of type {tag}, not a signature")
        if pos > len(data):
            raise VerificationError(f"{what}: signature is truncated ({len(data)} of {pos} bytes)")


def _packet(data: bytes, pos: int, what: str) -> tuple[int, int]:
    """The tag and the end offset of the packet starting at ``pos``."""
    ctb = data[pos]
    if not ctb & 0x80:
        raise VerificationError(f"{what}: signature holds something that is not an OpenPGP packet")
    header = data[pos + 1 : pos + 6]
    if ctb & 0x40:  # new format: 6-bit tag, 1-, 2- or 5-octet length
        tag = ctb & 0x3F
        if not header:
            raise VerificationError(f"{what}: signature is truncated in a packet header")
        first = header[0]
        if first < 192:
            size, used = first, 1
        elif first < 224:
            size, used = ((first - 192) << 8) + _octets(header, 1, 1, what) + 192, 2
        elif first == 255:
            size, used = _octets(header, 1, 4, what), 5
        else:
            # Partial body lengths are for streamed data packets, never signatures.
            raise VerificationError(f"{what}: signature holds a packet of partial length")
    else:  # old format: 4-bit tag, length type in the low 2 bits
        tag = (ctb >> 2) & 0x0F
        kind = ctb & 0x03
        if kind == 3:
            raise VerificationError(f"{what}: signature holds a packet of indeterminate length")
        used = (1, 2, 4)[kind]
        size = _octets(header, 0, used, what)
    return tag, pos + 1 + used + size


def _octets(header: bytes, start: int, count: int, what: str) -> int:
    """A big-endian length of ``count`` octets from ``header[start:]``."""
    octets = header[start : start + count]
    if len(octets) != count:
        raise VerificationError(f"{what}: signature is truncated in a packet header")
    return int.from_bytes(octets, "big")


def crc24(data: bytes) -> int:
    """The armor checksum (RFC 4880 §6.1)."""
    crc = CRC24_INIT
    for octet in data:
        crc ^= octet << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= CRC24_POLY
    return crc & 0xFFFFFF
