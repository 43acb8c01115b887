"""Reading store objects by URL (http, https, file) or local path.

Every read has a size limit and a timeout: whatever serves the store is not
trusted to end its answers. A conditional read returns None when the object has
not changed since the validators of an earlier read.
"""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from reconciler.errors import FetchError, FetchKind

TIMEOUT = 60.0
CHUNK = 1 << 16
# HTTP dates have one-second resolution: an object changed again within the same
# second keeps its Last-Modified (and nginx's ETag), so validators younger than
# this are not trusted for a conditional read.
FRESH_SECONDS = 2.0


@dataclass(frozen=True)
class Validators:
    """What identifies the version of an object a read returned."""

    etag: str | None = None
    last_modified: str | None = None

    def to_json(self) -> dict[str, str | None]:
        return {"etag": self.etag, "last_modified": self.last_modified}


@dataclass(frozen=True)
class Fetched:
    data: bytes
    validators: Validators


def is_url(target: str) -> bool:
    return urllib.parse.urlparse(target).scheme in ("http", "https", "file")


def join(base: str, key: str) -> str:
    """The location of store ``key`` under ``base`` (a URL or a directory)."""
    return base.rstrip("/") + "/" + key


def _reason(exc: BaseException) -> str:
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code} {exc.reason}"
    reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
    return str(reason)


def _open_error(target: str, exc: BaseException) -> FetchError:
    """The error of a read that got no answer body; a missing local file is a 404, as
    over HTTP, so that callers tell "not there" from "unreachable" on every transport."""
    message = f"cannot fetch {target}: {_reason(exc)}"
    if isinstance(exc, urllib.error.HTTPError):
        return FetchError(message, kind=FetchKind.HTTP_STATUS, status=exc.code)
    if isinstance(exc, FileNotFoundError):
        return FetchError(message, kind=FetchKind.HTTP_STATUS, status=404)
    return FetchError(message)


def _open(target: str, headers: dict[str, str], timeout: float) -> tuple[BinaryIO, dict[str, str]]:
    if is_url(target) and not target.startswith("file:"):
        req = urllib.request.Request(target, headers=headers)
        resp = urllib.request.urlopen(req, timeout=timeout)
        return resp, {k.lower(): v for k, v in resp.headers.items()}
    path = Path(urllib.parse.urlparse(target).path if target.startswith("file:") else target)
    f = path.open("rb")
    st = os.fstat(f.fileno())
    # A local file's identity: a rename-over (how the store writes) changes the inode.
    tag = f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"'
    return f, {"etag": tag, "x-local": "1"}


def get(
    target: str,
    limit: int,
    since: Validators | None = None,
    timeout: float = TIMEOUT,
    count: Callable[[int], None] = lambda n: None,
) -> Fetched | None:
    """Read all of ``target``, at most ``limit`` bytes; None if unchanged ``since``."""
    headers = {}
    if since is not None and since.etag:
        headers["If-None-Match"] = since.etag
    if since is not None and since.last_modified:
        headers["If-Modified-Since"] = since.last_modified
    try:
        src, meta = _open(target, headers, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 304:
            return None
        raise _open_error(target, exc) from None
    except (OSError, urllib.error.URLError, ValueError, http.client.HTTPException) as exc:
        raise _open_error(target, exc) from None
    with src:
        if "x-local" in meta and since is not None and since.etag == meta["etag"]:
            return None
        data = _read_limited(src, target, limit, count)
    return Fetched(data, _validators(meta))


def _validators(meta: dict[str, str]) -> Validators:
    etag, modified = meta.get("etag"), meta.get("last-modified")
    if modified and "x-local" not in meta:
        changed = email.utils.parsedate_to_datetime(modified).timestamp()
        served = meta.get("date")
        now = email.utils.parsedate_to_datetime(served).timestamp() if served else time.time()
        if now - changed < FRESH_SECONDS:
            return Validators()
    return Validators(etag=etag, last_modified=modified)


def _stream(
    src: BinaryIO, target: str, limit: int, count: Callable[[int], None], sink: Callable[[bytes], object]
) -> int:
    """Pass ``src`` to ``sink`` chunk by chunk, refusing more than ``limit`` bytes; the
    number of bytes read."""
    got = 0
    try:
        while chunk := src.read(CHUNK):
            got += len(chunk)
            count(len(chunk))
            if got > limit:
                raise FetchError(f"{target}: larger than the {limit} bytes expected")
            sink(chunk)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise FetchError(f"cannot fetch {target}: interrupted after {got} bytes ({_reason(exc)})") from None
    return got


def _read_limited(src: BinaryIO, target: str, limit: int, count: Callable[[int], None]) -> bytes:
    parts: list[bytes] = []
    _stream(src, target, limit, count, parts.append)
    return b"".join(parts)


def download(
    target: str,
    dest: Path,
    size: int,
    timeout: float = TIMEOUT,
    count: Callable[[int], None] = lambda n: None,
    exact: bool = True,
) -> str:
    """Stream ``target`` into ``dest``, refusing more than ``size`` bytes and, when
    ``exact``, fewer (a truncated answer); return the sha256 of what was written."""
    try:
        src, _ = _open(target, {}, timeout)
    except (OSError, urllib.error.URLError, ValueError, http.client.HTTPException) as exc:
        raise _open_error(target, exc) from None
    digest = hashlib.sha256()

    with src, dest.open("wb") as out:

        def sink(chunk: bytes) -> None:
            digest.update(chunk)
            out.write(chunk)

        got = _stream(src, target, size, count, sink)
    if exact and got != size:
        raise FetchError(f"{target}: got {got} bytes, expected {size} (truncated)")
    return digest.hexdigest()


class HttpFetcher:
    """The store read over http(s), file: URLs or local paths: this module as an object,
    for whoever takes a fetcher (the agent's updater, `reconciler verify`)."""

    get = staticmethod(get)
    download = staticmethod(download)
