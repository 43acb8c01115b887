"""Reading store objects by URL (http, https, file) or local path.

Every read has a size limit and one deadline for the whole request (connecting, the
headers, the body): whatever serves the store is not trusted to end its answers, nor to
send them at any useful speed. A conditional read returns None when the object has not
changed since the validators of an earlier read.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http
import http.client
import os
import re
import socket
import ssl
import stat
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from reconciler.adapters.bounded import BoundedCalls, CrowdedError, LateError
from reconciler.errors import FetchError, FetchKind

TIMEOUT = 60.0
CHUNK = 1 << 16
# HTTP dates have one-second resolution: an object changed again within the same
# second keeps its Last-Modified (and nginx's ETag), so validators younger than
# this are not trusted for a conditional read.
FRESH_SECONDS = 2.0
# The longest validator kept to send back. Every poll sends it: one a server sent of
# 16 KB would have every later request refused (400) by a server that limits its
# headers, nginx's deploy/nginx/store.conf among them. nginx's ETags have some 20
# characters, S3's 34 (a multipart upload's a few more), an HTTP date 29.
MAX_VALIDATOR = 128
# What a validator sent back may hold: visible ASCII (RFC 9110's etagc, and a date's).
_VALIDATOR = re.compile(r"[\x20-\x7e]+")
REDIRECTS = frozenset({301, 302, 303, 307, 308})


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
    if isinstance(exc, http.client.RemoteDisconnected):
        return "closed the connection without an answer"
    if isinstance(exc, http.client.HTTPException):
        # Not str(exc): a bad status line would be the server's own text.
        return f"not a valid HTTP answer ({type(exc).__name__})"
    reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
    return str(reason)


@dataclass(frozen=True)
class _Answer:
    """An answer whose body is still to be read: ``chunks`` until its end."""

    meta: dict[str, str]  # header names in lower case
    chunks: Iterator[bytes]
    length: int | None = None  # what the answer announced, if it did


class _Deadline:
    """One request's deadline.

    Socket timeouts bound each read, not the request: a server sending a byte a second
    never trips them. So a watchdog shuts the connection down when the deadline passes,
    which wakes a read blocked anywhere, in http.client (status line, headers, chunk
    sizes, trailers) or in the body loop; whoever wakes checks ``passed``.
    """

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.end = time.monotonic() + timeout
        self.fired = False
        self._timer: threading.Timer | None = None
        self._handle: socket.socket | None = None

    def left(self) -> float:
        return self.end - time.monotonic()

    def passed(self) -> bool:
        return self.fired or self.left() <= 0

    def watch(self, sock: socket.socket) -> None:
        # A duplicate descriptor, because TLS takes ``sock`` over; a shutdown through
        # either ends the one connection.
        self._handle = sock.dup()
        self._timer = threading.Timer(max(self.left(), 0.0), self._fire)
        self._timer.daemon = True
        self._timer.start()

    def _fire(self) -> None:
        self.fired = True
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer.join()
        if self._handle is not None:
            self._handle.close()

    def error(self, target: str, during: str) -> FetchError:
        return FetchError(
            f"cannot fetch {target}: no complete answer within {self.timeout:g}s (slow retrieval; {during})",
            kind=FetchKind.DEADLINE,
        )


def _connection(host: str, port: int | None, https: bool, deadline: _Deadline) -> http.client.HTTPConnection:
    """A connection to ``host`` over our own socket, so that ``deadline`` covers
    connecting (and the TLS handshake) and can cut it."""
    port = port or (443 if https else 80)
    ctx = ssl.create_default_context() if https else None
    conn = (
        http.client.HTTPSConnection(host, port, context=ctx)
        if ctx
        else http.client.HTTPConnection(host, port)
    )
    conn.sock = _connect(host, port, deadline)
    deadline.watch(conn.sock)
    if ctx is not None:
        conn.sock = ctx.wrap_socket(conn.sock, server_hostname=host)
    return conn


# What getaddrinfo gives: family, type, protocol, canonical name, address.
_Addresses = Sequence[tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[Any, ...]]]

# Name lookups left running past their request's deadline, at most this many at once.
MAX_LOOKUPS_LEFT = 8
_LOOKUPS = BoundedCalls(MAX_LOOKUPS_LEFT)


def _resolve(host: str, port: int, deadline: _Deadline) -> _Addresses:
    """``host``'s addresses, looked up within the deadline (adapters.bounded: the
    system's resolver keeps to its own timeouts)."""
    try:
        # An address needs no lookup, and no thread.
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except socket.gaierror:
        pass
    try:
        return _LOOKUPS.run(
            lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM), deadline.left(), "name-lookup"
        )
    except CrowdedError:
        raise OSError(
            f"cannot look up {host}: {MAX_LOOKUPS_LEFT} name lookups are still unanswered"
        ) from None
    except LateError:
        raise TimeoutError(f"the name lookup of {host} did not finish") from None


