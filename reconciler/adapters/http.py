"""HTTP endpoints of the daemon: /metrics, /healthz, /readyz, POST routes such as /webhook
and read-only GET routes such as /api/events.

Anyone who can reach the port can open connections, so no connection may hold a thread
for long and only so many are served at once: the rest are refused on arrival.
"""

from __future__ import annotations

import collections
import contextlib
import io
import ipaddress
import logging
import socket
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from enum import Enum
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, generate_latest

from reconciler import log
from reconciler.errors import ReconcilerError, internal_error

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

Check = Callable[[], tuple[bool, str]]
Response = tuple[int, str, bytes]
# A POST handler gets the request's header fields (fields) and body.
PostHandler = Callable[[dict[str, str], bytes], Response]
# Query parameters a GET route parses at most: a query is a few filters.
MAX_QUERY_FIELDS = 64


@dataclass(frozen=True)
class Request:
    """A GET request to one of the routes a Server is given in ``get``."""

    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # by lower-case name (fields)
    client: str  # the peer's address


def fields(message: Message) -> dict[str, str]:
    """A request's header fields by lower-case name, a field sent more than once as its
    values joined by ", " (RFC 9110, section 5.3). A name is any case, and a dict of
    them as sent would hold "host" beside "Host", or keep the last of two "Host"s, for
    a check that reads one to pass where the other holds what it refuses."""
    out: dict[str, str] = {}
    for name, value in message.items():
        key = name.lower()
        out[key] = f"{out[key]}, {value}" if key in out else value
    return out


GetHandler = Callable[[Request], Response]
# Decides whether a request may reach a ``get`` route (the probes and /metrics are not
# guarded): None serves it, a response refuses it. Where access control goes (a token,
# basic auth) for a listener that is not loopback.
Guard = Callable[[Request], Response | None]
# Webhook payloads are a few kilobytes; anything far larger is refused unread.
MAX_BODY = 5 << 20
# A request (line, headers and body) must have arrived whole this long after the server
# started waiting for it, however it trickles in: a per-read timeout alone lets a client
# that sends a byte every few seconds hold a thread forever. Scrapers, probes and forges
# send a request in milliseconds.
REQUEST_TIMEOUT = 10.0
# A connection that has sent nothing of its request is closed sooner: it holds one of the
# MAX_CONNECTIONS places while doing nothing.
IDLE_TIMEOUT = 5.0
# One write of a response to a client that does not read it blocks no longer than this.
WRITE_TIMEOUT = 10.0
# Connections served at once, each by a thread. Prometheus, probes and a forge need a
# handful; past this, a connection gets a 503 and is closed at once, so a flood costs no
# threads and holds no file descriptors, and the deadlines above free places within seconds.
# Unless a peer holds more than its share: then its oldest connection makes way (a few
# peers at MAX_PER_PEER each would otherwise keep every probe and scraper out).
MAX_CONNECTIONS = 64
# Connections one peer may have served at once (an IPv4 address, or an IPv6 /64, what
# one machine is usually given): else one client, taking each place back as a deadline
# frees it, would keep every probe and scraper out. A forge, Prometheus or a probe needs
# one or two.
MAX_PER_PEER = 16
# The request line and headers of one request, in bytes, at most: http.server alone
# takes 100 header lines of 64 KiB, and copies them as it parses, some tens of MB a
# connection. Clients here send a few hundred bytes. Past this the answer is a 431.
MAX_HEADER_BYTES = 64 << 10
# Connections the kernel holds until the accept loop takes them (Linux caps it at
# net.core.somaxconn, 4096 by default). With the socketserver default of 5, or even 128, a
# burst of connections overflows the queue and the kernel drops SYNs: honest clients then
# wait whole retransmission seconds to connect. A queued connection costs no thread, and
# the accept loop drains the queue fast: those past MAX_CONNECTIONS get no thread either.
LISTEN_BACKLOG = 1024
# Sent, without waiting, to a connection refused at MAX_CONNECTIONS.
BUSY = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
    b"Retry-After: 1\r\nConnection: close\r\n\r\nbusy\n"
)


