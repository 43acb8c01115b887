"""POST with one deadline (reconciler.adapters.fetch.post), against real servers on 127.0.0.1:
an answer, an error status with Retry-After, nobody listening, and a server that never answers."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from reconciler.adapters.fetch import post
from reconciler.errors import FetchError, FetchKind
from tests.conftest import free_port


class Handler(BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, dict[str, str], bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Handler.received.append((self.path, dict(self.headers.items()), body))
        if self.path == "/busy":
            self.send_response(503)
            self.send_header("Retry-After", "7")
        elif self.path == "/odd":
            # A digit to str.isdigit(), not to float().
            self.send_response(200)
            self.send_header("Retry-After", "\u00b2")
        else:
            self.send_response(201)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_post_is_sent_and_its_status_returned(server: str) -> None:
    Handler.received.clear()
    answer = post(server + "/repos/a/b/statuses/c?x=1", b'{"state":"success"}', {"X-Test": "1"}, 5.0)
    assert (answer.status, answer.retry_after) == (201, None)
    ((path, headers, body),) = Handler.received
    assert path == "/repos/a/b/statuses/c?x=1" and body == b'{"state":"success"}'
    assert headers["X-Test"] == "1" and headers["User-Agent"] == "reconciler"
    busy = post(server + "/busy", b"{}", {}, 5.0)
    assert (busy.status, busy.retry_after) == (503, 7.0)
    # An odd header does not turn the answer it came with into a failure.
    odd = post(server + "/odd", b"{}", {}, 5.0)
    assert (odd.status, odd.retry_after) == (200, None)


def test_nobody_listening_is_an_error_naming_the_label_not_the_url() -> None:
    url = f"http://127.0.0.1:{free_port()}/services/SECRET"
    with pytest.raises(FetchError) as exc:
        post(url, b"{}", {}, 5.0, label="chat")
    assert exc.value.kind == FetchKind.UNREACHABLE
    assert str(exc.value).startswith("chat: ") and "SECRET" not in str(exc.value)


def test_a_server_that_never_answers_is_given_up_at_the_deadline() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    accepted: list[socket.socket] = []

    def accept() -> None:
        conn, _ = listener.accept()
        accepted.append(conn)
        # Reads the request, then answers one byte of a status line, and nothing more.
        conn.recv(65536)
        conn.sendall(b"H")

    threading.Thread(target=accept, daemon=True).start()
    started = time.monotonic()
    with pytest.raises(FetchError) as exc:
        post(f"http://127.0.0.1:{listener.getsockname()[1]}/", b"{}", {}, 1.0, label="hook")
    took = time.monotonic() - started
    assert exc.value.kind == FetchKind.DEADLINE and "no answer within 1s" in str(exc.value)
    assert 0.9 <= took < 3.0
    for conn in accepted:
        conn.close()
    listener.close()
