"""Store reads (reconciler.adapters.fetch) against real servers on 127.0.0.1: limits,
conditional reads, error statuses, and one deadline for the whole request however
slowly the server answers (TUF's slow retrieval attack)."""

from __future__ import annotations

import email.utils
import hashlib
import os
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from reconciler.adapters import fetch
from reconciler.adapters.fetch import Validators
from reconciler.errors import FetchError, FetchKind

T = TypeVar("T")

DEADLINE = 1.0
# A request under a 1 s deadline must be over well within this: generous, because the
# point is that it ends at all (the old per-read timeout let a trickle run for minutes).
BOUND = 5.0
STEP = 0.2  # one byte per STEP seconds: each read well within the deadline, the whole never
OLD_DATE = "Mon, 01 Jan 2024 00:00:00 GMT"

# A self-signed certificate for 127.0.0.1 (until 2124), trusted through SSL_CERT_FILE.
CERT = """\
-----BEGIN CERTIFICATE-----
MIIBoDCCAUagAwIBAgIUDzoCDYaes2AvIeKn2eVHI1zWdyEwCgYIKoZIzj0EAwIw
FDESMBAGA1UEAwwJMTI3LjAuMC4xMCAXDTI0MDEwMTAwMDAwMFoYDzIxMjQwMTAx
MDAwMDAwWjAUMRIwEAYDVQQDDAkxMjcuMC4wLjEwWTATBgcqhkjOPQIBBggqhkjO
PQMBBwNCAASeEagyvUDILAhDcWw96bv/2oqDGtjD3C/MrSh3VBQYGgZmU4C4iray
HG0KpBwQDc9WHeGtrXR5DMfk7DlVaQ2To3QwcjAPBgNVHREECDAGhwR/AAABMA8G
A1UdEwEB/wQFMAMBAf8wDgYDVR0PAQH/BAQDAgKEMB0GA1UdDgQWBBTjX7Ln2kTq
eje/zds1jqnBnFXKAzAfBgNVHSMEGDAWgBTjX7Ln2kTqeje/zds1jqnBnFXKAzAK
BggqhkjOPQQDAgNIADBFAiEAxCLHoAe4P7gFdV+lKSwLbXEalfkfw+4pAjPm/bKp
UJACIGIdoXuw3quN9zNSqrqgs6lt8E4mjjtVjcKsJFtlsXO0
-----END CERTIFICATE-----
"""
KEY = """\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg59gnbzQDktAme2ZO
JXqDDWeQg3htNDMTMgrqopxaOauhRANCAASeEagyvUDILAhDcWw96bv/2oqDGtjD
3C/MrSh3VBQYGgZmU4C4irayHG0KpBwQDc9WHeGtrXR5DMfk7DlVaQ2T
-----END PRIVATE KEY-----
"""

# How a server answers one connection: the socket, the request head, and an event set
# when the test ends (every answer returns soon after it is set).
Answer = Callable[[socket.socket, bytes, threading.Event], None]


class Server:
    """A raw HTTP(S) server on 127.0.0.1 that reads each request head and leaves the rest
    of the connection to ``answer``: whatever an attacker's server could send."""

    def __init__(self, answer: Answer, tls: ssl.SSLContext | None = None) -> None:
        self.answer = answer
        self.tls = tls
        self.stop = threading.Event()
        self.heads: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def url(self, path: str = "/obj") -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{path}"

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(BOUND)
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            self.heads.append(head)
            self.answer(conn, head, self.stop)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(BOUND)
        self.listener.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(answer: Answer, tls: ssl.SSLContext | None = None) -> Server:
        started.append(Server(answer, tls))
        return started[-1]

    yield start
    for server in started:
        server.close()


@pytest.fixture
def tls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ssl.SSLContext:
    """A server context for 127.0.0.1 whose certificate the client's default context trusts."""
    (tmp_path / "cert.pem").write_text(CERT)
    (tmp_path / "key.pem").write_text(KEY)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "cert.pem"))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return ctx