class Dropped(Enum):
    """Why the HTTP listener closed a connection without answering a request on it."""

    BUSY = "busy"  # refused on arrival: as many connections as allowed were being served
    PEER_BUSY = "peer_busy"  # refused on arrival: its peer had MAX_PER_PEER being served
    DISPLACED = "displaced"  # closed for a newcomer: the pool was full, its peer held most
    TIMEOUT = "timeout"  # its request did not arrive in full before the deadline


def http_connections_dropped(registry: CollectorRegistry) -> Counter:
    """The HTTP listener's counter, on the registry it serves: the daemon's or the agent's."""
    dropped = Counter(
        "reconciler_http_connections_dropped",
        "HTTP connections closed without a request served, by reason.",
        ["reason"],
        registry=registry,
    )
    for reason in Dropped:
        dropped.labels(reason.value)
    return dropped


class Server:
    """A small threaded HTTP server; ``healthy`` and ``ready`` say (ok, reason).

    The limits default to the production values above; tests pass small ones.
    """

    def __init__(
        self,
        listen: str,
        registry: CollectorRegistry,
        healthy: Check,
        ready: Check,
        post: dict[str, PostHandler] | None = None,
        get: dict[str, GetHandler] | None = None,
        *,
        guard: Guard | None = None,
        get_headers: dict[str, str] | None = None,
        challenge: str | None = None,
        max_connections: int = MAX_CONNECTIONS,
        max_per_peer: int = MAX_PER_PEER,
        request_timeout: float = REQUEST_TIMEOUT,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        post_routes = post or {}
        get_routes = get or {}
        # Sent with every answer of a ``get`` route (and of its guard): the fleet page's
        # Content-Security-Policy and the like.
        route_headers = dict(get_headers or {})
        routes: dict[str, Callable[[], Response]] = {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(registry)),
            "/healthz": lambda: _probe(healthy),
            "/readyz": lambda: _probe(ready),
        }
        self._registry = registry
        dropped = http_connections_dropped(registry)
        self._dropped = dropped
        timed_out = dropped.labels(Dropped.TIMEOUT.value)

        class Handler(BaseHTTPRequestHandler):
            def setup(self) -> None:
                super().setup()
                # Replaces the plain socket file, which must be closed or the socket
                # would stay open after the server closes it.
                self.rfile.close()
                self._reader = _RequestReader(self.connection, timed_out.inc)
                self.rfile = io.BufferedReader(self._reader)

            def handle_one_request(self) -> None:
                self._reader.expect_request(idle_timeout, request_timeout)
                super().handle_one_request()

            def parse_request(self) -> bool:
                parsed = super().parse_request()
                # The body is bounded by its Content-Length (MAX_BODY), not by this.
                too_large = self._reader.headers_read()
                if parsed and too_large:
                    self.close_connection = True
                    self._answer(431, "text/plain", b"request header fields too large\n")
                    return False
                return parsed

            def end_headers(self) -> None:
                # The response gets a deadline of its own, not what is left of the request's.
                self.connection.settimeout(WRITE_TIMEOUT)
                super().end_headers()

            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                route = routes.get(path)
                if route is not None:
                    self._answer(*route())
                    return
                handler = get_routes.get(path)
                if handler is None:
                    self._answer(404, "text/plain", b"not found\n")
                    return
                try:
                    params = urllib.parse.parse_qs(
                        query, keep_blank_values=True, strict_parsing=False, max_num_fields=MAX_QUERY_FIELDS
                    )
                except ValueError:
                    self._answer(400, "text/plain", b"too many query parameters\n")
                    return
                request = Request(path, params, fields(self.headers), str(self.client_address[0]))
                refused = guard(request) if guard is not None else None
                headers = route_headers
                if refused is not None and refused[0] == 401 and challenge is not None:
                    # A browser asks for a user and password only when told how.
                    headers = {**route_headers, "WWW-Authenticate": challenge}
                self._answer(*(refused if refused is not None else handler(request)), headers)

            def do_POST(self) -> None:
                handler = post_routes.get(self.path.split("?", 1)[0])
                try:
                    length = int(self.headers.get("Content-Length", ""))
                except ValueError:
                    length = -1
                if handler is None:
                    self._answer(404, "text/plain", b"not found\n")
                elif not 0 <= length <= MAX_BODY:
                    self.close_connection = True
                    self._answer(413 if length > MAX_BODY else 411, "text/plain", b"bad length\n")
                else:
                    body = self.rfile.read(length)
                    if len(body) < length:
                        # The client stopped sending: a cut body is not the request it meant.
                        self.close_connection = True
                        return
                    self._answer(*handler(fields(self.headers), body))

            def _answer(
                self, code: int, ctype: str, body: bytes, headers: dict[str, str] | None = None
            ) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds would drown the event log

        try:
            self._httpd = _Listener((host, int(port)), Handler, max_connections, max_per_peer, dropped)
        except OSError as exc:
            registry.unregister(dropped)
            raise ReconcilerError(f"cannot listen on {listen}: {exc.strerror}") from None
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="http", daemon=True)
        self._stopped = False

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, close the connections being served and return without waiting
        for their threads, which then see the end of their connection."""
        if self._thread.is_alive():
            self._httpd.shutdown()
        self._httpd.server_close()
        self._httpd.close_connections()
        if not self._stopped:
            # A later Server on the same registry (an agent run again) registers its own.
            self._registry.unregister(self._dropped)
            self._stopped = True


class _Listener(ThreadingHTTPServer):
    """ThreadingHTTPServer serving at most ``max_connections`` connections at once."""

    daemon_threads = True
    # stop() closes the connections instead of waiting for their threads.
    block_on_close = False
    request_queue_size = LISTEN_BACKLOG

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        max_connections: int,
        max_per_peer: int,
        dropped: Counter,
    ) -> None:
        self._max_connections = max_connections
        self._max_per_peer = max_per_peer
        self._busy = dropped.labels(Dropped.BUSY.value)
        self._peer_busy = dropped.labels(Dropped.PEER_BUSY.value)
        self._displaced = dropped.labels(Dropped.DISPLACED.value)
        self._lock = threading.Lock()
        # Each connection served, with its peer (_peer); and how many each peer has.
        self._serving: dict[socket.socket, str] = {}
        self._per_peer: collections.Counter[str] = collections.Counter()
        # An IPv6 address ("[::1]:9180") needs an IPv6 socket: the class's is IPv4.
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        peer = _peer(client_address)
        with self._lock:
            peer_full = self._per_peer[peer] >= self._max_per_peer
            full = len(self._serving) >= self._max_connections
            if full and not peer_full and self._displace(peer):
                full = False
            if not (full or peer_full):
                self._serving[request] = peer
                self._per_peer[peer] += 1
        if not (full or peer_full):
            super().process_request(request, client_address)
            return
        (self._busy if full else self._peer_busy).inc()
        try:
            # A fresh connection's send buffer is empty, so this does not block; if it
            # would, the client just sees the connection closed.
            request.setblocking(False)
            request.send(BUSY)
        except OSError:
            pass
        self.shutdown_request(request)

    def _displace(self, newcomer: str) -> bool:
        """Close the oldest connection of the peer holding most, if it holds more than
        one more than ``newcomer`` does: whether one made way (the lock held). Its
        place is free at once; its thread sees the end of its connection."""
        heaviest, most = self._per_peer.most_common(1)[0]
        if most <= self._per_peer[newcomer] + 1:
            return False
        victim = next(conn for conn, peer in self._serving.items() if peer == heaviest)
        del self._serving[victim]
        self._per_peer[heaviest] -= 1
        if not self._per_peer[heaviest]:
            del self._per_peer[heaviest]
        with contextlib.suppress(OSError):
            victim.shutdown(socket.SHUT_RDWR)
        self._displaced.inc()
        return True

    def shutdown_request(self, request: Any) -> None:
        # Closed under the lock, so close_connections never shuts down a descriptor
        # number that a new connection has already been given.
        with self._lock:
            peer = self._serving.pop(request, None)
            if peer is not None:
                self._per_peer[peer] -= 1
                if not self._per_peer[peer]:
                    del self._per_peer[peer]
            super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        # A client that hangs up or resets mid-response is no fault of ours, and the
        # default traceback per connection on stderr would let any client flood the log.
        if exc is None or isinstance(exc, ConnectionError):
            return
        log.event("http_handler_crashed", logging.ERROR, error=internal_error(exc))

    def close_connections(self) -> None:
        with self._lock:
            for conn in self._serving:
                # A connection its client closed already is not an error here.
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)


def _peer(address: Any) -> str:
    """Whose connection this is, for MAX_PER_PEER: its IPv4 address, or its IPv6 /64."""
    host = str(address[0]) if isinstance(address, tuple) else str(address)
    try:
        ip = ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class _RequestReader(io.RawIOBase):
    """The read side of one connection: each read waits only as long as the request being
    read has left, so its deadline holds however slowly the bytes come; and the request
    line and headers get MAX_HEADER_BYTES, past which the reader sees their end."""

    def __init__(self, conn: socket.socket, timed_out: Callable[[], None]) -> None:
        super().__init__()
        self._conn = conn
        self._timed_out = timed_out
        self._first_byte_by = self._complete_by = 0.0
        self._started = False
        # Bytes the request line and headers may still take; None while a body is read.
        self._header_budget: int | None = None
        self._over_budget = False

    def expect_request(self, idle_timeout: float, request_timeout: float) -> None:
        now = time.monotonic()
        self._first_byte_by = now + min(idle_timeout, request_timeout)
        self._complete_by = now + request_timeout
        self._started = False
        self._header_budget, self._over_budget = MAX_HEADER_BYTES, False

    def headers_read(self) -> bool:
        """The headers were parsed: reads go on without the budget. Whether they ran
        past it (what was parsed is then not the whole request)."""
        self._header_budget = None
        return self._over_budget

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: WriteableBuffer) -> int:
        left = (self._complete_by if self._started else self._first_byte_by) - time.monotonic()
        view = memoryview(buffer).cast("B")
        if self._header_budget is not None:
            if self._header_budget <= 0:
                # Seen as the end of the connection; parse_request then answers 431.
                self._over_budget = True
                return 0
            view = view[: self._header_budget]
        try:
            if left <= 0:
                raise TimeoutError("the request did not arrive before its deadline")
            self._conn.settimeout(left)
            n = self._conn.recv_into(view)
        except TimeoutError:
            # http.server drops the connection on TimeoutError; count it once, here.
            self._timed_out()
            raise
        self._started = True
        if self._header_budget is not None:
            self._header_budget -= n
        return n


def local_url(listen: str, path: str) -> str:
    """The URL of ``path`` on a server listening on ``listen`` (HOST:PORT), from this
    machine: a wildcard address is reached through loopback."""
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}{path}"


def post(url: str, headers: dict[str, str], timeout: float = 10.0) -> tuple[int, str]:
    """POST an empty body to ``url``: the answer's status and its first line. A server
    that cannot be reached is a ReconcilerError saying so in one line."""
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=b"", headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, body = int(r.status), r.read(4096)
    except urllib.error.HTTPError as exc:
        status, body = exc.code, exc.read(4096)
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        why = getattr(reason, "strerror", None) or str(reason)
        raise ReconcilerError(f"cannot reach {url}: {why}") from None
    return status, (body.decode("utf-8", "replace").strip().splitlines() or [""])[0]


def _probe(check: Check) -> tuple[int, str, bytes]:
    ok, reason = check()
    return (200 if ok else 503), "text/plain", (reason + "\n").encode()
