"""Read-only GET routes of the HTTP listener (reconciler.adapters.http): the query they
are handed, and the guard that stands before them but not before the probes."""

from __future__ import annotations

import urllib.error
import urllib.request

from prometheus_client import CollectorRegistry

from reconciler.adapters.http import Request, Response, Server


def fetch(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_a_get_route_gets_its_query_and_the_guard_decides_before_it() -> None:
    seen: list[Request] = []

    def route(req: Request) -> Response:
        seen.append(req)
        return 200, "application/json", b'{"ok": true}\n'

    def guard(req: Request) -> Response | None:
        if req.headers.get("authorization") != "Bearer letmein":
            return 401, "text/plain", b"unauthorized\n"
        return None

    server = Server(
        "127.0.0.1:0",
        CollectorRegistry(),
        lambda: (True, "ok"),
        lambda: (True, "ok"),
        get={"/api/events": route},
        guard=guard,
    )
    server.start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        assert fetch(base + "/api/events?host=web-1") == (401, b"unauthorized\n")
        assert seen == []
        # The probes and /metrics are not behind the guard.
        assert fetch(base + "/healthz")[0] == 200 and fetch(base + "/metrics")[0] == 200
        auth = {"Authorization": "Bearer letmein"}
        status, body = fetch(base + "/api/events?host=web-1&type=a&type=b,c&limit=", auth)
        assert (status, body) == (200, b'{"ok": true}\n')
        (req,) = seen
        assert req.path == "/api/events" and req.client == "127.0.0.1"
        assert req.query == {"host": ["web-1"], "type": ["a", "b,c"], "limit": [""]}
        too_many = "&".join(f"k{i}=v" for i in range(100))
        assert fetch(base + "/api/events?" + too_many, auth)[0] == 400
        assert fetch(base + "/api/nothing", auth)[0] == 404
    finally:
        server.stop()