def _connect(host: str, port: int, deadline: _Deadline) -> socket.socket:
    """A connection to one of ``host``'s addresses, looked up and all tried within the
    deadline (not socket.create_connection: it gives each address the whole timeout)."""
    error = OSError(f"no address for {host}")
    for family, kind, proto, _, addr in _resolve(host, port, deadline):
        if deadline.passed():
            break
        sock = socket.socket(family, kind, proto)
        try:
            sock.settimeout(max(deadline.left(), 0.001))
            sock.connect(addr)
        except OSError as exc:
            sock.close()
            error = exc
            continue
        return sock
    raise error


@contextlib.contextmanager
def _open(target: str, headers: dict[str, str], timeout: float) -> Iterator[_Answer | None]:
    """The answer to a GET of ``target``; None when a conditional GET (``headers`` set)
    is answered "not modified"."""
    if not is_url(target) or target.startswith("file:"):
        with _open_local(target) as answer:
            yield answer
        return
    deadline = _Deadline(timeout)
    conn: http.client.HTTPConnection | None = None
    resp: http.client.HTTPResponse | None = None
    try:
        try:
            url = urllib.parse.urlsplit(target)
            host, https = url.hostname, url.scheme == "https"
            if not host:
                raise ValueError("no host in the URL")
            conn = _connection(host, url.port, https, deadline)
            path = (url.path or "/") + (f"?{url.query}" if url.query else "")
            conn.request("GET", path, headers={**headers, "User-Agent": "reconciler", "Connection": "close"})
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise _failed(target, deadline, "connecting", exc, FetchKind.UNREACHABLE) from None
        try:
            resp = conn.getresponse()
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise _failed(target, deadline, "waiting for the headers", exc, FetchKind.INTERRUPTED) from None
        if resp.status == 304 and headers:
            yield None
            return
        if resp.status != 200:
            raise _status_error(target, resp.status)
        meta = {k.lower(): v for k, v in resp.getheaders()}
        yield _Answer(meta, _body(resp, target, deadline), resp.length)
    finally:
        deadline.close()
        if resp is not None:
            resp.close()
        if conn is not None:
            conn.close()


def _failed(target: str, deadline: _Deadline, during: str, exc: BaseException, kind: FetchKind) -> FetchError:
    if deadline.passed():
        # Whatever broke, it broke because the watchdog cut the connection, or too late.
        return deadline.error(target, during)
    return FetchError(f"cannot fetch {target}: {_reason(exc)}", kind=kind)


def _status_error(target: str, status: int) -> FetchError:
    # The standard phrase, not the server's: its reason text is whatever it likes.
    try:
        what = f"HTTP {status} {http.HTTPStatus(status).phrase}"
    except ValueError:
        what = f"HTTP {status}"
    if status in REDIRECTS:
        what += " (a store answers directly: redirects are not followed)"
    elif status == 304:
        what += " (to a request that was not conditional)"
    return FetchError(f"cannot fetch {target}: {what}", kind=FetchKind.HTTP_STATUS, status=status)


def _body(resp: http.client.HTTPResponse, target: str, deadline: _Deadline) -> Iterator[bytes]:
    got = 0
    while True:
        try:
            chunk = resp.read1(CHUNK)
        except http.client.IncompleteRead:
            if deadline.passed():
                raise deadline.error(target, f"{got} bytes of the body read") from None
            raise FetchError(
                f"{target}: the answer ended after {got} bytes (truncated)", kind=FetchKind.TRUNCATED
            ) from None
        except (OSError, ValueError, http.client.HTTPException) as exc:
            raise _failed(
                target, deadline, f"{got} bytes of the body read", exc, FetchKind.INTERRUPTED
            ) from None
        # Checked after every read, even one that returned data: an end the watchdog
        # caused looks like the end of an answer without a length.
        if deadline.passed():
            raise deadline.error(target, f"{got} bytes of the body read")
        if not chunk:
            break
        got += len(chunk)
        yield chunk
    if resp.length:
        raise FetchError(
            f"{target}: the answer ended after {got} of the {got + resp.length} bytes announced (truncated)",
            kind=FetchKind.TRUNCATED,
        )


