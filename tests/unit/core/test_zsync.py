"""zsync control files as the agent checks them before zsync sees one (reconciler.core.zsync),
and the AppImage section helpers that need no AppImage (reconciler.core.appimage)."""

from __future__ import annotations

import pytest

from reconciler.core import appimage, zsync
from reconciler.errors import VerificationError

LENGTH = 5000  # three blocks of 2048


def control(header: str = "", body: bytes | None = None, length: int = LENGTH) -> bytes:
    lines = (
        "zsync: 0.6.2\nFilename: web-1-2-x86_64.AppImage\nMTime: Thu, 01 Jan 1970 00:00:01 +0000\n"
        f"Blocksize: 2048\nLength: {length}\nHash-Lengths: 2,2,4\nURL: abc\nSHA-1: 00\n" + header
    )
    return lines.encode() + b"\n" + (bytes(3 * 6) if body is None else body)


def test_a_control_file_zsyncmake_would_write_is_read_and_repointed() -> None:
    parsed = zsync.parse(control(), LENGTH, "x.zsync")
    assert (parsed.length, parsed.blocksize) == (LENGTH, 2048)
    moved = parsed.with_url("http://store/blobs/sha256/abc")
    assert moved == control().replace(b"URL: abc\n", b"URL: http://store/blobs/sha256/abc\n")
    assert zsync.parse(moved, LENGTH, "again").header == (
        *parsed.header[:6],
        ("URL", "http://store/blobs/sha256/abc"),
        parsed.header[7],
    )


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (
            control(length=LENGTH + 1, body=bytes(18)),
            f"describes {LENGTH + 1} bytes, the release says {LENGTH}",
        ),
        (
            control("Z-URL: http://elsewhere/x.gz\n"),
            "unexpected zsync header line 'Z-URL: http://elsewhere/x.gz'",
        ),
        (control("URL: http://elsewhere/\n"), "unexpected zsync header line 'URL: http://elsewhere/'"),
        (control().replace(b"Hash-Lengths: 2,2,4", b"Hash-Lengths: 2,2,40"), "unsupported block size"),
        (control().replace(b"Blocksize: 2048", b"Blocksize: 1000"), "unsupported block size"),
        (control().replace(b"Blocksize: 2048", b"Blocksize: many"), "malformed Blocksize"),
        (control(body=bytes(17)), "17 bytes of checksums, 3 blocks need 18"),
        (control().replace(b"\n\n", b"\n"), "no zsync header within"),
        (control().replace(b"URL: abc\n", b""), "the zsync header has no URL"),
        (control().replace(b"Filename: web", "Filename: wéb".encode()), "the zsync header is not ASCII"),
    ],
)
def test_a_control_file_for_anything_else_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(VerificationError, match=r"^x\.zsync: ") as err:
        zsync.parse(data, LENGTH, "x.zsync")
    assert why in str(err.value)


def test_the_fetch_limit_covers_the_densest_control_file() -> None:
    assert zsync.size_limit(LENGTH) >= len(control()) + 10 * 20
    assert zsync.size_limit(10**9) < 64 * 10**6


def test_update_information_is_the_zsync_transport_or_nothing() -> None:
    url = "https://store.example/hosts/web-1/web-1-latest-x86_64.AppImage.zsync"
    assert appimage.update_information(url) == f"zsync|{url}".encode()
    assert appimage.update_information(None) == b""
    for bad in ("https://a|b", "https://a b", "https://é"):
        with pytest.raises(ValueError):
            appimage.update_information(bad)


def test_what_is_not_an_appimage_has_no_sections() -> None:
    with pytest.raises(VerificationError, match=r"^x: not a type 2 AppImage"):
        appimage.sections(b"\x7fELF" + bytes(100), "x")
    section = appimage.Section(16, 4)
    assert appimage.filled(section, b"ab", appimage.SectionName.DIGEST) == b"ab\0\0"
    with pytest.raises(VerificationError, match=r"5 bytes do not fit the 4 bytes of \.digest_md5"):
        appimage.filled(section, b"abcde", appimage.SectionName.DIGEST)
