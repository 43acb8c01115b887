"""The wait for a release to become healthy, and the URL probe (reconciler.agent.health)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from reconciler.agent.config import HealthConfig
from reconciler.agent.health import probe, wait_healthy
from tests.conftest import free_port

CHECK = HealthConfig(command=("probe",), timeout=30.0, interval=1.0)


class Ticks:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_service_that_died_ends_the_wait_at_once() -> None:
    """The app's supervisor saw a service fail: no later probe can pass, so the
    rollback need not wait out the timeout."""
    ticks, reports = Ticks(), iter([None, None, "service web exited with status 1"])
    probes: list[float] = []

    def probe(h: HealthConfig) -> str:
        probes.append(ticks.now)
        return "connection refused"

    assert wait_healthy(CHECK, ticks, lambda: next(reports), probe) == "service web exited with status 1"
    assert probes == [0.0, 1.0] and ticks.now == 2.0


def test_a_probe_that_keeps_failing_fails_after_the_timeout() -> None:
    ticks = Ticks()
    assert wait_healthy(CHECK, ticks, lambda: None, lambda h: "answered 500") == (
        "health check failed for 30s: answered 500"
    )
    assert ticks.now == 30.0


def test_healthy_once_a_probe_passes() -> None:
    ticks, answers = Ticks(), iter(["refused", ""])
    assert wait_healthy(CHECK, ticks, lambda: None, lambda h: next(answers)) is None


# -- the URL probe, against real servers on 127.0.0.1 -------------------------------------------


class _Answers(BaseHTTPRequestHandler):
    paths: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        _Answers.paths.append(self.path)
        status = {"/ok": 204, "/moved": 302, "/broken": 500}.get(self.path, 200)
        self.send_response(status)
        if status == 302:
            self.send_header("Location", "/broken")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def app() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    _Answers.paths.clear()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def test_a_url_probe_passes_on_2xx_and_3xx_and_follows_no_redirect(app: str) -> None:
    assert probe(HealthConfig(url=f"{app}/ok", timeout=5.0)) == ""
    assert probe(HealthConfig(url=f"{app}/moved", timeout=5.0)) == ""
    assert probe(HealthConfig(url=f"{app}/broken", timeout=5.0)) == f"{app}/broken answered 500"
    assert _Answers.paths == ["/ok", "/moved", "/broken"]
    refused = probe(HealthConfig(url=f"http://127.0.0.1:{free_port()}/", timeout=5.0))
    assert "refused" in refused and refused.endswith("(connecting)")


def test_an_app_answering_a_byte_at_a_time_is_given_up_at_the_probe_s_deadline() -> None:
    """Each byte comes well within a read's timeout; the probe must end anyway, or the
    wait for health (and the rollback after it) would last as long as the trickle."""
    stop = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as listener:

        def trickle() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100:
                    if stop.wait(0.2):
                        return
                    conn.sendall(bytes([byte]))

        threading.Thread(target=trickle, daemon=True).start()
        started = time.monotonic()
        said = probe(HealthConfig(url=f"http://127.0.0.1:{listener.getsockname()[1]}/", timeout=1.0))
        took = time.monotonic() - started
        stop.set()
    assert "no answer within 1s" in said
    assert 0.9 <= took < 3.0
