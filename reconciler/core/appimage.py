"""AppImage type 2 metadata kept in the runtime's reserved ELF sections. Pure.

The runtime (nix/runtime/runtime.c) reserves, zero-filled, as the official one does:

    .digest_md5   16 bytes    libappimage's MD5 digest of the file
    .sha256_sig   1024 bytes  an armored detached gpg signature (AppImage spec)
    .sig_key      8192 bytes  the armored public key that made it (appimagetool's)
    .upd_info     1024 bytes  update information, ``zsync|<URL of a .zsync file>``

Nix builds the AppImage with all four empty: the signing key never enters a build.
The publisher fills them after the build (reconciler.adapters.appimage), in this
order: update information and key, then the digest, then the signature.

The signature is what the AppImage tools check (appimagetool's signing,
AppImageUpdate's and AppImageKit's validate): the signed text is the lowercase hex
SHA-256 of the file with ``.sha256_sig`` and ``.sig_key`` read as zeros. The spec's
prose names ``.sha256_sig`` and ``.upd_info`` instead, written before ``.sig_key``
existed; no tool computes it that way, so we follow the tools.

``.digest_md5`` holds what libappimage's ``appimage_type2_digest_md5`` computes.
That function hashes the file in 4 KiB chunks through one buffer and skips the three
sections by not reading them, so a skipped range hashes whatever the buffer held from
an earlier chunk, a section starting in the chunk of another one is skipped from the
wrong place, and the last chunk is hashed whole, tail included. :func:`libappimage_md5`
does the same, step by step, so that the digest libappimage computes over the
published file equals the one embedded (tests/integration/test_appimage_sections.py
checks it against libappimage itself). The digest covers the key (written first) and
must not depend on the signature (written last): sealing checks that it does not.

Reproducibility: what differs between two publications of the same build is only
these sections, so the bytes with all four zeroed (:func:`unsealed`) equal the Nix
output, and that is what ``nix-build --check`` and the tests compare.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from dataclasses import dataclass
from enum import StrEnum

from reconciler.errors import VerificationError

MAGIC = b"AI\x02"  # at offset 8, in the ELF header's padding
UPDATE_SCHEME = "zsync"
CHUNK = 4096  # libappimage's chunk


class SectionName(StrEnum):
    DIGEST = ".digest_md5"
    SIGNATURE = ".sha256_sig"
    KEY = ".sig_key"
    UPDATE = ".upd_info"


# What libappimage's digest skips, in the order it looks for them in each chunk.
DIGEST_SKIPS = (SectionName.DIGEST, SectionName.SIGNATURE, SectionName.KEY)
# What the signature's SHA-256 reads as zeros (AppImageUpdate, validate).
SIGNATURE_SKIPS = (SectionName.SIGNATURE, SectionName.KEY)

# Buffer-like: bytes, bytearray, memoryview (of an mmap too).
Data = bytes | bytearray | memoryview


@dataclass(frozen=True)
class Section:
    offset: int
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


Sections = dict[SectionName, Section]


def is_appimage(head: Data) -> bool:
    """Whether ``head`` (at least the first 11 bytes of a file) starts a type 2 AppImage."""
    return bytes(head[:4]) == b"\x7fELF" and bytes(head[8:11]) == MAGIC


def sections(data: Data, what: str, required: frozenset[SectionName] = frozenset(SectionName)) -> Sections:
    """The reserved sections of the AppImage ``data``; raise naming ``what`` when it is
    not a little-endian ELF64 type 2 AppImage or lacks one of ``required``."""
    size = len(data)
    if size < 64 or not is_appimage(data):
        raise VerificationError(f"{what}: not a type 2 AppImage (no ELF header with AI\\x02 at offset 8)")
    if bytes(data[4:6]) != b"\x02\x01":
        raise VerificationError(f"{what}: not a little-endian 64-bit ELF file")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    if shentsize != 64 or not 0 < shnum <= 4096 or shstrndx >= shnum or shoff + shnum * 64 > size:
        raise VerificationError(f"{what}: the ELF section header table is malformed")
    headers = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * 64) for i in range(shnum)]
    strtab, strsize = headers[shstrndx][4], headers[shstrndx][5]
    if strtab + strsize > size:
        raise VerificationError(f"{what}: the ELF section names lie outside the file")
    names = bytes(data[strtab : strtab + strsize])
    found: Sections = {}
    wanted = {s.value: s for s in SectionName}
    for name_at, _type, _flags, _addr, offset, length, *_ in headers:
        name = names[name_at : names.find(b"\0", name_at)].decode("ascii", "replace")
        if name in wanted:
            if offset + length > size or length == 0:
                raise VerificationError(f"{what}: ELF section {name} lies outside the file")
            found[wanted[name]] = Section(offset, length)
    missing = [s.value for s in SectionName if s in required and s not in found]
    if missing:
        raise VerificationError(f"{what}: the AppImage runtime has no {', '.join(missing)} section")
    ordered = sorted(found.values(), key=lambda s: s.offset)
    if any(a.end > b.offset for a, b in itertools.pairwise(ordered)):
        raise VerificationError(f"{what}: the AppImage's reserved sections overlap")
    return found


def content(data: Data, section: Section) -> bytes:
    """What ``section`` holds, without its zero padding."""
    return bytes(data[section.offset : section.end]).rstrip(b"\0")


def filled(section: Section, value: bytes, name: SectionName) -> bytes:
    """``value`` padded with zeros to the size of ``section``; raise if it does not fit."""
    if len(value) > section.size:
        raise VerificationError(f"{len(value)} bytes do not fit the {section.size} bytes of {name.value}")
    return value + bytes(section.size - len(value))


def update_information(zsync_url: str | None) -> bytes:
    """``.upd_info`` for the spec's zsync transport: ``zsync|<URL>``; empty without a URL."""
    if not zsync_url:
        return b""
    if "|" in zsync_url or any(ord(c) < 0x21 or ord(c) > 0x7E for c in zsync_url):
        raise ValueError(f"{zsync_url!r} cannot be update information (printable ASCII, no '|')")
    return f"{UPDATE_SCHEME}|{zsync_url}".encode()


