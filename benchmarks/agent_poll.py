"""Bytes on the wire per agent poll: the first (installing) poll against idle ones.

Publishes the demo fleet (`reconciler init` + one reconcile), serves the store
over HTTP on 127.0.0.1 from a server that counts every byte it reads and writes
on its sockets (requests and answers, headers included), and polls as web-1's
agent. An idle poll should be one conditional GET answered 304.

    python3 benchmarks/agent_poll.py [--polls 20]
"""

from __future__ import annotations

import argparse
import io
import socket
import sys
import tempfile
import threading
import time
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reconciler.adapters.gpg import Signer  # noqa: E402
from reconciler.agent.config import load_agent_config  # noqa: E402
from reconciler.config import load_config  # noqa: E402
from reconciler.demo import init  # noqa: E402
from reconciler.wiring import open_agent, open_reconciler  # noqa: E402


class Counter:
    def __init__(self) -> None:
        self.bytes = 0
        self.requests = 0
        self.lock = threading.Lock()

    def add(self, n: int) -> None:
        with self.lock:
            self.bytes += n


class CountingSocket:
    """A socket whose reads and writes are counted."""

    def __init__(self, sock: socket.socket, counter: Counter) -> None:
        self._sock = sock
        self._counter = counter

    def recv_into(self, buf: Any, *args: Any) -> int:
        n = self._sock.recv_into(buf, *args)
        self._counter.add(n)
        return n

    def sendall(self, data: Any, *args: Any) -> None:
        self._counter.add(len(data))
        self._sock.sendall(data, *args)

    def send(self, data: Any, *args: Any) -> int:
        n = self._sock.send(data, *args)
        self._counter.add(n)
        return n

    def makefile(self, mode: str, *args: Any, **kwargs: Any) -> Any:
        assert "r" in mode, "the handler writes with sendall"
        return io.BufferedReader(socket.SocketIO(self, "r"))  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


def serve(root: Path, counter: Counter) -> ThreadingHTTPServer:
    class Handler(SimpleHTTPRequestHandler):
        def setup(self) -> None:
            # StreamRequestHandler reads through makefile() and writes with sendall().
            self.request = CountingSocket(self.request, counter)
            super().setup()

        def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
            counter.requests += 1

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--polls", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="reconciler-poll-bench-") as tmp:
        work = Path(tmp)
        cfg = load_config(init(work / "demo"))
        rec = open_reconciler(cfg)
        try:
            assert rec.reconcile().ok
        finally:
            rec.close()
        key = work / "publisher.asc"
        key.write_bytes(Signer(cfg.signing.gnupghome, cfg.signing.key).public_key())
        counter = Counter()
        httpd = serve(cfg.store.path, counter)
        agent_cfg = work / "agent.yaml"
        agent_cfg.write_text(
            yaml.safe_dump(
                {
                    "host": "web-1",
                    "store": f"http://127.0.0.1:{httpd.server_address[1]}",
                    "keys": [str(key)],
                    "state_dir": str(work / "agent"),
                }
            )
        )
        agent = open_agent(load_agent_config(agent_cfg))
        # Validators younger than two seconds are not trusted (HTTP dates have
        # one-second resolution); a real publish happened long before the poll.
        time.sleep(2.1)
        first = agent.poll()
        install_bytes, install_requests = counter.bytes, counter.requests
        results = []
        for _ in range(args.polls):
            before = counter.bytes, counter.requests
            results.append(agent.poll())
            results[-1] += f":{counter.bytes - before[0]}:{counter.requests - before[1]}"
        httpd.shutdown()
    idle = [int(r.split(":")[1]) for r in results]
    requests = {int(r.split(":")[2]) for r in results}
    print(f"first poll ({first}): {install_bytes:,} bytes in {install_requests} requests")
    print(f"idle polls: {sorted({r.split(':')[0] for r in results})}, {requests} request(s) each")
    print(f"bytes per idle poll: min {min(idle)}, max {max(idle)}, mean {sum(idle) / len(idle):.0f}")
    print(f"ratio idle/install: {sum(idle) / len(idle) / install_bytes:.6f}")
    ok = all(r.startswith("idle:") for r in results) and requests == {1} and max(idle) < 1024
    print(f"{'PASS' if ok else 'FAIL'}  an idle poll is one conditional request under 1 KiB, no download")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
