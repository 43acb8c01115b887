"""Filling an AppImage's reserved sections after the build, and reading them back
(reconciler.core.appimage says what each holds and why in this order).

The AppImage comes out of Nix with every reserved section zeroed. ``seal`` copies it
and writes, in place: the update information and the publisher's public key, then
libappimage's MD5 digest, then the gpg signature of the SHA-256 the AppImage tools
check. The signing key stays with the caller's signer; nothing here runs gpg.
"""

from __future__ import annotations

import mmap
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from reconciler.adapters import zsync
from reconciler.core import appimage
from reconciler.core.appimage import SectionName, Sections
from reconciler.errors import VerificationError

# zsyncmake writes the file's modification time into the control file, and zsync
# gives the file it builds that time: a fixed one keeps both a function of the bytes
# (the ACI's tar uses the same).
MTIME = 1


@contextmanager
def _mapped(path: Path, write: bool) -> Iterator[memoryview]:
    with path.open("r+b" if write else "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise VerificationError(f"{path.name}: empty file")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_WRITE if write else mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                yield view
            finally:
                view.release()
                if write:
                    mm.flush()


def _write(view: memoryview, secs: Sections, name: SectionName, value: bytes) -> None:
    section = secs[name]
    view[section.offset : section.end] = appimage.filled(section, value, name)


def seal(
    built: Path,
    dest: Path,
    update_information: bytes,
    public_key: bytes,
    sign: Callable[[bytes], bytes],
) -> None:
    """Write ``built`` (an AppImage as Nix made it) to ``dest`` with its reserved
    sections filled; ``sign`` makes a detached armored signature of the bytes given."""
    shutil.copyfile(built, dest)
    dest.chmod(0o644)
    with _mapped(dest, write=True) as view:
        secs = appimage.sections(view, built.name)
        if any(appimage.content(view, s) for s in secs.values()):
            raise VerificationError(f"{built.name}: its reserved sections are not empty; sealed twice?")
        _write(view, secs, SectionName.UPDATE, update_information)
        _write(view, secs, SectionName.KEY, public_key)
        digest = appimage.libappimage_md5(view, secs)
        _write(view, secs, SectionName.DIGEST, digest)
        # The spec: the armored block begins and ends with a line end, zeros after it.
        signature = sign(appimage.signature_text(view, secs))
        _write(view, secs, SectionName.SIGNATURE, b"\n" + signature.strip(b"\n") + b"\n")
        if appimage.libappimage_md5(view, secs) != digest:
            raise VerificationError(
                f"{built.name}: the runtime's section layout makes libappimage's digest read the "
                "signature; the digest cannot be embedded (see reconciler/core/appimage.py)"
            )
    dest.chmod(0o555)
    os.utime(dest, (MTIME, MTIME))


@dataclass(frozen=True)
class Embedded:
    """What a sealed AppImage carries about itself."""

    signed_text: bytes  # what .sha256_sig signs (recomputed from the file)
    signature: bytes  # .sha256_sig, without its padding
    key: bytes  # .sig_key
    update_information: bytes  # .upd_info
    # .digest_md5 as embedded and libappimage's digest of the file as it is; None for
    # an AppImage whose runtime has no such section (published before it had one).
    digest_md5: bytes | None
    computed_md5: bytes | None


def is_appimage(path: Path) -> bool:
    with path.open("rb") as f:
        return appimage.is_appimage(f.read(16))


def read_embedded(path: Path, what: str) -> Embedded:
    """The reserved sections of the AppImage at ``path``; raise naming ``what`` when
    it is none."""
    with _mapped(path, write=False) as view:
        secs = appimage.sections(view, what, required=frozenset(appimage.SIGNATURE_SKIPS))
        digest = secs.get(SectionName.DIGEST)
        update = secs.get(SectionName.UPDATE)
        return Embedded(
            signed_text=appimage.signature_text(view, secs),
            signature=appimage.content(view, secs[SectionName.SIGNATURE]).lstrip(b"\n"),
            key=appimage.content(view, secs[SectionName.KEY]),
            update_information=appimage.content(view, update) if update else b"",
            digest_md5=bytes(view[digest.offset : digest.end]) if digest else None,
            computed_md5=appimage.libappimage_md5(view, secs) if digest else None,
        )


def unsealed(path: Path, what: str) -> bytes:
    """The AppImage at ``path`` with its reserved sections zeroed: the bytes Nix built."""
    with _mapped(path, write=False) as view:
        return appimage.unsealed(view, appimage.sections(view, what))


class Packager:
    """The publisher's additions to built artifacts: sealing AppImages, zsync files
    (reconciler.ports.Packager)."""

    seal_appimage = staticmethod(seal)
    zsync = staticmethod(zsync.make)
