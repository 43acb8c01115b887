"""The HTTP listener's limits, on real sockets on 127.0.0.1: request deadlines, a bound on
connections served at once, and a stop() that leaves no connection open."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from reconciler.adapters.http import PostHandler, Server
from tests.conftest import wait_for

# Every wait in these tests is bounded by a socket timeout this long: far above the
# deadlines under test, so a pass means the server acted, a hang means it did not.
WAIT = 10.0


class Echo:
    """A POST route that answers with the body it was given and remembers each call."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def __call__(self, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
        self.bodies.append(body)
        return 200, "application/octet-stream", body


class Running:
    def __init__(self, routes: dict[str, PostHandler] | None = None, **limits: Any) -> None:
        self.registry = CollectorRegistry()
        self.echo = Echo()
        self.server = Server(
            "127.0.0.1:0",
            self.registry,
            lambda: (True, "ok"),
            lambda: (True, "ok"),
            {"/echo": self.echo, **(routes or {})},
            **limits,
        )
        self.server.start()
        self.url = f"http://127.0.0.1:{self.server.port}"
        self.clients: list[socket.socket] = []

    def connect(self, source: str = "127.0.0.1") -> socket.socket:
        """A connection from ``source``: any 127.x.y.z is this machine, a peer of its own."""
        conn = socket.create_connection(
            ("127.0.0.1", self.server.port), timeout=WAIT, source_address=(source, 0)
        )
        self.clients.append(conn)
        return conn

    def get(self, path: str, source: str = "127.0.0.1", headers: bytes = b"") -> bytes:
        conn = self.connect(source)
        conn.sendall(b"GET " + path.encode() + b" HTTP/1.0\r\n" + headers + b"\r\n")
        return until_closed(conn)

    def dropped(self, reason: str) -> float | None:
        return self.registry.get_sample_value("reconciler_http_connections_dropped_total", {"reason": reason})

    def close(self) -> None:
        for conn in self.clients:
            conn.close()
        self.server.stop()


@pytest.fixture
def serve() -> Iterator[type[Running]]:
    started: list[Running] = []

    class Tracked(Running):
        def __init__(self, routes: dict[str, PostHandler] | None = None, **limits: Any) -> None:
            super().__init__(routes, **limits)
            started.append(self)

    yield Tracked
    for running in started:
        running.close()


def until_closed(conn: socket.socket) -> bytes:
    """What the server sent before closing ``conn``; a TimeoutError if it kept it open."""
    received = b""
    for _ in range(1000):
        try:
            chunk = conn.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk
    raise AssertionError("the server kept sending")


def test_a_connection_that_sends_nothing_is_closed_at_the_idle_deadline(serve: type[Running]) -> None:
    running = serve(idle_timeout=0.5, request_timeout=60)
    idle = running.connect()
    assert until_closed(idle) == b""
    assert running.dropped("timeout") == 1


def test_a_request_trickled_in_is_cut_at_the_whole_request_deadline(serve: type[Running]) -> None:
    # One byte every 0.2 s never leaves a read waiting for the idle deadline of 1 s:
    # only a deadline on the whole request stops it.
    running = serve(idle_timeout=1, request_timeout=2)
    slow = running.connect()
    slow.settimeout(0.2)
    request = b"GET /metrics HTTP/1.0\r\nX-Slow: " + b"a" * 60
    for sent in range(len(request)):
        try:
            slow.send(request[sent : sent + 1])
            if not slow.recv(1):
                break
        except TimeoutError:
            continue  # still open: trickle on
        except (ConnectionResetError, BrokenPipeError):
            break
    else:
        raise AssertionError(f"a request trickled in over {len(request) * 0.2:.0f}s was never cut")
    assert running.dropped("timeout") == 1


def test_connections_past_the_bound_are_refused_until_the_deadline_frees_places(
    serve: type[Running],
) -> None:
    running = serve(max_connections=4, idle_timeout=2, request_timeout=3)
    holders = [running.connect() for _ in range(4)]
    # The kernel completes connections in order and the server takes them in order, so
    # the four holders have the places when these arrive.
    for _ in range(6):
        refused = running.connect()
        assert until_closed(refused).startswith(b"HTTP/1.0 503 "), "a connection past the bound was served"
    assert running.dropped("busy") == 6
    for holder in holders:
        assert until_closed(holder) == b""
    with urllib.request.urlopen(running.url + "/metrics", timeout=WAIT) as r:
        assert r.status == 200
        metrics = r.read().decode()
    assert 'reconciler_http_connections_dropped_total{reason="busy"} 6.0' in metrics
    assert 'reconciler_http_connections_dropped_total{reason="timeout"} 4.0' in metrics


def test_one_peer_holding_its_share_of_places_leaves_the_others_served(serve: type[Running]) -> None:
    """Else a client that takes every place back as a deadline frees it would keep
    probes and scrapers out for as long as it likes."""
    running = serve(max_connections=8, max_per_peer=3, idle_timeout=5, request_timeout=5)
    holders = [running.connect("127.0.0.2") for _ in range(3)]
    refused = running.connect("127.0.0.2")
    assert until_closed(refused).startswith(b"HTTP/1.0 503 ")
    assert running.dropped("peer_busy") == 1 and running.dropped("busy") == 0
    # Another address, as a probe or Prometheus comes from, is served at once.
    assert running.get("/healthz", "127.0.0.3").startswith(b"HTTP/1.0 200 ")
    # The peer's places come back as its connections end.
    holders[0].close()
    wait_for(lambda: running.get("/healthz", "127.0.0.2").startswith(b"HTTP/1.0 200 "), WAIT, "a place")


