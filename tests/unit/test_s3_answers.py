"""S3Store against an S3 endpoint that misbehaves on 127.0.0.1 (a socket server of a
few lines: no SeaweedFS needed to send half an answer): an answer cut short is an
error, not a shorter object, and no request outlasts its deadline however slowly the
service answers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reconciler.adapters.s3 import MAX_REQUESTS_LEFT, S3Credentials, S3Store
from reconciler.errors import StoreError

pytestmark = pytest.mark.usefixtures("no_ambient_aws")

DEADLINE = 1.0
# An answer to a request, given its connection, its head (and a small body) and an
# event set when the test is over.
Answer = Callable[[socket.socket, bytes, threading.Event], None]


@pytest.fixture
def endpoint() -> Iterator[Callable[[Answer], str]]:
    """A server answering every connection with ``answer``; its URL."""
    stop = threading.Event()
    listeners: list[socket.socket] = []

    def serve(answer: Answer) -> str:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def accept() -> None:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return
                head = conn.recv(65536)

                def answered(c: socket.socket = conn, h: bytes = head) -> None:
                    with c:
                        answer(c, h, stop)

                threading.Thread(target=answered, daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        return f"http://127.0.0.1:{listener.getsockname()[1]}"

    yield serve
    stop.set()
    for listener in listeners:
        listener.close()


def store(url: str) -> S3Store:
    return S3Store(
        "fleet", endpoint_url=url, credentials=S3Credentials("AKID", "SECRET"), request_timeout=DEADLINE
    )


def cut_short(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 1280\r\nContent-Type: application/json\r\n\r\n{"ver')


def trickle(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    """Each byte well within a read's timeout; the whole answer never."""
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 100:
        if stop.wait(0.2):
            return
        try:
            conn.sendall(bytes([byte]))
        except OSError:
            return


def test_an_object_cut_short_is_an_error_not_a_shorter_object(endpoint: Callable[[Answer], str]) -> None:
    with pytest.raises(StoreError) as exc:
        store(endpoint(cut_short)).get_bytes("hosts/web-1/latest.json", 1 << 20)
    assert str(exc.value).startswith(
        "cannot read hosts/web-1/latest.json in s3://fleet/ at http://127.0.0.1:"
    )


@pytest.mark.parametrize(
    "request_",
    [
        lambda s: s.get_bytes("hosts/web-1/latest.json", 1 << 20),
        lambda s: s.put_bytes("hosts/web-1/latest.json", b"{}"),
        lambda s: s.size("hosts/web-1/latest.json"),
        lambda s: s.delete("hosts/web-1/latest.json"),
        lambda s: s.list("hosts/"),
    ],
    ids=["get", "put", "stat", "delete", "list"],
)
def test_a_trickled_answer_is_given_up_at_the_deadline(
    endpoint: Callable[[Answer], str], request_: Callable[[S3Store], object]
) -> None:
    s3 = store(endpoint(trickle))
    started = time.monotonic()
    with pytest.raises(StoreError) as exc:
        request_(s3)
    took = time.monotonic() - started
    assert str(exc.value).endswith(f"no complete answer within {DEADLINE:g} s")
    assert DEADLINE <= took < DEADLINE + 2


def silent(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    """No answer at all until the test is over."""
    stop.wait()


def test_requests_left_unanswered_are_bounded(endpoint: Callable[[Answer], str]) -> None:
    # Silent, not trickled: a trickled HEAD is answered whole after 8 s, as long as the
    # eight requests below may take on a loaded machine, and would free its place.
    s3 = store(endpoint(silent))
    for _ in range(MAX_REQUESTS_LEFT):
        with pytest.raises(StoreError):
            s3.size("hosts/web-1/latest.json")
    started = time.monotonic()
    with pytest.raises(StoreError) as exc:
        s3.size("hosts/web-1/latest.json")
    assert time.monotonic() - started < DEADLINE
    assert str(exc.value).endswith(f"{MAX_REQUESTS_LEFT} earlier requests are still unanswered")


def found_then_trickle(conn: socket.socket, head: bytes, stop: threading.Event) -> None:
    """A HEAD answered at once (the object is there, 1 MiB); anything else trickled."""
    if head.startswith(b"HEAD "):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1048576\r\n\r\n")
    else:
        trickle(conn, head, stop)


@pytest.mark.parametrize("transfer", ["upload", "copy"])
def test_a_large_object_s_transfer_is_given_up_at_a_deadline_of_its_size(
    endpoint: Callable[[Answer], str], tmp_path: Path, transfer: str
) -> None:
    s3 = store(endpoint(found_then_trickle))
    blob = tmp_path / "blob"
    blob.write_bytes(b"x" * (1 << 20))
    # A second for each MiB moved, on top of a small object's deadline.
    seconds = DEADLINE + 1
    started = time.monotonic()
    with pytest.raises(StoreError) as exc:
        if transfer == "upload":
            s3.put_file("blobs/sha256/" + "0" * 64, blob)
        else:
            s3.copy("blobs/sha256/" + "0" * 64, "images/web-1-1.aci")
    took = time.monotonic() - started
    assert str(exc.value).endswith(f"no complete answer within {seconds:g} s"), exc.value
    assert seconds <= took < seconds + 2
