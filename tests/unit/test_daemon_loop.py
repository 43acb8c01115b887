"""The daemon's loop (reconciler.daemon.loop) over a pass on in-memory fakes: POST
/reconcile on a real socket of 127.0.0.1, a pass at once that retries hosts in backoff."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from reconciler.config import TriggerConfig
from reconciler.daemon.loop import Daemon
from tests.conftest import wait_for
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


def post(url: str, token: str | None) -> tuple[int, str]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    req = urllib.request.Request(url, data=b"", headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
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
