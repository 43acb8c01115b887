"""reconciler.adapters.fetch: what a failed read says about why it failed."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from reconciler.adapters import fetch
from reconciler.errors import FetchError, FetchKind


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "there.json").write_bytes(b"{}")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(tmp_path)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def test_an_http_404_carries_its_status(served: str, tmp_path: Path) -> None:
    assert fetch.get(fetch.join(served, "there.json"), 1024, timeout=10) is not None
    with pytest.raises(FetchError) as err:
        fetch.get(fetch.join(served, "missing.json"), 1024, timeout=10)
    assert (err.value.kind, err.value.status) == (FetchKind.HTTP_STATUS, 404)
    with pytest.raises(FetchError) as err:
        fetch.download(fetch.join(served, "missing.json"), tmp_path / "out", 2, timeout=10)
    assert (err.value.kind, err.value.status) == (FetchKind.HTTP_STATUS, 404)


def test_a_missing_local_file_reads_as_a_404(tmp_path: Path) -> None:
    for target in (str(tmp_path / "missing.json"), (tmp_path / "missing.json").as_uri()):
        with pytest.raises(FetchError) as err:
            fetch.get(target, 1024)
        assert (err.value.kind, err.value.status) == (FetchKind.HTTP_STATUS, 404)


def test_a_refused_connection_is_unreachable_without_status() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # Nothing listens on the port now: the connection is refused.
    with pytest.raises(FetchError) as err:
        fetch.get(f"http://127.0.0.1:{port}/x", 1024, timeout=10)
    assert (err.value.kind, err.value.status) == (FetchKind.UNREACHABLE, None)
