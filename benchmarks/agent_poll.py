"""Bytes on the wire per agent poll at fleet scale, through Python's http.server and nginx.

Publishes N hosts (default 10,000) without Nix: each host gets a release naming one
small appimage blob, written in publication order (reconciler.daemon.publish), then
the TUF metadata lists them all (reconciler.daemon.tuf, 256 hash bins by default),
signed with a real gpg key. The store is served by Python's http.server and by nginx
with the shipped deploy/nginx/store.conf, each behind a TCP proxy that counts every
byte both ways, headers included (urllib opens one connection per request, so a
connection is a request). Three agents per server poll:

    affected     the host that publishes a new version half-way through
    same bin     another host listed in the same TUF bin as the affected one
    other bin    a host in another bin

Figures and targets:
  (1) the first (installing) poll of each agent;
  (2) an idle poll: one conditional GET answered 304, under 1 KiB;
  (3) after one other host publishes: an unaffected agent's poll under 20 KiB;
  (4) the affected agent's poll: its metadata overhead (all but the release file and
      the blob) beside its artifact.

    python3 benchmarks/agent_poll.py [--hosts 10000] [--artifact-bytes 4096] [--polls 5]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from securesystemslib.signer import Key, Signature
from securesystemslib.signer import Signer as MetadataSigner

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reconciler.adapters.clock import SystemClock  # noqa: E402
from reconciler.adapters.store import FilesystemStore  # noqa: E402
from reconciler.adapters.tufkeys import TufSigner  # noqa: E402
from reconciler.agent.config import AgentConfig  # noqa: E402
from reconciler.agent.updater import Agent  # noqa: E402
from reconciler.config import TufConfig  # noqa: E402
from reconciler.core import tufrepo  # noqa: E402
from reconciler.core.layout import BLOB_PREFIX  # noqa: E402
from reconciler.core.release import Artifact, new_release  # noqa: E402
from reconciler.daemon.publish import publish  # noqa: E402
from reconciler.daemon.tuf import TufRepository  # noqa: E402
from reconciler.demo import KeyType, make_signing_key  # noqa: E402
from reconciler.wiring import open_agent  # noqa: E402

IDLE_LIMIT = 1024
UNAFFECTED_LIMIT = 20 * 1024
NGINX_CONF = ROOT / "deploy" / "nginx" / "store.conf"
# The agents no longer read .asc files (TUF metadata carries the trust); publish()
# still writes them, so they are filled with this stand-in instead of a gpg signature.
STAND_IN_ASC = b"-----BEGIN PGP SIGNATURE-----\nstand-in: not read by agents\n-----END PGP SIGNATURE-----\n"


# -- counting ---------------------------------------------------------------------------


@dataclass
class Request:
    """One connection through the proxy: one HTTP request and its answer."""

    line: str = ""
    status: int = 0
    sent: int = 0  # by the agent: request line, headers
    received: int = 0  # by the agent: status line, headers, body

    @property
    def total(self) -> int:
        return self.sent + self.received

    @property
    def path(self) -> str:
        parts = self.line.split()
        return parts[1] if len(parts) > 1 else ""


class CountingProxy:
    """A TCP proxy on 127.0.0.1 that counts the bytes of each connection both ways
    before passing them on, so that a poll that returned has been counted whole."""

    def __init__(self, upstream: int) -> None:
        self.upstream = upstream
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._stopping = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopping:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        req = Request()
        with self._lock:
            self.requests.append(req)
        with client, socket.create_connection(("127.0.0.1", self.upstream), timeout=30) as server:

            def up(data: bytes) -> None:
                if not req.line:
                    req.line = data.split(b"\r\n", 1)[0].decode(errors="replace")
                req.sent += len(data)

            def down(data: bytes) -> None:
                if not req.status:
                    m = re.match(rb"HTTP/\d\.\d (\d{3})", data)
                    req.status = int(m.group(1)) if m else -1
                req.received += len(data)

            t = threading.Thread(target=self._pump, args=(client, server, up), daemon=True)
            t.start()
            self._pump(server, client, down)
            t.join(30)

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, count: Callable[[bytes], None]) -> None:
        try:
            while data := src.recv(1 << 16):
                count(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            with suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    def mark(self) -> int:
        with self._lock:
            return len(self.requests)

    def since(self, mark: int) -> list[Request]:
        with self._lock:
            return list(self.requests[mark:])

    def close(self) -> None:
        self._stopping = True
        self._listener.close()


# -- servers ----------------------------------------------------------------------------


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def python_server(store: Path) -> Iterator[int]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(QuietHandler, directory=str(store)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(httpd.server_address[1])
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nginx_conf(work: Path, store: Path, port: int) -> Path:
    """deploy/nginx/store.conf as shipped, but on 127.0.0.1:port serving ``store``, its
    access log (with nginx's own byte counts) in ``work``."""
    server = NGINX_CONF.read_text()
    server = re.sub(r"^\s*listen\s+\[::\][^;]*;\n", "", server, flags=re.M)
    server = re.sub(r"^(\s*)listen\s+[^;]*;", rf"\g<1>listen 127.0.0.1:{port};", server, flags=re.M)
    server = re.sub(r"^(\s*)root\s+[^;]*;", rf"\g<1>root {store};", server, flags=re.M)
    server = re.sub(
        r"^(\s*)access_log\s+[^;]*;", rf"\g<1>access_log {work}/access.log bytes;", server, flags=re.M
    )
    server = re.sub(r"^(\s*)error_log\s+[^;]*;", rf"\g<1>error_log {work}/error.log;", server, flags=re.M)
    (work / "server.conf").write_text(server)
    temp = " ".join(
        f"{k}_temp_path {work}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = work / "nginx.conf"
    conf.write_text(
        f"daemon off;\nmaster_process off;\npid {work}/nginx.pid;\nerror_log {work}/error.log;\n"
        "events { worker_connections 64; }\n"
        f"http {{\n  {temp}\n"
        "  log_format bytes '$status $request_length $bytes_sent $request_uri';\n"
        f"  include {work}/server.conf;\n}}\n"
    )
    return conf


@contextmanager
def nginx_server(work: Path, store: Path) -> Iterator[int]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    work.mkdir()
    port = free_port()
    conf = nginx_conf(work, store, port)
    checked = subprocess.run([nginx, "-t", "-c", str(conf), "-p", str(work)], capture_output=True, text=True)
    if checked.returncode != 0:
        raise SystemExit(f"nginx refuses {NGINX_CONF}: {checked.stderr.strip()}")
    proc = subprocess.Popen(
        [nginx, "-c", str(conf), "-p", str(work)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/tuf/timestamp.json", timeout=5):
                    break
            except (OSError, urllib.error.URLError):
                if time.monotonic() > deadline or proc.poll() is not None:
                    log = (work / "error.log").read_text()
                    raise SystemExit(f"nginx did not serve /tuf/timestamp.json: {log}") from None
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def nginx_logged(work: Path, skip: int, expect: int) -> list[tuple[int, int, int, str]]:
    """nginx's access log lines after the first ``skip`` (status, request_length,
    bytes_sent, uri), waiting for ``expect`` of them: nginx logs after it has sent."""
    deadline = time.monotonic() + 5
    while True:
        lines = (work / "access.log").read_text().splitlines()[skip:]
        if len(lines) >= expect or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    out = []
    for line in lines:
        status, length, sent, uri = line.split(" ", 3)
        out.append((int(status), int(length), int(sent), uri))
    return out


# -- publishing -------------------------------------------------------------------------


class CountingSigner(MetadataSigner):
    """The publisher's gpg signer of TUF metadata, counting its signatures."""

    def __init__(self, inner: MetadataSigner) -> None:
        self.inner = inner
        self.count = 0

    @classmethod
    def from_priv_key_uri(
        cls, priv_key_uri: str, public_key: Key, secrets_handler: Any = None
    ) -> CountingSigner:
        raise NotImplementedError

    @property
    def public_key(self) -> Key:
        return self.inner.public_key

    def sign(self, payload: bytes) -> Signature:
        self.count += 1
        return self.inner.sign(payload)


def stand_in_asc(_: object) -> bytes:
    return STAND_IN_ASC


class Publisher:
    def __init__(self, work: Path, artifact_bytes: int) -> None:
        self.store_dir = work / "store"
        self.store = FilesystemStore(self.store_dir)
        self.files = work / "artifacts"
        self.files.mkdir()
        self.artifact_bytes = artifact_bytes
        self.gnupghome = work / "gnupg"
        # Ed25519, as when the README's figures were taken: an RSA 3072 signature (the
        # demo's default) makes each signed TUF file some 640 bytes larger and slower to sign.
        fingerprint = make_signing_key(self.gnupghome, key_type=KeyType.ED25519)
        gpg = TufSigner(self.gnupghome, fingerprint)
        self.public_key = work / "publisher.asc"
        self.public_key.write_bytes(gpg.public_key())
        self.signer = CountingSigner(gpg.metadata_signer())
        self.tuf = TufRepository(self.store, work / "tuf", lambda: self.signer, SystemClock(), TufConfig())
        self.versions: dict[str, int] = {}
        # Every write is dated by step, a minute apart and in the past: the agents trust
        # no validator younger than two seconds, and two steps within one second would
        # otherwise share a Last-Modified.
        self.epoch = time.time() - 3600
        self.step = 0

    def release(self, host: str, version: int) -> None:
        # Distinct bytes per host and version, as builds are: a blob per release.
        seed = hashlib.sha256(f"{host}/{version}".encode()).digest()
        data = (seed * (self.artifact_bytes // len(seed) + 1))[: self.artifact_bytes]
        path = self.files / f"{host}.AppImage"
        path.write_bytes(data)
        art = Artifact("appimage", f"{host}.AppImage", len(data), hashlib.sha256(data).hexdigest())
        rel = new_release(
            host,
            version,
            hashlib.sha1(seed).hexdigest(),
            f"/nix/store/{seed.hex()[:32]}-{host}.drv",
            (art,),
            datetime.now(UTC),
            timedelta(days=30),
        )
        publish(self.store, rel, {"appimage": path}, stand_in_asc, stand_in_asc)
        path.unlink()
        self.versions[host] = version

    def sync(self) -> None:
        self.tuf.sync(self.versions)
        self.date_writes()

    def date_writes(self) -> None:
        """Date what this step wrote (anything newer than the last step) at this step."""
        stamp = self.epoch + 60 * self.step
        self.step += 1
        for dirpath, _, names in os.walk(self.store_dir):
            for name in names:
                p = os.path.join(dirpath, name)
                if os.stat(p).st_mtime > stamp:
                    os.utime(p, (stamp, stamp))

    def close(self) -> None:
        subprocess.run(
            ["gpgconf", "--homedir", str(self.gnupghome), "--kill", "gpg-agent"],
            capture_output=True,
            check=False,
        )


# -- polling ----------------------------------------------------------------------------


@dataclass
class Poll:
    result: str
    requests: list[Request]
    logged: list[tuple[int, int, int, str]] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(r.total for r in self.requests)

    def part(self, kind: str) -> list[Request]:
        return [r for r in self.requests if classify(r.path) == kind]

    def bytes_of(self, kind: str) -> int:
        return sum(r.total for r in self.part(kind))


def classify(path: str) -> str:
    if path.startswith("/" + BLOB_PREFIX):
        return "blob"
    if "/releases/" in path:
        return "release"
    return "metadata"


class Bench:
    def __init__(self, name: str, url: str, proxy: CountingProxy, nginx_work: Path | None) -> None:
        self.name = name
        self.url = url
        self.proxy = proxy
        self.nginx_work = nginx_work
        self.logged = 0

    def poll(self, agent: Agent) -> Poll:
        mark = self.proxy.mark()
        result = str(agent.poll())
        got = Poll(result, self.proxy.since(mark))
        if self.nginx_work is not None:
            got.logged = nginx_logged(self.nginx_work, self.logged, len(got.requests))
            self.logged += len(got.logged)
        return got


def agent_for(work: Path, host: str, store: str, key: Path) -> Agent:
    cfg = AgentConfig(
        path=work / f"{host}.yaml", host=host, store=store, keys=(key,), state_dir=work / host, timeout=30.0
    )
    return open_agent(cfg)


def kib(n: int) -> str:
    return f"{n:,} B ({n / 1024:.1f} KiB)" if n >= 1024 else f"{n:,} B"


def row(label: str, text: str) -> None:
    print(f"{label + ':':<34} {text}")


def describe(p: Poll) -> str:
    return f"{kib(p.total)} in {len(p.requests)} request(s), {p.result}"


# -- the run ----------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=10_000)
    ap.add_argument("--artifact-bytes", type=int, default=4096, help="size of each host's artifact")
    ap.add_argument("--polls", type=int, default=5, help="idle polls per agent")
    ap.add_argument(
        "--dir",
        type=Path,
        default=Path("/dev/shm") if Path("/dev/shm").is_dir() else None,
        help="where the store is written (default: /dev/shm, where fsync costs nothing)",
    )
    args = ap.parse_args()
    if args.hosts < 3:
        ap.error("--hosts must be at least 3")
    checks: list[tuple[bool, str]] = []

    def check(ok: bool, what: str) -> None:
        checks.append((ok, what))

    with tempfile.TemporaryDirectory(prefix="reconciler-poll-bench-", dir=args.dir) as tmp:
        work = Path(tmp)
        pub = Publisher(work, args.artifact_bytes)
        try:
            hosts = [f"host-{i:05d}" for i in range(args.hosts)]
            t0 = time.perf_counter()
            for h in hosts:
                pub.release(h, 1)
            t1 = time.perf_counter()
            pub.sync()
            t2 = time.perf_counter()
            signed_first = pub.signer.count
            bins = tufrepo.succinct(pub.tuf.load().targets.signed)
            tmpfs = (
                " (tmpfs: the times leave out a disk's fsyncs)" if str(work).startswith("/dev/shm") else ""
            )
            print(f"store: {args.hosts:,} hosts, {bins.number_of_bins} TUF bins, in {work}{tmpfs}")
            print(
                f"publish: {args.hosts:,} releases (blob, release file, latest.json) in {t1 - t0:.1f} s; "
                f"TUF sync in {t2 - t1:.1f} s ({signed_first} metadata files signed with gpg)"
            )
            print(
                "  .asc files hold a stand-in, not a gpg signature: agents verify TUF metadata only"
                " and never read them"
            )

            affected = hosts[0]
            role = bins.get_role_for_target(tufrepo.target_path(affected))
            same = next(h for h in hosts[1:] if bins.get_role_for_target(tufrepo.target_path(h)) == role)
            other = next(h for h in hosts[1:] if bins.get_role_for_target(tufrepo.target_path(h)) != role)
            agents = {"affected": affected, "same bin": same, "other bin": other}
            print(f"agents: affected {affected} and same bin {same} ({role}), other bin {other}")

            with (
                python_server(pub.store_dir) as py_port,
                nginx_server(work / "nginx", pub.store_dir) as ng_port,
            ):
                benches = []
                for name, port, nginx_work in (
                    ("http.server", py_port, None),
                    ("nginx", ng_port, work / "nginx"),
                ):
                    proxy = CountingProxy(port)
                    benches.append(Bench(name, f"http://127.0.0.1:{proxy.port}", proxy, nginx_work))
                key = pub.public_key
                polls: dict[tuple[str, str], dict[str, Any]] = {}
                running: dict[tuple[str, str], Agent] = {}
                for b in benches:
                    for label, host in agents.items():
                        agent = agent_for(work / "agents" / b.name, host, b.url, key)
                        running[b.name, label] = agent
                        first = b.poll(agent)
                        idle = [b.poll(agent) for _ in range(args.polls)]
                        polls[b.name, label] = {"first": first, "idle": idle}

                t3 = time.perf_counter()
                pub.release(affected, 2)
                before = pub.signer.count
                pub.sync()
                t4 = time.perf_counter()
                print(
                    f"{affected} publishes version 2: release and TUF sync in {t4 - t3:.2f} s "
                    f"({pub.signer.count - before} metadata files signed)"
                )
                for b in benches:
                    for label in agents:
                        polls[b.name, label]["after"] = b.poll(running[b.name, label])
                    for label in agents:
                        polls[b.name, label]["idle after"] = b.poll(running[b.name, label])
                for b in benches:
                    b.proxy.close()
        finally:
            pub.close()

    print()
    for b in benches:
        print(f"== {b.name if b.nginx_work is None else 'nginx with deploy/nginx/store.conf'}")
        first = polls[b.name, "other bin"]["first"]
        row(
            "(1) first poll (installing)",
            f"{describe(first)}: metadata {kib(first.bytes_of('metadata'))} in "
            f"{len(first.part('metadata'))}, release file {kib(first.bytes_of('release'))}, "
            f"blob {kib(first.bytes_of('blob'))}",
        )
        idle = [q for label in agents for q in polls[b.name, label]["idle"]]
        worst = max(idle, key=lambda q: q.total)
        r = worst.requests[0]
        row(
            "(2) idle poll",
            f"{describe(worst)} (max of {len(idle)}): {r.line.split(' HTTP')[0]} -> {r.status}, "
            f"request {r.sent} B + answer {r.received} B",
        )
        if worst.logged:
            _, length, sent, _ = worst.logged[0]
            row("    nginx's own log", f"request_length {length} + bytes_sent {sent} = {length + sent} B")
        ok = all(
            q.result == "idle"
            and len(q.requests) == 1
            and q.requests[0].status == 304
            and q.total < IDLE_LIMIT
            for q in idle
        )
        check(ok, f"{b.name}: an idle poll is one conditional GET, 304, under 1 KiB ({worst.total} B)")
        for label in ("other bin", "same bin"):
            q = polls[b.name, label]["after"]
            paths = ", ".join(f"{r.path.rsplit('/', 1)[-1]} {r.total}" for r in q.requests)
            row(f"(3) unaffected, {label}", f"{describe(q)} [{paths}]")
            check(
                q.result == "current" and q.total < UNAFFECTED_LIMIT,
                f"{b.name}: after one other host publishes, an unaffected agent ({label}) "
                f"reads under 20 KiB ({q.total:,} B)",
            )
        q = polls[b.name, "affected"]["after"]
        meta = q.bytes_of("metadata")
        row(
            "(4) affected",
            f"{describe(q)}: metadata overhead {kib(meta)} in {len(q.part('metadata'))} request(s), "
            f"release file {kib(q.bytes_of('release'))}, blob {kib(q.bytes_of('blob'))} "
            f"for a {kib(args.artifact_bytes)} artifact",
        )
        check(q.result == "updated", f"{b.name}: the affected agent installs version 2 ({q.result})")
        again = [polls[b.name, label]["idle after"] for label in agents]
        check(
            all(q.result == "idle" and len(q.requests) == 1 for q in again),
            f"{b.name}: every agent is idle again at its next poll",
        )
        firsts = [polls[b.name, label]["first"].result for label in agents]
        check(
            all(f == "updated" for f in firsts), f"{b.name}: every first poll installs ({', '.join(firsts)})"
        )
        print()
    for ok, what in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {what}")
    return 0 if all(ok for ok, _ in checks) else 1


if __name__ == "__main__":
    raise SystemExit(main())
