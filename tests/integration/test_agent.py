"""The host agent against real published stores served over HTTP on 127.0.0.1.

Stores are published by the real reconciler (Nix, gpg); the agent runs the host's
real AppImage and is attacked through the store: each attack is refused or rolled
back, the old release keeps serving, a log line says why and a metric counts it.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from tuf.api.metadata import Metadata

from reconciler.adapters.clock import SystemClock
from reconciler.adapters.tufkeys import metadata_signer
from reconciler.agent.config import load_agent_config
from reconciler.agent.updater import Agent
from reconciler.config import load_config
from reconciler.core.release import parse_release
from reconciler.core.tufrepo import SERIALIZER
from reconciler.demo import make_signing_key
from reconciler.wiring import open_agent, open_reconciler
from tests.conftest import PAGE_SITE, ConfigRepo, Signing, free_port, stop_gpg_agent, wait_for, write_config
from tests.integration.test_gate import compression_bomb

pytestmark = pytest.mark.integration

HOST = """\
name: {name}
network: {{address: 10.42.0.{octet}/24}}
services:
  web:
    package: site
    exec: [bin/busybox, httpd, -f, -p, "{port}", -h, srv/www]
"""


class StoreServer:
    """A real HTTP server for a store directory, with faults to inject."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.truncate_blobs_at: int | None = None
        self.die_mid_blob = False
        self.hold = threading.Event()  # while set, every request waits (a hung store)
        self.released = threading.Event()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                if server.hold.is_set():
                    server.released.wait(30)
                super().do_GET()

            def copyfile(self, source: Any, outputfile: Any) -> None:
                if "/blobs/" in self.path and not self.path.endswith(".asc"):
                    if server.truncate_blobs_at is not None:
                        outputfile.write(source.read(server.truncate_blobs_at))
                        return
                    if server.die_mid_blob:
                        outputfile.write(source.read(100_000))
                        outputfile.flush()
                        threading.Thread(target=server.stop).start()
                        self.close_connection = True
                        return
                super().copyfile(source, outputfile)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self._stopped = False

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.httpd.shutdown()
            self.httpd.server_close()


@dataclass
class Stores:
    v1: Path  # web-1 and web-2 at version 1 (page "one")
    v2: Path  # then version 2 (page "two")
    broken: Path  # version 1, then a version 2 whose web service cannot start
    port: int
    repo: ConfigRepo


def publish(root: Path, name: str, repo: ConfigRepo, signing: Signing, store: Path) -> None:
    cfg = load_config(
        write_config(root / name, repo, signing, store={"type": "filesystem", "path": str(store)})
    )
    rec = open_reconciler(cfg)
    try:
        assert rec.reconcile().ok
    finally:
        rec.close()


@pytest.fixture(scope="module")
def stores(tmp_path_factory: pytest.TempPathFactory, signing: Signing) -> Stores:
    root = tmp_path_factory.mktemp("agent-stores")
    port = free_port()
    repo = ConfigRepo(root / "repo")
    repo.write("packages/site.nix", PAGE_SITE.format(page="one"))
    repo.write("hosts/web-1.yaml", HOST.format(name="web-1", octet=11, port=port))
    repo.write("hosts/web-2.yaml", HOST.format(name="web-2", octet=12, port=free_port()))
    repo.commit("one")
    good = root / "good"
    publish(root, "a", repo, signing, good)
    v1 = root / "v1"
    shutil.copytree(good, v1)
    repo.write("packages/site.nix", PAGE_SITE.format(page="two"))
    repo.commit("two")
    publish(root, "a", repo, signing, good)
    broken = root / "broken"
    shutil.copytree(v1, broken)
    repo.write("packages/site.nix", PAGE_SITE.format(page="one"))
    repo.write(
        "hosts/web-1.yaml",
        HOST.format(name="web-1", octet=11, port=port).replace("httpd, -f", "httpd, --no-such-option, -f"),
    )
    repo.commit("break web-1")
    publish(root, "b", repo, signing, broken)
    return Stores(v1=v1, v2=good, broken=broken, port=port, repo=repo)


def page(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2) as r:
            return str(r.read().decode().strip())
    except OSError:
        return None


