"""zsync control files (``.zsync``, as Debian's zsyncmake writes them). Pure.

A control file is a header of ``Key: value`` lines, a blank line, then per block of
the target its weak and strong checksums. The publisher writes one beside each
AppImage blob (``blobs/sha256/<hex>.zsync``); the agent reads it from the store,
which it does not trust for integrity, so before the zsync client sees one it must
describe exactly the artifact the signed release names (its length), point at that
artifact's blob and nothing else (its URL is replaced), carry only the header fields
zsyncmake writes (no compressed-transfer directives), and be as long as its block
count says. Whatever the client then builds is checked against the release's sha256
like any download.
"""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.errors import VerificationError

# Header fields zsyncmake writes for a file it does not look into (-C/-Z, no gzip).
FIELDS = frozenset({"zsync", "Filename", "MTime", "Blocksize", "Length", "Hash-Lengths", "URL", "SHA-1"})
HEADER_LIMIT = 16 * 1024
MIN_BLOCKSIZE = 512  # zsyncmake's blocks are powers of two, 2048 or 4096 by default
MAX_CHECKSUM_BYTES = 4 + 16  # weak (rsum) and strong (MD4) checksum per block, at most


def size_limit(length: int) -> int:
    """The most bytes a control file for a target of ``length`` bytes can take."""
    blocks = -(-length // MIN_BLOCKSIZE)
    return HEADER_LIMIT + blocks * MAX_CHECKSUM_BYTES


@dataclass(frozen=True)
class Control:
    header: tuple[tuple[str, str], ...]
    body: bytes
    length: int
    blocksize: int

    def with_url(self, url: str) -> bytes:
        """The control file with ``url`` as its only download location."""
        if any(c in url for c in "\r\n") or not url:
            raise ValueError(f"{url!r} is not a URL for a zsync header")
        lines = [f"{k}: {v}" for k, v in self.header if k != "URL"]
        lines.insert(next(i for i, (k, _) in enumerate(self.header) if k == "URL"), f"URL: {url}")
        return ("\n".join(lines) + "\n\n").encode() + self.body


def parse(data: bytes, length: int, what: str) -> Control:
    """The control file ``data`` for a target of exactly ``length`` bytes, or raise."""
    end = data.find(b"\n\n", 0, HEADER_LIMIT)
    if end < 0:
        raise VerificationError(f"{what}: no zsync header within {HEADER_LIMIT} bytes")
    try:
        text = data[:end].decode("ascii")
    except UnicodeDecodeError:
        raise VerificationError(f"{what}: the zsync header is not ASCII") from None
    header: list[tuple[str, str]] = []
    for line in text.split("\n"):
        key, sep, value = line.partition(": ")
        if not sep or key not in FIELDS or any(k == key for k, _ in header):
            raise VerificationError(f"{what}: unexpected zsync header line {line[:80]!r}")
        header.append((key, value))
    fields = dict(header)
    missing = sorted({"zsync", "Blocksize", "Length", "Hash-Lengths", "URL"} - fields.keys())
    if missing:
        raise VerificationError(f"{what}: the zsync header has no {', '.join(missing)}")
    try:
        blocksize, declared = int(fields["Blocksize"]), int(fields["Length"])
        seq, rsum, strong = (int(x) for x in fields["Hash-Lengths"].split(","))
    except ValueError:
        raise VerificationError(f"{what}: malformed Blocksize, Length or Hash-Lengths") from None
    if declared != length:
        raise VerificationError(f"{what}: describes {declared} bytes, the release says {length}")
    if (
        blocksize < MIN_BLOCKSIZE
        or blocksize & (blocksize - 1)
        or not (1 <= seq <= 2 and 1 <= rsum <= 4 and 3 <= strong <= 16)
    ):
        raise VerificationError(f"{what}: unsupported block size or hash lengths")
    body = data[end + 2 :]
    blocks = -(-length // blocksize)
    if len(body) != blocks * (rsum + strong):
        raise VerificationError(
            f"{what}: {len(body)} bytes of checksums, {blocks} blocks need {blocks * (rsum + strong)}"
        )
    return Control(tuple(header), body, length, blocksize)