def signature_text(data: Data, secs: Sections) -> bytes:
    """What ``.sha256_sig`` signs: the hex SHA-256 of the file, its signature and key
    sections read as zeros."""
    h = hashlib.sha256()
    at = 0
    for section in sorted((secs[s] for s in SIGNATURE_SKIPS), key=lambda s: s.offset):
        h.update(data[at : section.offset])
        h.update(bytes(section.size))
        at = section.end
    h.update(data[at:])
    return h.hexdigest().encode()


def libappimage_md5(data: Data, secs: Sections) -> bytes:
    """libappimage's ``appimage_type2_digest_md5`` of ``data``, step for step (see the
    module's docstring): a file position, one 4 KiB buffer kept across chunks, each
    chunk hashed whole. A section counts in a chunk when it starts strictly inside it,
    as the C code's unsigned comparison has it."""
    md5 = hashlib.md5(usedforsecurity=False)
    size = len(data)
    skips = [secs[s] for s in DIGEST_SKIPS]
    buf = bytearray(CHUNK)
    pos = 0

    def read(into: int, n: int) -> None:
        nonlocal pos
        got = bytes(data[pos : pos + n]) if pos < size else b""
        buf[into : into + len(got)] = got
        pos += len(got)

    left_in_file = size
    skip_next = 0
    while left_in_file > 0:
        start = pos
        left = CHUNK
        if skip_next > 0:
            skip = CHUNK if skip_next % CHUNK == 0 else skip_next % CHUNK
            left -= skip
            skip_next -= skip
            pos += skip
        for section in skips:
            if 0 < section.offset - start < CHUNK:
                before = section.offset - start
                read(0, before)
                left -= before + section.size
                if left < 0:
                    skip_next, left = -left, 0
                pos += CHUNK - left - before
        if left > 0:
            read(CHUNK - left, left)
        md5.update(buf)
        left_in_file -= CHUNK
    return md5.digest()


def unsealed(data: Data, secs: Sections) -> bytes:
    """``data`` with every reserved section zeroed: the AppImage as Nix built it."""
    out = bytearray(data)
    for section in secs.values():
        out[section.offset : section.end] = bytes(section.size)
    return bytes(out)
