"""Verifying what the publisher put in a store, from a file path or URL.

A release file (``*.json``) is checked against its signature, its expiry, and then
every artifact it lists is fetched from the same store and checked for size,
sha256 and signature. Any other file is checked against its ``.asc``.
"""

from __future__ import annotations

import hashlib
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from reconciler.errors import VerificationError
from reconciler.release import Release, parse_release
from reconciler.signing import Verifier

FETCH_TIMEOUT = 60


def _is_url(target: str) -> bool:
    return urllib.parse.urlparse(target).scheme in ("http", "https", "file")


def _open(target: str) -> BinaryIO:
    if _is_url(target):
        resp: BinaryIO = urllib.request.urlopen(target, timeout=FETCH_TIMEOUT)
        return resp
    return Path(target).open("rb")


def fetch(target: str, dest: Path, limit: int | None = None) -> Path:
    """Copy ``target`` (path or URL) to ``dest``; refuse more than ``limit`` bytes."""
    try:
        src = _open(target)
    except (OSError, urllib.error.URLError) as exc:
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise VerificationError(f"cannot fetch {target}: {reason}") from None
    got = 0
    with src, dest.open("wb") as out:
        while chunk := src.read(1 << 20):
            got += len(chunk)
            if limit is not None and got > limit:
                raise VerificationError(f"{target}: larger than the {limit} bytes expected")
            out.write(chunk)
    return dest


def _store_root(target: str) -> str:
    """The store root of a release file at .../hosts/<host>/(latest|releases/N).json."""
    marker = "/hosts/"
    i = target.rfind(marker)
    if i < 0:
        raise VerificationError(f"{target}: not inside a store's hosts/ directory")
    return target[:i]


def verify(key_files: list[Path], target: str, now: datetime | None = None) -> list[str]:
    """Check ``target``; return one line per verified object or raise."""
    keys = []
    for k in key_files:
        try:
            keys.append(k.read_bytes())
        except OSError as exc:
            raise VerificationError(f"cannot read key {k}: {exc.strerror}") from None
    with Verifier(keys) as verifier, tempfile.TemporaryDirectory(prefix="reconciler-verify-") as tmp:
        work = Path(tmp)
        data = fetch(target, work / "target")
        sig = fetch(target + ".asc", work / "target.asc", limit=1 << 16)
        fpr = verifier.verify(data, sig.read_bytes(), target)
        lines = [f"OK {target} signed by {fpr}"]
        if not target.endswith(".json"):
            return lines
        release = parse_release(data.read_bytes(), target)
        _check_fresh(release, target, now or datetime.now(UTC))
        root = _store_root(target)
        for art in release.artifacts:
            where = f"{root}/{art.blob}"
            blob = fetch(where, work / art.sha256, limit=art.size)
            if blob.stat().st_size != art.size:
                raise VerificationError(f"{where}: size {blob.stat().st_size}, release says {art.size}")
            with blob.open("rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            if digest != art.sha256:
                raise VerificationError(f"{where}: sha256 {digest}, release says {art.sha256}")
            blob_sig = fetch(where + ".asc", work / (art.sha256 + ".asc"), limit=1 << 16)
            verifier.verify(blob, blob_sig.read_bytes(), where)
            lines.append(f"OK {art.name} ({art.format}, {art.size} bytes, sha256 {art.sha256})")
            blob.unlink()
        return lines


def _check_fresh(release: Release, target: str, now: datetime) -> None:
    if release.expires <= now:
        raise VerificationError(f"{target}: expired at {release.expires.isoformat()}")
