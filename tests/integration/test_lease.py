"""Two `reconciler run` daemons, separate state directories, one filesystem store: the
publisher lease lets one publish while the other stands by, hands over when the active
one is killed, and keeps a paused one that resumes after losing it from writing."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import pytest
import yaml

from reconciler.adapters.gpg import Verifier
from reconciler.config import load_config
from reconciler.core.layout import LEASE_PREFIX
from reconciler.core.release import parse_release
from reconciler.wiring import audit_log
from tests.conftest import BASE, SITE, WEB, ConfigRepo, Signing, cli, wait_for, write_config
from tests.integration.test_daemon import get, samples
from tests.integration.test_faults import check_store

pytestmark = pytest.mark.integration

DURATION = 3.0  # lease.duration; renewals every second
RENEW = DURATION / 3
HOSTS = ("web-1", "web-2")
BUILD_TIMEOUT = 300.0  # the first builds of a fresh Nix store


def host(name: str, octet: int) -> str:
    port = 18100 + octet
    return WEB.format(name=name, address=f"10.42.0.{octet}/24", port=port) + "formats: [aci]\n"


@dataclass
class Daemon:
    """One `reconciler run` process and what it logs (one key=value event per line)."""

    name: str
    cfg: Path
    log: Path
    base: str = ""
    proc: subprocess.Popen[str] | None = None
    paused: bool = False
    opened: list[TextIO] = field(default_factory=list)

    def start(self) -> Daemon:
        out = self.log.open("a")
        self.opened.append(out)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "run", "-c", str(self.cfg)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def events(self, name: str, since: int = 0) -> list[dict[str, str]]:
        """The events called ``name`` from line ``since`` on, as dicts."""
        out = []
        for line in self.log.read_text(errors="replace").splitlines()[since:]:
            try:
                fields = dict(p.split("=", 1) for p in shlex.split(line) if "=" in p)
            except ValueError:
                continue  # a line cut off mid-write
            if fields.get("event") == name:
                out.append(fields)
        return out

    def lines(self) -> int:
        return len(self.log.read_text(errors="replace").splitlines())

    def metric(self, name: str) -> float | None:
        try:
            status, text = get(self.base + "/metrics")
        except OSError:
            return None
        return samples(text).get((name, ())) if status == 200 else None

    def readyz(self) -> tuple[int, str]:
        try:
            return get(self.base + "/readyz")
        except OSError:
            return 0, ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if self.paused:
                os.kill(self.pid, signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        for f in self.opened:
            f.close()


@dataclass
class Pair:
    repo: ConfigRepo
    store: Path
    a: Daemon
    b: Daemon

    def releases(self, name: str) -> dict[int, str]:
        """Each release of host ``name`` in the store: version -> the commit it was built from."""
        out = {}
        for path in sorted((self.store / "hosts" / name / "releases").glob("*.json")):
            if not path.stem.isdigit():
                continue  # its attestations (N.provenance.json, N.sbom.json)
            release = parse_release(path.read_bytes(), str(path))
            out[release.version] = release.commit
        return out

    def snapshot(self) -> dict[str, tuple[int, int, int]]:
        """Every object in the store but the lease records: size, mtime and inode."""
        out = {}
        for path in self.store.rglob("*"):
            rel = path.relative_to(self.store).as_posix()
            if path.is_file() and not rel.startswith(LEASE_PREFIX):
                st = path.stat()
                out[rel] = (st.st_size, st.st_mtime_ns, st.st_ino)
        return out


@pytest.fixture
def pair(tmp_path: Path, config_repo: ConfigRepo, signing: Signing) -> Iterator[Pair]:
    config_repo.write("profiles/base.yaml", BASE)
    config_repo.write("packages/site.nix", SITE)
    config_repo.write("hosts/web-1.yaml", host("web-1", 11))
    config_repo.write("hosts/web-2.yaml", host("web-2", 12))
    config_repo.commit("fleet")
    store = tmp_path / "store"
    daemons = []
    for name in ("a", "b"):
        cfg = write_config(
            tmp_path / name,
            config_repo,
            signing,
            store={"type": "filesystem", "path": str(store)},
            lease={"duration": f"{DURATION:g}s"},
        )
        d = Daemon(name, cfg, tmp_path / name / "daemon.log")
        d.base = "http://" + yaml.safe_load(cfg.read_text())["listen"]
        daemons.append(d)
    p = Pair(config_repo, store, *daemons)
    try:
        yield p
    finally:
        for d in daemons:
            d.stop()


def active(d: Daemon) -> bool:
    return d.metric("reconciler_publisher_active") == 1


def start_active_and_standby(p: Pair) -> str:
    """a publishes the fleet, then b starts and stands by. The commit published."""
    first = p.repo.head
    p.a.start()
    wait_for(lambda: all(p.releases(h) == {1: first} for h in HOSTS), BUILD_TIMEOUT, "a publishes the fleet")
    assert active(p.a)
    p.b.start()
    wait_for(lambda: p.b.readyz()[1].startswith("standby:"), 60, "b to stand by")
    status, body = p.b.readyz()
    # Ready (so a Deployment of two rolls out) and healthy, but saying it stands by.
    assert status == 200 and "held by" in body and "(term 1" in body, body
    assert get(p.b.base + "/healthz")[0] == 200
    assert p.b.metric("reconciler_publisher_active") == 0
    assert p.a.metric("reconciler_lease_term") == p.b.metric("reconciler_lease_term") == 1
    return first


def test_one_daemon_publishes_and_the_standby_takes_over_when_it_is_killed(
    pair: Pair, signing: Signing
) -> None:
    p = pair
    first = start_active_and_standby(p)
    # A commit: published once, by a; b observes and plans it, and builds nothing.
    p.repo.write("hosts/web-2.yaml", host("web-2", 22))
    second = p.repo.commit("move web-2")
    wait_for(lambda: p.releases("web-2") == {1: first, 2: second}, BUILD_TIMEOUT, "a publishes web-2 v2")
    wait_for(
        lambda: any(e["commit"] == second for e in p.b.events("reconcile_standby")),
        30,
        "b to plan the new commit as a standby",
    )
    assert p.releases("web-1") == {1: first}
    for event in ("host_build", "host_published", "tuf_published", "store_recovered", "gc_done"):
        assert p.b.events(event) == [], f"the standby logged {event}"
    assert p.b.metric("reconciler_publisher_active") == 0
    status_b = cli("status", "-c", str(p.b.cfg))
    assert status_b.returncode == 0, status_b.stderr
    assert "publisher: standby: the lease is held by " in status_b.stdout
    assert f":{p.a.cfg.parent / 'state'} (term 1" in status_b.stdout
    assert "publisher: active: the lease is held by this state directory (term 1" in (
        cli("status", "-c", str(p.a.cfg)).stdout
    )

    # kill -9 the active one: b takes over within the lease's duration and a pass.
    releases_before = {k: v for k, v in p.snapshot().items() if "/releases/" in k}
    assert p.a.proc is not None
    p.a.proc.send_signal(signal.SIGKILL)
    p.a.proc.wait(10)
    killed = time.monotonic()
    wait_for(lambda: active(p.b), 60, "b to take over")
    took = time.monotonic() - killed
    assert took <= DURATION + RENEW + 5, f"b took over {took:.1f}s after the kill"
    (takeover,) = p.b.events("lease_takeover")
    assert (takeover["term"], takeover["how"]) == ("2", "lapsed")
    assert takeover["previous"].endswith("/a/state")
    status, body = p.b.readyz()
    assert (status, body.strip()) == (200, "ok")

    def published() -> list[str]:
        return [e["version"] for e in p.b.events("host_published") if e["host"] == "web-1"]

    # b's first pass as the publisher adopts web-1 v1 (its ledger knew nothing). b is
    # active from the lease on, before that pass fetches: a commit pushed sooner would
    # be what it builds, and nothing adopted.
    wait_for(lambda: published() == ["1"], 60, "b to adopt web-1 v1")

    # b publishes the next commit; every release exists once, as its commit.
    p.repo.write("hosts/web-1.yaml", host("web-1", 21))
    third = p.repo.commit("move web-1")
    wait_for(lambda: 2 in p.releases("web-1"), BUILD_TIMEOUT, "b publishes web-1 v2")
    # The release file is written before its log entry and latest.json: the publish ends later.
    wait_for(lambda: "2" in published(), 60, "b to finish publishing web-1 v2")
    assert p.releases("web-1") == {1: first, 2: third}
    assert p.releases("web-2") == {1: first, 2: second}
    # b adopted web-1 v1 at the takeover (its ledger knew nothing) and published v2;
    # the release files a wrote are untouched.
    assert published() == ["1", "2"]
    after = p.snapshot()
    assert {k: after[k] for k in releases_before} == releases_before
    with Verifier([signing.public_key.read_bytes()]) as verifier:
        assert check_store(p.store, verifier) == {"web-1": 2, "web-2": 2}
    assert sorted(path.name for path in (p.store / "lease").iterdir()) == ["1.json", "2.json"]
    # The transparency log went on as one history: b extended the head a signed last,
    # and every release is in it once.
    found = audit_log(
        load_config(p.b.cfg), None, [signing.public_key], [], [p.a.cfg.parent / "state/tlog/checkpoint"]
    )
    assert found.problems == [] and found.entries == found.releases == 4, found


def test_a_paused_active_daemon_that_resumes_after_losing_the_lease_publishes_nothing(
    pair: Pair, signing: Signing
) -> None:
    p = pair
    first = start_active_and_standby(p)
    # a starts building a change and is stopped mid-build (SIGSTOP: a frozen VM, a long pause).
    since = p.a.lines()
    p.repo.write("hosts/web-1.yaml", host("web-1", 31))
    change = p.repo.commit("move web-1")
    wait_for(lambda: bool(p.a.events("host_build", since)), BUILD_TIMEOUT, "a to start building web-1")
    os.kill(p.a.pid, signal.SIGSTOP)
    p.a.paused = True
    assert not p.a.events("host_published", since), "a published before it was stopped: widen the window"
    # b takes over and publishes the same change.
    wait_for(lambda: active(p.b), 60, "b to take over from the stopped a")
    wait_for(lambda: p.releases("web-1") == {1: first, 2: change}, BUILD_TIMEOUT, "b publishes web-1 v2")
    wait_for(
        lambda: any(e["commit"] == change and e["ok"] == "True" for e in p.b.events("reconcile_done")),
        60,
        "b's pass to end",
    )
    before = p.snapshot()
    resumed = p.a.lines()
    os.kill(p.a.pid, signal.SIGCONT)
    p.a.paused = False
    # a finds out, from its own clock, that its lease is gone, and ends the pass unpublished.
    wait_for(lambda: bool(p.a.events("lease_lost", resumed)), 30, "a to notice it lost the lease")
    wait_for(lambda: bool(p.a.events("reconcile_standby", resumed)), 30, "a to stand by")
    time.sleep(2 * DURATION)  # passes of both, renewals of b
    assert p.snapshot() == before, "something but a lease record changed after a resumed"
    for event in (
        "host_published",
        "host_failed",  # not a failure of the host: the next holder published it
        "tuf_published",
        "lease_acquired",
        "lease_takeover",
        "store_recovered",
    ):
        assert p.a.events(event, resumed) == [], f"the resumed a logged {event}"
    interrupted = p.a.events("reconcile_interrupted", resumed)
    assert [(e["not_started"], e["reason"]) for e in interrupted] == [("1", "publisher lease lost")]
    assert p.a.metric("reconciler_publish_failures_total") == 0
    assert p.a.metric("reconciler_publisher_active") == 0 and active(p.b)
    assert p.releases("web-1") == {1: first, 2: change}
    with Verifier([signing.public_key.read_bytes()]) as verifier:
        assert check_store(p.store, verifier) == {"web-1": 2, "web-2": 1}
