"""HTTP endpoints of the daemon: /metrics, /healthz, /readyz."""

from __future__ import annotations

import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from reconciler.errors import ReconcilerError

Check = Callable[[], tuple[bool, str]]
Response = tuple[int, str, bytes]
# A POST handler gets the request's headers and body.
PostHandler = Callable[[dict[str, str], bytes], Response]
# Webhook payloads are a few kilobytes; anything far larger is refused unread.
MAX_BODY = 5 << 20


class Server:
    """A small threaded HTTP server; ``healthy`` and ``ready`` say (ok, reason)."""

    def __init__(
        self,
        listen: str,
        registry: CollectorRegistry,
        healthy: Check,
        ready: Check,
        post: dict[str, PostHandler] | None = None,
    ) -> None:
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        post_routes = post or {}
        routes: dict[str, Callable[[], Response]] = {
            "/metrics": lambda: (200, CONTENT_TYPE_LATEST, generate_latest(registry)),
            "/healthz": lambda: _probe(healthy),
            "/readyz": lambda: _probe(ready),
        }

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                route = routes.get(self.path.split("?", 1)[0])
                self._answer(*(route() if route else (404, "text/plain", b"not found\n")))

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
                    self._answer(*handler({k: v for k, v in self.headers.items()}, body))

            def _answer(self, code: int, ctype: str, body: bytes) -> None:
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes every few seconds would drown the event log

        try:
            self._httpd = ThreadingHTTPServer((host, int(port)), Handler)
        except OSError as exc:
            raise ReconcilerError(f"cannot listen on {listen}: {exc.strerror}") from None
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def _probe(check: Check) -> tuple[int, str, bytes]:
    ok, reason = check()
    return (200 if ok else 503), "text/plain", (reason + "\n").encode()