@contextlib.contextmanager
def _open_local(target: str) -> Iterator[_Answer]:
    path = Path(urllib.parse.urlparse(target).path if target.startswith("file:") else target)
    try:
        # Not blocking: opening a FIFO waits for a writer, for ever; only a regular file
        # is read (a FIFO or a device in a store is no object the daemon wrote).
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        # As a server answers a missing object: a caller may take it as "none yet".
        raise FetchError(
            f"cannot fetch {target}: {_reason(exc)}", kind=FetchKind.HTTP_STATUS, status=404
        ) from None
    except OSError as exc:
        raise FetchError(f"cannot fetch {target}: {_reason(exc)}", kind=FetchKind.UNREACHABLE) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FetchError(f"cannot fetch {target}: not a regular file", kind=FetchKind.UNREACHABLE)
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        # A local file's identity: a rename-over (how the store writes) changes the inode.
        tag = f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"'
        yield _Answer({"etag": tag, "x-local": "1"}, _file_chunks(f, target))


def _file_chunks(f: BinaryIO, target: str) -> Iterator[bytes]:
    got = 0
    try:
        while chunk := f.read(CHUNK):
            got += len(chunk)
            yield chunk
    except OSError as exc:
        raise FetchError(
            f"cannot fetch {target}: interrupted after {got} bytes ({_reason(exc)})",
            kind=FetchKind.INTERRUPTED,
        ) from None


def get(
    target: str,
    limit: int,
    since: Validators | None = None,
    timeout: float = TIMEOUT,
    count: Callable[[int], None] = lambda n: None,
) -> Fetched | None:
    """Read all of ``target``, at most ``limit`` bytes within ``timeout`` seconds; None
    if unchanged ``since``."""
    headers = {}
    if since is not None and since.etag:
        headers["If-None-Match"] = since.etag
    if since is not None and since.last_modified:
        headers["If-Modified-Since"] = since.last_modified
    with _open(target, headers, timeout) as answer:
        if answer is None:
            return None
        if "x-local" in answer.meta and since is not None and since.etag == answer.meta["etag"]:
            return None
        parts: list[bytes] = []
        _stream(answer, target, limit, count, parts.append)
    return Fetched(b"".join(parts), _validators(answer.meta))


def _validators(meta: dict[str, str]) -> Validators:
    """What of an answer's validators is sent back with the next read. None that is
    long or holds what no header may (MAX_VALIDATOR). No Last-Modified that is not
    older than FRESH_SECONDS by this machine's clock and by the server's: a date from
    the future would have the store answer "not modified" to every later read (from
    one hostile answer on, until that date), and one just now may hide a change made
    within its second (then no ETag either: it may be derived from the date)."""
    etag, modified = (_sendable(meta.get(k)) for k in ("etag", "last-modified"))
    if meta.get("last-modified") and "x-local" not in meta:
        changed = _date(modified)
        now = min(time.time(), _date(meta.get("date")) or time.time())
        if changed is None or now - changed < FRESH_SECONDS:
            return Validators()
    return Validators(etag=etag, last_modified=modified)


def _sendable(value: str | None) -> str | None:
    if value is None or len(value) > MAX_VALIDATOR or not _VALIDATOR.fullmatch(value):
        return None
    return value


def _date(value: str | None) -> float | None:
    """An HTTP date as a POSIX time; None when there is none or it is garbled."""
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (ValueError, TypeError, OverflowError):
        return None


def _stream(
    answer: _Answer, target: str, limit: int, count: Callable[[int], None], sink: Callable[[bytes], object]
) -> int:
    """Pass the body of ``answer`` to ``sink`` chunk by chunk, refusing more than
    ``limit`` bytes; the number of bytes read."""
    too_large = FetchError(f"{target}: larger than the {limit} bytes expected", kind=FetchKind.TOO_LARGE)
    if answer.length is not None and answer.length > limit:
        raise too_large
    got = 0
    for chunk in answer.chunks:
        got += len(chunk)
        count(len(chunk))
        if got > limit:
            raise too_large
        sink(chunk)
    return got