def test_a_few_peers_holding_every_place_make_way_for_another(serve: type[Running]) -> None:
    """Each within its share, two peers (or four at the daemon's 64 and 16) held every
    place: a probe or Prometheus from elsewhere got 503 for as long as they liked."""
    running = serve(max_connections=8, max_per_peer=4, idle_timeout=5, request_timeout=5)
    first = [running.connect("127.0.0.2") for _ in range(4)]
    second = [running.connect("127.0.0.3") for _ in range(4)]
    assert running.get("/healthz", "127.0.0.4").startswith(b"HTTP/1.0 200 ")
    assert running.dropped("displaced") == 1 and running.dropped("busy") == 0
    # The oldest connection of a peer holding most made way; the others are still open.
    assert until_closed(first[0]) == b""
    for held in [*first[1:], *second]:
        held.setblocking(False)
        with pytest.raises(BlockingIOError):
            held.recv(1)
    # A peer holding no more than one over the newcomer's count keeps its places.
    for _ in range(2):
        running.connect("127.0.0.4")
    crowded = running.connect("127.0.0.4")
    assert until_closed(crowded).startswith(b"HTTP/1.0 503 ")


def test_headers_past_their_bound_are_answered_431_and_not_kept(serve: type[Running]) -> None:
    running = serve()
    # 40 KiB of headers is under the bound (64 KiB); 120 KiB is not, though each line is
    # under http.server's own 64 KiB a line and the count under its 100 lines.
    line = b"X-Big: " + b"a" * (40 << 10) + b"\r\n"
    assert running.get("/healthz", headers=line).startswith(b"HTTP/1.0 200 ")
    answer = running.get("/healthz", headers=line * 3)
    assert answer.startswith(b"HTTP/1.0 431 "), answer[:80]
    big = running.connect()
    big.sendall(b"POST /echo HTTP/1.0\r\n" + line * 3 + b"Content-Length: 2\r\n\r\nhi")
    assert until_closed(big).startswith(b"HTTP/1.0 431 ")
    assert running.echo.bodies == []


def test_a_post_with_a_body_is_answered(serve: type[Running]) -> None:
    running = serve()
    body = b'{"ref": "refs/heads/main"}' * 100
    req = urllib.request.Request(running.url + "/echo", data=body, method="POST")
    with urllib.request.urlopen(req, timeout=WAIT) as r:
        assert (r.status, r.read()) == (200, body)
    with urllib.request.urlopen(running.url + "/healthz", timeout=WAIT) as r:
        assert (r.status, r.read()) == (200, b"ok\n")
    assert running.echo.bodies == [body]
    assert running.dropped("timeout") == running.dropped("busy") == 0


def test_a_body_cut_short_is_not_handed_to_the_route(serve: type[Running]) -> None:
    running = serve()
    cut = running.connect()
    cut.sendall(b"POST /echo HTTP/1.0\r\nContent-Length: 100\r\n\r\n" + b"x" * 50)
    cut.shutdown(socket.SHUT_WR)
    assert until_closed(cut) == b""
    assert running.echo.bodies == []


def test_stop_returns_and_closes_the_connections_still_open(serve: type[Running]) -> None:
    # Deadlines far beyond WAIT: only stop() can close these in time.
    running = serve(idle_timeout=60, request_timeout=60)
    idle = running.connect()
    partial = running.connect()
    partial.sendall(b"GET /metrics HTTP/1.0\r\nX-Partial: ")
    stopper = threading.Thread(target=running.server.stop)
    stopper.start()
    stopper.join(WAIT)
    assert not stopper.is_alive(), "stop() waited on open connections"
    for conn in (idle, partial):
        assert until_closed(conn) == b""
    # The listener's counter left the registry with it: a new listener can serve it.
    again = Server("127.0.0.1:0", running.registry, lambda: (True, "ok"), lambda: (True, "ok"))
    again.stop()


def test_clients_that_reset_leave_no_traceback_and_a_crashing_route_one_event(
    serve: type[Running], capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    called, release = threading.Event(), threading.Event()

    def slow(headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
        called.set()
        release.wait(WAIT)
        return 200, "text/plain", b"x" * (1 << 20)

    def crash(headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
        raise RuntimeError("a bug in a route")

    running = serve({"/slow": slow, "/crash": crash})
    # Threads of earlier tests may still end meanwhile: at most as many as before.
    threads = threading.active_count()
    for _ in range(3):
        called.clear()
        reset = running.connect()
        reset.sendall(b"POST /slow HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
        assert called.wait(WAIT)
        # Closing with a zero linger resets the connection under the response.
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset.close()
        release.set()
        wait_for(lambda: threading.active_count() <= threads, WAIT, "the handler to finish")
        release.clear()
    crashing = running.connect()
    crashing.sendall(b"POST /crash HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
    with caplog.at_level(logging.INFO, logger="reconciler"):
        assert until_closed(crashing) == b""
        wait_for(lambda: threading.active_count() <= threads, WAIT, "the handler to finish")
    assert "Traceback" not in capfd.readouterr().err
    assert [r.getMessage() for r in caplog.records] == ["http_handler_crashed"]


def test_an_ipv6_address_is_listened_on() -> None:
    """The configuration takes [::1]:PORT; the listener's socket was IPv4 whatever."""
    server = Server("[::1]:0", CollectorRegistry(), lambda: (True, "ok"), lambda: (True, "ok"))
    server.start()
    try:
        with urllib.request.urlopen(f"http://[::1]:{server.port}/healthz", timeout=WAIT) as r:
            assert r.status == 200
    finally:
        server.stop()
