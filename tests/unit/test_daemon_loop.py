"""The daemon's loop (reconciler.daemon.loop) over a pass on in-memory fakes: POST
/reconcile on a real socket of 127.0.0.1, a pass at once that retries hosts in backoff."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.adapters.eventlog import EventLog
from reconciler.config import LeaseConfig, TriggerConfig
from reconciler.core.layout import LEASE_PREFIX, lease_path
from reconciler.core.lease import RECORD_LIMIT, Holder, parse_record
from reconciler.daemon.lease import PublisherLease
from reconciler.daemon.loop import MAX_WAITING, Daemon
from tests.conftest import reconciler_log, wait_for
from tests.unit.test_daemon_pass import FLEET, World


@pytest.fixture
def running(tmp_path: Path) -> Iterator[tuple[World, Daemon, str]]:
    world = World(tmp_path)
    world.source.push(FLEET)
    world.nix.failing.add("web-1")
    (tmp_path / "token").write_text("t0ken\n")
    rec = world.reconciler()
    rec.cfg = replace(
        rec.cfg,
        listen="127.0.0.1:0",
        poll_interval=3600,
        triggers=TriggerConfig(watch=False, reconcile_token_file=tmp_path / "token"),
    )
    daemon = Daemon(rec.cfg, rec)
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: "web-1" in world.ledger.states, 10, "the first pass")
        yield world, daemon, f"http://127.0.0.1:{daemon.server.port}/reconcile"
    finally:
        daemon.stop()
        thread.join(10)


@contextlib.contextmanager
def capture_events() -> Iterator[list[str]]:
    """The daemon's log lines while the block runs."""
    lines: list[str] = []
    with reconciler_log() as out:
        try:
            yield lines
        finally:
            lines.extend(out.getvalue().splitlines())


def post(url: str, token: str | None, wait: float | None = None) -> tuple[int, str]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    if wait is not None:
        headers["Prefer"] = f"wait={wait}"
    req = urllib.request.Request(url, data=b"", headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5 + (wait or 0)) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as e:
        return int(e.code), e.read().decode()


def test_reconcile_now_runs_a_pass_at_once_and_retries_hosts_in_backoff(
    running: tuple[World, Daemon, str],
) -> None:
    world, daemon, url = running
    assert world.ledger.states["web-1"].failures == 1
    world.nix.failing.clear()
    # The fake clock stands still: only a pass that ignores the backoff builds web-1.
    assert post(url, "wrong") == (401, "unauthorized: wrong token\n")
    assert post(url, None)[0] == 401
    assert world.nix.builds.count(("web-1", 1)) == 1
    code, body = post(url, "t0ken")
    assert code == 202 and body.startswith("accepted")
    wait_for(lambda: world.ledger.states["web-1"].version == 1, 10, "web-1 published by the pass asked for")
    sample = daemon.metrics.registry.get_sample_value
    assert sample("reconciler_reconcile_requests_total", {"result": "unauthorized"}) == 2
    assert sample("reconciler_reconcile_requests_total", {"result": "accepted"}) == 1
    wait_for(lambda: sample("reconciler_wakeups_total", {"trigger": "manual"}) == 1, 10, "the wakeup counted")


def test_a_suspended_fleet_takes_no_request_for_a_pass(running: tuple[World, Daemon, str]) -> None:
    world, daemon, url = running
    world.ledger.suspend(None, world.clock.t)
    assert post(url, "t0ken") == (409, "the fleet is suspended: reconciler resume first\n")
    assert daemon.metrics.registry.get_sample_value("reconciler_wakeups_total", {"trigger": "manual"}) == 0