def download(
    target: str,
    dest: Path,
    size: int,
    timeout: float = TIMEOUT,
    count: Callable[[int], None] = lambda n: None,
    exact: bool = True,
) -> str:
    """Stream ``target`` into ``dest`` within ``timeout`` seconds, refusing more than
    ``size`` bytes and, when ``exact``, fewer (a truncated answer); return the sha256 of
    what was written."""
    digest = hashlib.sha256()
    with _open(target, {}, timeout) as answer, dest.open("wb") as out:
        assert answer is not None  # only a conditional read is answered "not modified"

        def sink(chunk: bytes) -> None:
            digest.update(chunk)
            out.write(chunk)

        got = _stream(answer, target, size, count, sink)
    if exact and got != size:
        raise FetchError(f"{target}: got {got} bytes, expected {size} (truncated)", kind=FetchKind.TRUNCATED)
    return digest.hexdigest()


@dataclass(frozen=True)
class Posted:
    """The answer to a POST: its status, and how long the server asks to wait before
    another try (Retry-After in seconds), if it says."""

    status: int
    retry_after: float | None = None


def post(url: str, body: bytes, headers: dict[str, str], timeout: float, label: str = "") -> Posted:
    """POST ``body`` to ``url`` and wait for the answer's status and headers, all within
    ``timeout`` seconds (connecting, sending, answering), however slowly the server goes.
    The body of the answer is not read. Errors name ``label``, never the URL, which may
    hold a credential (a Slack webhook's does); raises FetchError when no answer came."""
    return _ask("POST", url, body, headers, timeout, label)


def status(url: str, timeout: float, label: str = "") -> int:
    """The status of the answer to a GET of ``url``, as post() waits for it: within
    ``timeout`` seconds, the body unread, a redirect not followed."""
    return _ask("GET", url, None, {}, timeout, label).status


def _ask(
    method: str, url: str, body: bytes | None, headers: dict[str, str], timeout: float, label: str
) -> Posted:
    deadline = _Deadline(timeout)
    conn: http.client.HTTPConnection | None = None
    label = label or "the server"
    during = "connecting"
    try:
        parsed = urllib.parse.urlsplit(url)
        host, https = parsed.hostname, parsed.scheme == "https"
        if not host:
            raise FetchError(f"{label}: no host in the URL", kind=FetchKind.UNREACHABLE)
        conn = _connection(host, parsed.port, https, deadline)
        during = "sending"
        path = (parsed.path or "/") + (f"?{parsed.query}" if parsed.query else "")
        conn.request(
            method, path, body=body, headers={"User-Agent": "reconciler", **headers, "Connection": "close"}
        )
        during = "waiting for the answer"
        resp = conn.getresponse()
        if deadline.passed():
            raise FetchError(f"{label}: no answer within {timeout:g}s ({during})", kind=FetchKind.DEADLINE)
        return Posted(resp.status, _retry_after(resp.getheader("Retry-After")))
    except (OSError, ValueError, http.client.HTTPException) as exc:
        if deadline.passed():
            raise FetchError(
                f"{label}: no answer within {timeout:g}s ({during})", kind=FetchKind.DEADLINE
            ) from None
        kind = FetchKind.UNREACHABLE if during == "connecting" else FetchKind.INTERRUPTED
        raise FetchError(f"{label}: {_reason(exc)} ({during})", kind=kind) from None
    finally:
        deadline.close()
        if conn is not None:
            conn.close()


def _retry_after(value: str | None) -> float | None:
    """Retry-After as seconds: a number of them, or an HTTP date."""
    if value is None:
        return None
    seconds = value.strip()
    # ASCII digits: str.isdigit() takes "²" too, which float() refuses; a server's
    # odd header must not turn the answer it came with into a failure.
    if seconds.isascii() and seconds.isdigit():
        return float(seconds)
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (ValueError, TypeError, OverflowError):
        return None


class HttpFetcher:
    """The store read over http(s), file: URLs or local paths: this module as an object,
    for whoever takes a fetcher (the agent's updater, `reconciler verify`)."""

    get = staticmethod(get)
    download = staticmethod(download)