def bounded(call: Callable[[], T]) -> T:
    """``call()``, failing the test (not hanging it) when it runs longer than BOUND."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(BOUND)
    if t.is_alive():
        pytest.fail(f"still running after {BOUND} s under a {DEADLINE} s deadline")
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


def refusal(call: Callable[[], object]) -> FetchError:
    with pytest.raises(FetchError) as exc:
        bounded(call)
    return exc.value


def respond(status: str, body: bytes = b"", headers: dict[str, str] | None = None) -> Answer:
    def answer(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
        fields = {"Content-Length": str(len(body)), **(headers or {})}
        lines = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
        conn.sendall(f"HTTP/1.1 {status}\r\n{lines}\r\n".encode() + body)

    return answer


def send(raw: bytes) -> Answer:
    """Send ``raw`` as it is, then close."""
    return lambda conn, head, stop: conn.sendall(raw)


def trickle(data: bytes, first: bytes = b"") -> Answer:
    """Send ``first`` at once, then ``data`` one byte per STEP until the test ends."""

    def answer(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
        conn.sendall(first)
        for i in range(len(data)):
            if stop.wait(STEP):
                return
            conn.sendall(data[i : i + 1])

    return answer


def silent(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    stop.wait()


def get(url: str, **kw: Any) -> Callable[[], fetch.Fetched | None]:
    return lambda: fetch.get(url, kw.pop("limit", 1 << 20), timeout=DEADLINE, **kw)


def download(url: str, dest: Path, size: int, **kw: Any) -> Callable[[], str]:
    return lambda: fetch.download(url, dest, size, timeout=DEADLINE, **kw)


def reads(tmp_path: Path) -> dict[str, Callable[[str], Callable[[], object]]]:
    """get and download of the same URL, for tests that hold for both."""
    return {
        "get": lambda url: get(url),
        "download": lambda url: download(url, tmp_path / "out", 1000),
    }


READS = ["get", "download"]


# -- what a store answers ---------------------------------------------------------------------


def test_get_reads_the_whole_answer_and_its_validators(serve: Callable[..., Server]) -> None:
    body = b"x" * 200_000  # several reads
    server = serve(respond("200 OK", body, {"ETag": '"v1"', "Last-Modified": OLD_DATE}))
    counted: list[int] = []
    got = bounded(get(server.url(), count=counted.append))
    assert got is not None
    assert got.data == body
    assert got.validators == Validators(etag='"v1"', last_modified=OLD_DATE)
    assert sum(counted) == len(body)
    assert server.heads[0].startswith(b"GET /obj HTTP/1.1\r\n")


def test_download_writes_the_answer_and_returns_its_digest(
    serve: Callable[..., Server], tmp_path: Path
) -> None:
    body = bytes(range(256)) * 1000
    server = serve(respond("200 OK", body))
    counted: list[int] = []
    digest = bounded(download(server.url(), tmp_path / "out", len(body), count=counted.append))
    assert digest == hashlib.sha256(body).hexdigest()
    assert (tmp_path / "out").read_bytes() == body
    assert sum(counted) == len(body)


def test_a_chunked_answer_is_read_whole(serve: Callable[..., Server]) -> None:
    chunked = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    server = serve(send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked))
    got = bounded(get(server.url()))
    assert got is not None and got.data == b"hello world"


def test_an_answer_ended_by_closing_is_read_whole(serve: Callable[..., Server]) -> None:
    server = serve(send(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it"))
    got = bounded(get(server.url()))
    assert got is not None and got.data == b"all of it"


def test_a_304_to_a_conditional_get_is_none(serve: Callable[..., Server]) -> None:
    def answer(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
        if b'\r\nif-none-match: "v1"\r\n' in head.lower():
            respond("304 Not Modified", headers={"ETag": '"v1"'})(conn, head, stop)
        else:
            respond("200 OK", b"data", {"ETag": '"v1"', "Last-Modified": OLD_DATE})(conn, head, stop)

    server = serve(answer)
    first = bounded(get(server.url()))
    assert first is not None and first.validators.etag == '"v1"'
    assert bounded(get(server.url(), since=first.validators)) is None
    assert f"If-Modified-Since: {OLD_DATE}\r\n".encode() in server.heads[1]


def test_a_304_to_an_unconditional_get_is_an_error_not_none(serve: Callable[..., Server]) -> None:
    # Callers take None as "unchanged since what you had": without validators they had nothing.
    server = serve(respond("304 Not Modified"))
    err = refusal(get(server.url()))
    assert (err.kind, err.status) == (FetchKind.HTTP_STATUS, 304)


def test_validators_of_an_object_changed_within_the_last_seconds_are_not_kept(
    serve: Callable[..., Server],
) -> None:
    now = email.utils.formatdate(usegmt=True)
    server = serve(respond("200 OK", b"data", {"ETag": '"v1"', "Last-Modified": now, "Date": now}))
    got = bounded(get(server.url()))
    assert got is not None and got.validators == Validators()


@pytest.mark.parametrize(
    "dates",
    [
        {"Last-Modified": "yesterday"},
        {"Last-Modified": "Mon, 01 Jan 99999999999 00:00:00 GMT"},
    ],
)
def test_garbled_dates_only_cost_the_validators(serve: Callable[..., Server], dates: dict[str, str]) -> None:
    server = serve(respond("200 OK", b"data", {"ETag": '"v1"', **dates}))
    got = bounded(get(server.url()))
    assert got is not None and got.data == b"data" and got.validators == Validators()


FUTURE = "Fri, 31 Dec 2100 23:59:00 GMT"


@pytest.mark.parametrize(
    ("headers", "kept"),
    [
        # The server's clock, or its word for it, cannot make a date of the future old.
        ({"ETag": '"v1"', "Last-Modified": FUTURE, "Date": FUTURE}, Validators()),
        ({"ETag": '"v1"', "Last-Modified": FUTURE}, Validators()),
        # A garbled Date leaves this machine's clock to judge.
        (
            {"ETag": '"v1"', "Last-Modified": OLD_DATE, "Date": "Mon, 99 Foo 2024 99:99:99 GMT"},
            Validators('"v1"', OLD_DATE),
        ),
        # Too long to send back with every read, or not a header's value.
        ({"ETag": '"' + "A" * 200 + '"', "Last-Modified": OLD_DATE}, Validators(None, OLD_DATE)),
        ({"ETag": '"v\x01"'}, Validators()),
    ],
    ids=["dates of 2100", "a last-modified of 2100", "a garbled date", "a long etag", "a control character"],
)
def test_only_validators_fit_to_be_sent_back_are_kept(
    serve: Callable[..., Server], headers: dict[str, str], kept: Validators
) -> None:
    server = serve(respond("200 OK", b"data", headers))
    got = bounded(get(server.url()))
    assert got is not None and got.data == b"data" and got.validators == kept


@pytest.mark.parametrize("status", ["404 Not Found", "500 Internal Server Error", "403 Forbidden"])
@pytest.mark.parametrize("read", READS)
def test_an_error_status_is_named_and_carried(
    serve: Callable[..., Server], tmp_path: Path, status: str, read: str
) -> None:
    server = serve(respond(status, b"<html>error page</html>"))
    err = refusal(reads(tmp_path)[read](server.url()))
    assert (err.kind, err.status) == (FetchKind.HTTP_STATUS, int(status[:3]))
    assert str(err) == f"cannot fetch {server.url()}: HTTP {status}"


def test_the_servers_reason_phrase_is_not_repeated(serve: Callable[..., Server]) -> None:
    server = serve(respond("404 \x1b[2Jcleared your terminal"))
    assert str(refusal(get(server.url()))) == f"cannot fetch {server.url()}: HTTP 404 Not Found"


def test_a_redirect_is_refused_by_its_status(serve: Callable[..., Server]) -> None:
    server = serve(respond("301 Moved Permanently", headers={"Location": "/elsewhere"}))
    err = refusal(get(server.url()))
    assert (err.kind, err.status) == (FetchKind.HTTP_STATUS, 301)
    assert "HTTP 301 Moved Permanently" in str(err) and "redirect" in str(err)
    assert len(server.heads) == 1


@pytest.mark.parametrize("announced", [True, False])
def test_more_than_the_limit_is_too_large(
    serve: Callable[..., Server], tmp_path: Path, announced: bool
) -> None:
    body = b"y" * 5000
    # Refused from its Content-Length, or (without one) after reading past the limit.
    server = serve(respond("200 OK", body) if announced else send(b"HTTP/1.1 200 OK\r\n\r\n" + body))
    err = refusal(get(server.url(), limit=100))
    assert err.kind == FetchKind.TOO_LARGE and err.status is None
    assert str(err) == f"{server.url()}: larger than the 100 bytes expected"
    err = refusal(download(server.url(), tmp_path / "out", 100))
    assert err.kind == FetchKind.TOO_LARGE


def test_a_download_shorter_than_its_size_is_truncated(serve: Callable[..., Server], tmp_path: Path) -> None:
    server = serve(respond("200 OK", b"z" * 50))
    err = refusal(download(server.url(), tmp_path / "out", 100))
    assert err.kind == FetchKind.TRUNCATED
    assert str(err) == f"{server.url()}: got 50 bytes, expected 100 (truncated)"
    assert bounded(lambda: fetch.download(server.url(), tmp_path / "out", 100, exact=False)) == (
        hashlib.sha256(b"z" * 50).hexdigest()
    )


@pytest.mark.parametrize("read", READS)
def test_an_answer_cut_short_of_its_content_length_is_truncated(
    serve: Callable[..., Server], tmp_path: Path, read: str
) -> None:
    server = serve(send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"z" * 50))
    err = refusal(reads(tmp_path)[read](server.url()))
    assert err.kind == FetchKind.TRUNCATED


def test_a_broken_chunked_answer_is_refused(serve: Callable[..., Server]) -> None:
    server = serve(send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel"))
    assert refusal(get(server.url())).kind == FetchKind.TRUNCATED


def test_an_answer_that_is_not_http_is_refused(serve: Callable[..., Server]) -> None:
    server = serve(send(b"SSH-2.0-OpenSSH_9.6\r\n"))
    assert refusal(get(server.url())).kind == FetchKind.INTERRUPTED


def test_a_closed_port_is_unreachable() -> None:
    with socket.create_server(("127.0.0.1", 0)) as s:
        port = s.getsockname()[1]
    err = refusal(get(f"http://127.0.0.1:{port}/obj"))
    assert err.kind == FetchKind.UNREACHABLE and str(err).startswith(
        f"cannot fetch http://127.0.0.1:{port}/obj: "
    )


# -- slow retrieval: one deadline for the whole request ------------------------------------------


def deadline_refusal(call: Callable[[], object]) -> FetchError:
    start = time.monotonic()
    err = refusal(call)
    assert err.kind == FetchKind.DEADLINE, err
    assert time.monotonic() - start >= DEADLINE
    return err


@pytest.mark.parametrize("read", READS)
def test_a_trickled_body_is_cut_at_the_deadline(
    serve: Callable[..., Server], tmp_path: Path, read: str
) -> None:
    server = serve(trickle(b"x" * 1000, first=b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"))
    err = deadline_refusal(reads(tmp_path)[read](server.url()))
    assert str(err).startswith(f"cannot fetch {server.url()}: no complete answer within 1s (slow retrieval")


@pytest.mark.parametrize("read", READS)
def test_trickled_headers_are_cut_at_the_deadline(
    serve: Callable[..., Server], tmp_path: Path, read: str
) -> None:
    server = serve(trickle(b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000))
    err = deadline_refusal(reads(tmp_path)[read](server.url()))
    assert str(err) == (
        f"cannot fetch {server.url()}: no complete answer within 1s (slow retrieval; waiting for the headers)"
    )


def test_a_trickled_chunked_answer_is_cut_at_the_deadline(serve: Callable[..., Server]) -> None:
    # Chunk-size lines and trailers are read inside http.client, not by our loop.
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\n"
    server = serve(trickle(b"X-Trailer: " + b"t" * 1000, first=chunked))
    deadline_refusal(get(server.url()))


@pytest.mark.parametrize("read", READS)
def test_a_server_that_never_answers_is_bounded(
    serve: Callable[..., Server], tmp_path: Path, read: str
) -> None:
    server = serve(silent)
    deadline_refusal(reads(tmp_path)[read](server.url()))


@pytest.fixture
def hung_resolver(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """A system resolver that does not answer for names until the event is set (as one
    whose servers are gone takes resolv.conf's timeouts, half a minute and more); an
    address is answered as always. No test here can make the real one hang."""
    answer = threading.Event()
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, *args: Any, **kw: Any) -> Any:
        if kw.get("flags", 0) & socket.AI_NUMERICHOST == 0:
            answer.wait(BOUND * 4)
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield answer
    answer.set()


def test_a_name_lookup_is_held_to_the_deadline(hung_resolver: threading.Event, tmp_path: Path) -> None:
    # localhost: the lookup, once answered, would reach nothing listening on port 9.
    err = deadline_refusal(get("http://localhost:9/obj"))
    assert str(err).endswith("(slow retrieval; connecting)")
    deadline_refusal(download("http://localhost:9/obj", tmp_path / "out", 10))
    start = time.monotonic()
    with pytest.raises(FetchError) as posted:
        bounded(lambda: fetch.post("http://localhost:9/hook", b"{}", {}, timeout=DEADLINE, label="hook"))
    assert posted.value.kind == FetchKind.DEADLINE and time.monotonic() - start >= DEADLINE
    assert str(posted.value) == "hook: no answer within 1s (connecting)"


def test_lookups_left_unanswered_are_bounded_and_then_end(hung_resolver: threading.Event) -> None:
    left = fetch.MAX_LOOKUPS_LEFT
    for _ in range(left):
        refusal(lambda: fetch.get("http://localhost:9/obj", 10, timeout=0.05))
    # No more threads while those still wait: the next fails at once.
    start = time.monotonic()
    err = refusal(get("http://localhost:9/obj"))
    assert err.kind == FetchKind.UNREACHABLE and time.monotonic() - start < DEADLINE
    assert f"{left} name lookups are still unanswered" in str(err)
    hung_resolver.set()
    end = time.monotonic() + BOUND
    while fetch._LOOKUPS.left and time.monotonic() < end:
        time.sleep(0.01)
    assert fetch._LOOKUPS.left == 0
    assert not [t for t in threading.enumerate() if t.name == "name-lookup"]


def test_a_name_is_looked_up_and_reached(serve: Callable[..., Server]) -> None:
    server = serve(respond("200 OK", b"by name"))
    got = bounded(get(server.url().replace("127.0.0.1", "localhost")))
    assert got is not None and got.data == b"by name"


def test_https_reads_and_is_bounded_the_same(serve: Callable[..., Server], tls: ssl.SSLContext) -> None:
    server = serve(respond("200 OK", b"secret"), tls=tls)
    got = bounded(get(server.url()))
    assert got is not None and got.data == b"secret"
    slow = serve(trickle(b"x" * 1000, first=b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n"), tls=tls)
    deadline_refusal(get(slow.url()))
    # The handshake itself never answered.
    mute = serve(silent)
    deadline_refusal(get(mute.url().replace("http:", "https:")))


def test_an_untrusted_certificate_is_unreachable(
    serve: Callable[..., Server], tls: ssl.SSLContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = serve(respond("200 OK", b"secret"), tls=tls)
    monkeypatch.setenv("SSL_CERT_FILE", str(tmp_path / "missing.pem"))
    assert refusal(get(server.url())).kind == FetchKind.UNREACHABLE


# -- local files --------------------------------------------------------------------------------------


@pytest.mark.parametrize("as_url", [True, False])
def test_local_files_read_the_same(tmp_path: Path, as_url: bool) -> None:
    path = tmp_path / "obj"
    path.write_bytes(b"local data")
    target = path.as_uri() if as_url else str(path)
    got = fetch.get(target, 100)
    assert got is not None and got.data == b"local data"
    assert fetch.get(target, 100, since=got.validators) is None
    assert fetch.download(target, tmp_path / "out", 10) == hashlib.sha256(b"local data").hexdigest()
    assert refusal(lambda: fetch.get(target, 5)).kind == FetchKind.TOO_LARGE
    assert refusal(lambda: fetch.download(target, tmp_path / "out", 11)).kind == FetchKind.TRUNCATED
    unreadable = refusal(lambda: fetch.get(str(tmp_path), 100))  # a directory
    assert unreadable.kind == FetchKind.UNREACHABLE and unreadable.status is None


def test_a_missing_local_file_reads_as_a_404(tmp_path: Path) -> None:
    for target in (str(tmp_path / "missing.json"), (tmp_path / "missing.json").as_uri()):
        with pytest.raises(FetchError) as err:
            fetch.get(target, 1024)
        assert (err.value.kind, err.value.status) == (FetchKind.HTTP_STATUS, 404)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_store_directory_entry_that_is_no_regular_file_is_refused_at_once(
    tmp_path: Path, kind: str
) -> None:
    """Opening a FIFO waits for a writer for ever, and no deadline covers a local read:
    an agent polling a directory store hung on one."""
    target = tmp_path / "timestamp.json"
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to("/dev/zero")
    started = time.monotonic()
    with pytest.raises(FetchError, match="not a regular file"):
        fetch.get(str(target), 1 << 20, timeout=5)
    assert time.monotonic() - started < 5
    # A regular file, also behind a symlink, is read as before.
    (tmp_path / "real.json").write_text("{}")
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    got = fetch.get(str(tmp_path / "link.json"), 1 << 20, timeout=5)
    assert got is not None and got.data == b"{}"