@dataclass
class Running:
    agent: Agent
    served: Path
    server: StoreServer
    port: int

    def serve(self, store: Path) -> None:
        """Replace what the server serves with ``store``'s content."""
        shutil.rmtree(self.served)
        shutil.copytree(store, self.served)

    def metric(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.agent.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value


def agent_config(tmp_path: Path, store: str, key: Path, port: int, **extra: object) -> Path:
    cfg: dict[str, object] = {
        "host": "web-1",
        "store": store,
        "keys": [str(key)],
        "state_dir": str(tmp_path / "agent"),
        "supervise": True,
        "health": {"url": f"http://127.0.0.1:{port}/", "timeout": "8s", "interval": 0.2},
        "poll_interval": 1,
        "timeout": "10s",
    }
    cfg.update(extra)
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def running(tmp_path: Path, stores: Stores, signing: Signing) -> Iterator[Running]:
    """An agent that installed and runs version 1 of web-1 from an HTTP store."""
    served = tmp_path / "served"
    shutil.copytree(stores.v1, served)
    server = StoreServer(served)
    agent = open_agent(load_agent_config(agent_config(tmp_path, server.url, signing.public_key, stores.port)))
    try:
        assert agent.poll() == "updated"
        assert page(stores.port) == "one"
        yield Running(agent, served, server, stores.port)
    finally:
        if agent.app is not None:
            agent.app.stop()
        server.stop()
    assert page(stores.port) is None, "the app outlived the agent"


class Later(SystemClock):
    """The system clock, but its wall time is ``at``."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def now(self) -> datetime:
        return self.at


def still_on_v1(r: Running) -> None:
    assert r.agent.state.version == 1
    assert (r.agent.current.resolve()).name == "1"
    assert r.agent.app is not None and r.agent.app.running()
    assert page(r.port) == "one"
    assert r.metric("reconciler_agent_running_version", {"host": "web-1"}) == 1


def test_update_switches_atomically_and_the_page_changes(running: Running, stores: Stores) -> None:
    pid = running.agent.app.proc.pid if running.agent.app and running.agent.app.proc else None
    running.serve(stores.v2)
    assert running.agent.poll() == "updated"
    assert page(running.port) == "two"
    assert running.agent.current.is_symlink() and running.agent.current.resolve().name == "2"
    assert running.agent.app is not None and running.agent.app.proc is not None
    assert running.agent.app.proc.pid != pid
    assert running.metric("reconciler_agent_running_version", {"host": "web-1"}) == 2
    assert running.metric("reconciler_agent_updates_total") == 2
    # Both releases stay installed side by side; the next poll has nothing to do: "idle"
    # when it could ask with the timestamp's validators, "current" when the timestamp
    # was written within 2 s of the update and they were not kept (adapters.fetch).
    assert sorted(p.name for p in running.agent.releases.iterdir()) == ["1", "2"]
    assert running.agent.poll() in ("idle", "current")
    assert running.agent.state.version == 2 and running.metric("reconciler_agent_updates_total") == 2


def attack(running: Running, events: io.StringIO, reason: str, expected_log: str) -> None:
    assert running.agent.poll() == "refused"
    still_on_v1(running)
    assert running.metric("reconciler_agent_refusals_total", {"reason": reason}) == 1
    lines = [ln for ln in events.getvalue().splitlines() if "event=agent_refused" in ln]
    assert len(lines) == 1 and f"reason={reason}" in lines[0] and expected_log in lines[0], lines


def test_tampered_blob_is_refused(running: Running, stores: Stores, events: io.StringIO) -> None:
    running.serve(stores.v2)
    release = parse_release((running.served / "hosts/web-1/latest.json").read_bytes(), "latest")
    art = release.artifact("appimage")
    assert art is not None
    blob = running.served / art.blob
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.write_bytes(bytes(data))
    attack(running, events, "tampered", "release says")
    # Tried once more at the next poll, then at doubling distances; a deferred poll
    # fetches latest.json and nothing else.
    assert running.agent.poll() == "refused"
    before = running.metric("reconciler_agent_downloaded_bytes_total")
    assert running.agent.poll() == "deferred"
    assert running.metric("reconciler_agent_downloaded_bytes_total") - before < 4096
    assert running.agent.poll() == "refused"
    assert running.metric("reconciler_agent_refusals_total", {"reason": "tampered"}) == 3
    assert [running.agent.poll() for _ in range(3)] == ["deferred"] * 3
    still_on_v1(running)
    # The store is repaired: the next try installs it.
    running.serve(stores.v2)
    assert running.agent.poll() == "updated"
    assert page(running.port) == "two"


def test_endless_data_is_cut_at_the_released_size(
    running: Running, stores: Stores, events: io.StringIO
) -> None:
    running.serve(stores.v2)
    release = parse_release((running.served / "hosts/web-1/latest.json").read_bytes(), "latest")
    art = release.artifact("appimage")
    assert art is not None
    with (running.served / art.blob).open("ab") as f:
        f.write(b"\0" * 5_000_000)
    assert running.agent.poll() == "error"
    still_on_v1(running)
    assert "larger than the" in events.getvalue()


def resign_timestamp(running: Running, sign: Callable[[Metadata[Any]], object]) -> None:
    """The served timestamp, one version on, signed by ``sign``."""
    path = running.served / "tuf/timestamp.json"
    md: Metadata[Any] = Metadata.from_bytes(path.read_bytes())
    md.signed.version += 1
    md.signatures.clear()
    sign(md)
    path.write_bytes(md.to_bytes(SERIALIZER))


def test_metadata_signed_by_another_key_is_refused(
    running: Running, stores: Stores, events: io.StringIO, tmp_path: Path, signing: Signing
) -> None:
    running.serve(stores.v2)
    other = tmp_path / "other-gnupg"
    fpr = make_signing_key(other, name="Attacker")
    try:
        resign_timestamp(running, lambda md: md.sign(metadata_signer(other, fpr)))
        # Whoever controls the store also serves their key as the publisher's: the agent
        # trusts only the root its pinned key started, never a key found in the store.
        export = ["gpg", "--homedir", str(other), "--armor", "--export", fpr]
        (running.served / "keys/publisher.asc").write_bytes(
            subprocess.run(export, check=True, capture_output=True).stdout
        )
    finally:
        stop_gpg_agent(other)
    attack(running, events, "bad-signature", "timestamp was signed by 0/1 keys")


def test_a_compressed_packet_as_a_metadata_signature_is_refused_unread(
    running: Running, stores: Stores, events: io.StringIO, signing: Signing
) -> None:
    running.serve(stores.v2)
    bomb = compression_bomb(6)

    def forge(md: Metadata[Any]) -> None:
        md.sign(metadata_signer(signing.gnupghome, signing.fingerprint))
        for sig in md.signatures.values():
            sig.signature = bomb.hex()

    resign_timestamp(running, forge)
    started = time.monotonic()
    attack(running, events, "bad-signature", "timestamp was signed by 0/1 keys")
    assert time.monotonic() - started < 10


def test_unsigned_metadata_is_refused(running: Running, stores: Stores, events: io.StringIO) -> None:
    running.serve(stores.v2)
    resign_timestamp(running, lambda md: None)
    attack(running, events, "bad-signature", "timestamp was signed by 0/1 keys")


def test_a_release_changed_after_signing_is_refused(
    running: Running, stores: Stores, events: io.StringIO
) -> None:
    running.serve(stores.v2)
    meta = running.served / "hosts/web-1/releases/2.json"
    doc = json.loads(meta.read_text())
    doc["expires"] = "2099-01-01T00:00:00Z"
    meta.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
    attack(running, events, "tampered", "the signed entry says")


def test_replayed_old_metadata_is_refused(running: Running, stores: Stores, events: io.StringIO) -> None:
    running.serve(stores.v2)
    assert running.agent.poll() == "updated"
    # The attacker serves the old store again: validly signed, older. Served with its
    # old date, a conditional GET does not even download it; served as new:
    running.serve(stores.v1)
    os.utime(running.served / "tuf/timestamp.json")
    assert running.agent.poll() == "refused"
    assert running.agent.state.version == 2 and page(running.port) == "two"
    assert running.metric("reconciler_agent_refusals_total", {"reason": "rollback"}) == 1
    assert "must be >=" in events.getvalue()


def test_expired_release_is_refused(running: Running, stores: Stores, events: io.StringIO) -> None:
    running.serve(stores.v2)
    expires = parse_release((stores.v2 / "hosts/web-1/releases/2.json").read_bytes(), "r").expires
    running.agent.clock = Later(expires + timedelta(seconds=1))
    attack(running, events, "expired", "release 2 expired at")


def test_another_hosts_release_is_refused(running: Running, stores: Stores, events: io.StringIO) -> None:
    running.serve(stores.v2)
    # web-2's genuine release served as web-1's version 2: not the bytes web-1's entry names.
    shutil.copy(stores.v2 / "hosts/web-2/releases/2.json", running.served / "hosts/web-1/releases/2.json")
    attack(running, events, "tampered", "the signed entry says")


def test_truncated_download_is_not_installed_and_retried(running: Running, stores: Stores) -> None:
    running.serve(stores.v2)
    running.server.truncate_blobs_at = 1000
    assert running.agent.poll() == "error"
    still_on_v1(running)
    assert not (running.agent.releases / "2").exists()
    assert running.metric("reconciler_agent_polls_total", {"result": "error"}) == 1
    running.server.truncate_blobs_at = None
    assert running.agent.poll() == "updated"
    assert page(running.port) == "two"


def test_server_dying_mid_download_leaves_the_old_release_running(
    running: Running, stores: Stores, events: io.StringIO
) -> None:
    running.serve(stores.v2)
    running.server.die_mid_blob = True
    assert running.agent.poll() == "error"
    still_on_v1(running)
    assert running.agent.poll() == "error"  # the server stays down
    still_on_v1(running)
    assert "event=agent_poll_failed" in events.getvalue()
    assert not [p for p in running.agent.releases.iterdir() if p.name.startswith(".")], (
        "partial download left"
    )


def test_update_failing_its_health_check_is_rolled_back(
    running: Running, stores: Stores, events: io.StringIO
) -> None:
    running.serve(stores.broken)
    # Served as written a while ago, so that it can be served as changed below.
    latest = running.served / "tuf/timestamp.json"
    os.utime(latest, (time.time() - 10, time.time() - 10))
    started = time.monotonic()
    assert running.agent.poll() == "rolled-back"
    # The web service died at its start: the image's supervisor said so, and the agent
    # rolled back then, not after the health check's whole timeout (8 s here).
    assert time.monotonic() - started < 6
    still_on_v1(running)
    assert running.metric("reconciler_agent_rollbacks_total") == 1
    (rolled,) = [ln for ln in events.getvalue().splitlines() if "event=agent_rolled_back" in ln]
    assert 'reason="service web exited with status 1"' in rolled, rolled
    # The bad version is not tried again, even when the timestamp is served as changed
    # (a newer date, older than the two seconds that make a date untrusted).
    republished = time.time() - 3
    assert latest.stat().st_mtime < republished
    os.utime(latest, (republished, republished))
    before = running.metric("reconciler_agent_downloaded_bytes_total")
    assert running.agent.poll() == "current"
    assert running.metric("reconciler_agent_downloaded_bytes_total") - before < 4096
    assert running.metric("reconciler_agent_rollbacks_total") == 1
    installs = [ln for ln in events.getvalue().splitlines() if "event=agent_installed" in ln]
    assert len([ln for ln in installs if "version=2" in ln]) == 1
    still_on_v1(running)
    assert running.agent.poll() == "idle"


def test_store_on_a_local_path_and_once_mode(tmp_path: Path, stores: Stores, signing: Signing) -> None:
    """`reconciler agent --once` with an activation command instead of supervising."""
    marker = tmp_path / "activated"
    cfg = agent_config(
        tmp_path,
        str(stores.v2),
        signing.public_key,
        stores.port,
        supervise=False,
        health={"command": ["test", "-x", str(tmp_path / "agent/current")]},
        activate=f'echo "$RECONCILER_VERSION $RECONCILER_ARTIFACT" > {marker}',
        metrics_file=str(tmp_path / "agent.prom"),
    )
    once = [sys.executable, "-m", "reconciler", "agent", "-c", str(cfg), "--once"]
    first = subprocess.run(once, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    version, artifact = marker.read_text().split()
    assert version == "2" and Path(artifact).name == "web-1-2-x86_64.AppImage"
    assert Path(artifact).read_bytes()[8:11] == b"AI\x02"
    assert 'reconciler_agent_running_version{host="web-1"} 2.0' in (tmp_path / "agent.prom").read_text()
    again = subprocess.run(once, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "event=agent_switched" not in again.stderr


def test_daemon_publishes_version_2_and_the_running_agent_switches(tmp_path: Path, signing: Signing) -> None:
    port = free_port()
    repo = ConfigRepo(tmp_path / "repo")
    repo.write("packages/site.nix", PAGE_SITE.format(page="one"))
    repo.write("hosts/web-1.yaml", HOST.format(name="web-1", octet=11, port=port))
    repo.commit("one")
    daemon_cfg = write_config(tmp_path / "daemon", repo, signing)
    store = tmp_path / "daemon" / "store"
    store.mkdir(parents=True)
    server = StoreServer(store)
    agent_cfg = agent_config(tmp_path, server.url, signing.public_key, port)
    procs = []
    try:
        for args in (["run", "-c", str(daemon_cfg)], ["agent", "-c", str(agent_cfg)]):
            log_file = (tmp_path / f"{args[0]}.log").open("w")
            procs.append(subprocess.Popen([sys.executable, "-m", "reconciler", *args], stderr=log_file))
        wait_for(lambda: page(port) == "one", 180, "version 1 served through the agent")
        repo.write("packages/site.nix", PAGE_SITE.format(page="two"))
        repo.commit("two")
        wait_for(lambda: page(port) == "two", 180, "version 2 served through the agent")
        # The page changes when the new app starts; the switch is recorded once it is healthy.

        def recorded() -> bool:
            state = json.loads((tmp_path / "agent/state.json").read_text())
            return (state["version"], state["previous"]) == (2, 1)

        wait_for(recorded, 30, "the agent to record version 2")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            assert p.wait(60) == 0
        server.stop()
    assert page(port) is None
    agent_log = (tmp_path / "agent.log").read_text()
    assert "event=agent_switched host=web-1 version=2 previous=1" in agent_log


def test_a_crashing_app_is_restarted_with_backoff(running: Running, events: io.StringIO) -> None:
    agent = running.agent
    assert agent.app is not None
    agent.app.stop()
    # The installed artifact now exits at once, as a crashing app would, noting when.
    starts = running.served.parent / "starts"
    artifact = agent.artifact(1)
    size = artifact.stat().st_size
    artifact.unlink()
    # Of the release's size: the agent installs afresh a release whose files are not
    # whole when it starts, and this one must be what it runs.
    script = f"#!/bin/sh\ndate +%s.%N >> {starts}\nexit 3\n"
    artifact.write_text(script + "#" * (size - len(script) - 1) + "\n")
    artifact.chmod(0o755)

    def started() -> list[float]:
        return [float(t) for t in starts.read_text().split()] if starts.exists() else []

    stopping = threading.Event()
    loop = threading.Thread(target=agent.run, args=(stopping,))
    loop.start()
    try:
        wait_for(lambda: len(started()) >= 4, 60, "four starts of the crashing app")
    finally:
        stopping.set()
        loop.join(60)
    # Restarted after 1, 2, then 4 s, not every second.
    at = started()
    gaps = [b - a for a, b in itertools.pairwise(at[:4])]
    assert all(gap >= delay - 0.05 for gap, delay in zip(gaps, (1, 2, 4), strict=True)), gaps
    exits = [ln for ln in events.getvalue().splitlines() if "event=app_exited" in ln]
    assert "status=3" in exits[0]
    assert [ln.split("restart_in=")[1].split()[0] for ln in exits[:3]] == ["1", "2", "4"]


def test_the_app_is_restarted_while_a_poll_hangs_on_the_store(running: Running) -> None:
    """Polls run beside the supervision: a store that does not answer delays updates,
    not the restart of a crashed app."""
    agent = running.agent
    assert agent.app is not None and agent.app.proc is not None
    running.server.hold.set()
    stopping = threading.Event()
    loop = threading.Thread(target=agent.run, args=(stopping,))
    loop.start()
    try:
        time.sleep(1.5)  # the first poll is waiting on the store now
        first = agent.app.proc
        assert first is not None
        first.terminate()  # the app exits (its services stop with it)
        wait_for(
            lambda: agent.app is not None and agent.app.proc is not None and agent.app.proc is not first,
            15,
            "the crashed app to be restarted while the poll waits",
        )
        wait_for(lambda: page(running.port) == "one", 15, "the restarted app to serve")
        assert running.metric("reconciler_agent_polls_total", {"result": "idle"}) == 0
    finally:
        running.server.released.set()
        stopping.set()
        loop.join(60)
    assert not loop.is_alive()
