"""Signed notes (c2sp.org/signed-note): a text, a blank line, one signature line per
signer (``— <key name> <base64(key ID || signature)>``). Pure.

The log's checkpoints are signed notes, signed with OpenPGP keys (the publisher's,
and a witness's that co-signs): a signature is the binary OpenPGP detached signature
of the note text (what ``gpg --detach-sign`` makes of it; ``gpg --verify`` accepts it
once armored). Signed notes have no identifier byte for OpenPGP, so the key ID is
computed as the spec recommends for types without one (0xff, then a longer
identifier): ``SHA-256(key name || 0x0A || 0xff || "openpgp" || fingerprint)[:4]``,
the fingerprint as its 20 (v4) or 32 (v5) bytes.
"""

from __future__ import annotations

import base64
import hashlib
import re
from dataclasses import dataclass

from reconciler.core.tlog import LogFormatError

DASH = "\u2014"
OPENPGP_TYPE = b"\xffopenpgp"
# Verifiers must accept 16 signatures (the spec); a note is a few lines of text.
MAX_SIGNATURES = 16
MAX_NOTE = 64 * 1024
_NAME = re.compile(r"^[^\s+]+$")
_FINGERPRINT = re.compile(r"^[0-9A-F]{40}([0-9A-F]{24})?$")


@dataclass(frozen=True)
class Signature:
    name: str
    key_id: bytes  # 4 bytes
    signature: bytes

    def line(self) -> str:
        return f"{DASH} {self.name} {base64.b64encode(self.key_id + self.signature).decode()}\n"


@dataclass(frozen=True)
class Note:
    text: bytes
    signatures: tuple[Signature, ...]

    def to_bytes(self) -> bytes:
        return self.text + b"\n" + "".join(s.line() for s in self.signatures).encode()

    def signed_by(self, name: str, key_id: bytes) -> list[Signature]:
        return [s for s in self.signatures if s.name == name and s.key_id == key_id]


def openpgp_key_id(name: str, fingerprint: str) -> bytes:
    """The note key ID of the OpenPGP key ``fingerprint`` signing as ``name``."""
    fpr = fingerprint.replace(" ", "").upper()
    if not _FINGERPRINT.fullmatch(fpr):
        raise ValueError(f"{fingerprint!r} is not an OpenPGP fingerprint")
    if not _NAME.fullmatch(name):
        raise ValueError(f"{name!r} is not a note key name (non-empty, no spaces or '+')")
    return hashlib.sha256(name.encode() + b"\n" + OPENPGP_TYPE + bytes.fromhex(fpr)).digest()[:4]


def check_text(text: bytes) -> None:
    """A note text: UTF-8, ending in a newline, no control characters but newlines."""
    try:
        s = text.decode("utf-8")
    except UnicodeDecodeError:
        raise LogFormatError("a note is not UTF-8") from None
    if not s.endswith("\n") or any(c < " " and c != "\n" for c in s):
        raise LogFormatError("a note text ends in a newline and holds no control characters")


def parse_note(data: bytes, what: str = "note") -> Note:
    """A signed note from its bytes; LogFormatError naming ``what`` if malformed."""
    if len(data) > MAX_NOTE:
        raise LogFormatError(f"{what}: larger than {MAX_NOTE} bytes")
    try:
        check_text(data)
    except LogFormatError as exc:
        raise LogFormatError(f"{what}: {exc}") from None
    at = data.rfind(b"\n\n")
    if at < 0:
        raise LogFormatError(f"{what}: no blank line before the signatures")
    text, block = data[: at + 1], data[at + 2 :].decode("utf-8")
    signatures = []
    for line in block.split("\n")[:-1]:
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != DASH or not _NAME.fullmatch(parts[1]):
            raise LogFormatError(f"{what}: malformed signature line {line[:80]!r}")
        try:
            raw = base64.b64decode(parts[2], validate=True)
        # binascii.Error, or a plain ValueError for a character outside ASCII.
        except ValueError:
            raise LogFormatError(f"{what}: a signature of {parts[1]} is not base64") from None
        if len(raw) < 5:
            raise LogFormatError(f"{what}: a signature of {parts[1]} is too short")
        signatures.append(Signature(parts[1], raw[:4], raw[4:]))
    if not signatures:
        raise LogFormatError(f"{what}: not signed")
    if len(signatures) > MAX_SIGNATURES:
        raise LogFormatError(f"{what}: more than {MAX_SIGNATURES} signatures")
    return Note(text, tuple(signatures))


def add_signature(note: Note, signature: Signature) -> Note:
    """``note`` with ``signature``, replacing one of the same key name and ID."""
    kept = [s for s in note.signatures if (s.name, s.key_id) != (signature.name, signature.key_id)]
    return Note(note.text, (*kept, signature))