class Receiver:
    """A notification target on 127.0.0.1: the bodies POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.bodies.append(json.loads(data))
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hook"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_sighup_applies_new_notification_targets_and_lease_timings(tmp_path: Path) -> None:
    world = World(tmp_path)
    world.source.push(FLEET)
    rec = world.reconciler()
    lease = PublisherLease(world.store, LeaseConfig(), Holder("d1", "host-d1"), world.clock, background=False)
    rec.lease = lease
    # The history every daemon records in (wiring), started without targets.
    rec.events = EventLog(tmp_path / "state")
    daemon = Daemon(rec.cfg, rec)
    assert lease.acquire()
    receiver = Receiver()
    try:
        # The file the daemon reads at SIGHUP: a target added, the lease's timings changed,
        # and lease.enabled, which only a restart changes.
        target = {"name": "ops", "type": "webhook", "url": receiver.url, "on": ["published"]}
        path = tmp_path / "reconciler.yaml"
        yaml_cfg = {
            "repo": {"url": "repo"},
            "store": {"path": "store"},
            "state_dir": "state",
            "signing": {"gnupghome": "gnupg", "key": "K"},
            "notifications": [target],
            "lease": {"enabled": False, "duration": "30s", "renew": "5s"},
        }
        path.write_text(yaml.safe_dump(yaml_cfg))
        with capture_events() as lines:
            daemon.reload()
        reloaded = next(ln for ln in lines if "event=config_reloaded" in ln)
        assert "notifications" in reloaded and "lease.duration" in reloaded, reloaded
        assert any("event=config_reload_needs_restart" in ln and "lease.enabled" in ln for ln in lines), lines
        assert lease.settings == LeaseConfig(enabled=True, duration=30.0, renew=5.0)
        assert daemon.cfg.lease.enabled

        # The next pass notifies the new target, without a restart.
        assert rec.reconcile().ok
        wait_for(lambda: len(receiver.bodies) == 2, 10, "two host_published notifications")
        assert sorted(str(b["event"]["host"]) for b in receiver.bodies) == ["web-1", "web-2"]
        # The next renewal holds the lease for the new duration.
        lease.tick()
        term = max(
            int(k.removeprefix(LEASE_PREFIX).removesuffix(".json")) for k in world.store.list(LEASE_PREFIX)
        )
        record = parse_record(world.store.get_bytes(lease_path(term), RECORD_LIMIT) or b"", term, "test")
        assert record.duration == 30.0

        # Dropped again: nothing more is sent to it.
        yaml_cfg["notifications"] = []
        path.write_text(yaml.safe_dump(yaml_cfg))
        daemon.reload()
        world.source.push(
            {**FLEET, "hosts/web-1.yaml": FLEET["hosts/web-1.yaml"].replace("10.0.0.1", "10.0.0.5")}
        )
        assert rec.reconcile().ok
        time.sleep(0.5)
        assert len(receiver.bodies) == 2
    finally:
        receiver.close()
        rec.close()


def test_reconcile_now_can_wait_for_its_pass_and_answers_with_its_result(
    running: tuple[World, Daemon, str],
) -> None:
    world, daemon, url = running
    commit = (world.source.head or "")[:12]
    # web-1 still fails: the pass it asked for is retried at once, and fails.
    code, body = post(url, "t0ken", wait=10)
    assert (code, body) == (
        200,
        f"failed: pass 2: commit {commit}: 0 published, 1 failed, 0 invalid, 0 in backoff (failed: web-1)\n",
    )
    world.nix.failing.clear()
    code, body = post(url, "t0ken", wait=10)
    assert (code, body) == (
        200,
        f"ok: pass 3: commit {commit}: 1 published, 0 failed, 0 invalid, 0 in backoff\n",
    )

    # A pass that outlasts the wait: said so, and it goes on.
    release = threading.Event()

    def hold(host: str) -> None:
        release.wait(10)

    world.nix.while_building = hold
    world.source.push(
        {**FLEET, "hosts/web-2.yaml": FLEET["hosts/web-2.yaml"].replace("10.0.0.2", "10.0.0.6")}
    )
    try:
        assert post(url, "t0ken", wait=0.5) == (202, "accepted: pass 4 did not finish within 0.5s\n")
        # While MAX_WAITING requests wait (each holding a place of the listener), another
        # is accepted without waiting.
        waiting = [
            threading.Thread(target=post, args=(url, "t0ken"), kwargs={"wait": 10}, daemon=True)
            for _ in range(MAX_WAITING)
        ]
        for t in waiting:
            t.start()
        wait_for(lambda: daemon.waiting == MAX_WAITING, 10, "the waiting requests")
        code, body = post(url, "t0ken", wait=10)
        assert code == 202 and body.endswith(f"not waited for, {MAX_WAITING} requests wait already\n"), body
    finally:
        release.set()
    wait_for(lambda: world.ledger.states["web-2"].version == 2, 10, "pass 4 to publish web-2")


def test_a_reload_reads_the_fleet_page_s_token_again(tmp_path: Path) -> None:
    # A leaked token is rotated by writing the file anew and sending SIGHUP, as the
    # triggers' secrets are: the old one must stop opening the page.
    from reconciler.config import load_config

    world = World(tmp_path)
    (tmp_path / "web.token").write_text("old-t0ken\n")
    (tmp_path / "r.yaml").write_text(
        "repo: {url: /r}\nstore: {type: filesystem, path: /s}\nstate_dir: /st\n"
        "signing: {gnupghome: /g, key: K}\nlisten: 127.0.0.1:0\nweb: {token_file: web.token}\n"
    )
    cfg = load_config(tmp_path / "r.yaml")
    rec = world.reconciler()
    rec.cfg = replace(rec.cfg, path=cfg.path, listen=cfg.listen, web=cfg.web)
    daemon = Daemon(rec.cfg, rec)
    daemon.server.start()
    url = f"http://127.0.0.1:{daemon.server.port}/page.css"

    def get(token: str) -> int:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as e:
            return int(e.code)

    try:
        assert (get("old-t0ken"), get("new-t0ken")) == (200, 401)
        (tmp_path / "web.token").write_text("new-t0ken\n")
        daemon.reload()
        assert (get("old-t0ken"), get("new-t0ken")) == (401, 200)
    finally:
        daemon.server.stop()
        rec.close()


def test_a_ledger_that_fails_mid_pass_is_said_in_one_line_and_the_daemon_goes_on(
    running: tuple[World, Daemon, str],
) -> None:
    world, daemon, url = running
    damaged = sqlite3.DatabaseError("database disk image is malformed")

    def hosts() -> Any:
        raise damaged

    healthy = world.ledger.hosts
    world.ledger.hosts = hosts  # type: ignore[method-assign]
    with capture_events() as lines:
        code, body = post(url, "t0ken", wait=10)
    said = (
        f"{daemon.cfg.state_dir / 'state.db'}: database disk image is malformed"
        " (a damaged ledger: move it away to start afresh)"
    )
    assert (code, body) == (200, f"failed: pass 2: {said}\n")
    (failed,) = [line for line in lines if "event=reconcile_failed" in line]
    assert "database disk image is malformed (a damaged ledger" in failed, failed
    assert not [line for line in lines if "reconcile_crashed" in line or "Traceback" in line]
    # The ledger mended, the next pass goes on as before.
    world.ledger.hosts = healthy  # type: ignore[method-assign]
    world.nix.failing.clear()
    code, body = post(url, "t0ken", wait=10)
    assert code == 200 and body.startswith("ok: "), body


def test_a_bug_is_logged_by_its_type_and_message_never_the_input_it_met(
    running: tuple[World, Daemon, str],
) -> None:
    world, _, url = running
    # What a UnicodeDecodeError holds is the whole input: a build log, a repository file.
    secret = b"\xe9 the contents of a file " * 1000

    def hosts() -> Any:
        secret.decode()

    world.ledger.hosts = hosts  # type: ignore[method-assign]
    with capture_events() as lines:
        code, body = post(url, "t0ken", wait=10)
    assert code == 200 and body.startswith("failed: pass 2: internal error: UnicodeDecodeError: "), body
    assert "the contents of a file" not in body
    (crashed,) = [line for line in lines if "event=reconcile_crashed" in line]
    assert "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9 in position 0" in crashed, crashed
    assert "the contents of a file" not in crashed
