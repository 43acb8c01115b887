"""`reconciler run` under a flood of idle connections to its HTTP port."""

from __future__ import annotations

import resource
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ConfigRepo, Signing, is_ready, standard_fleet, wait_for, write_config

pytestmark = pytest.mark.integration

FLOOD = 1500
PEERS = 100
# Opening the flood takes well under a second. With the old listen backlog of 5, one
# connect in six waited a second for a SYN retransmission, about four minutes in all.
OPEN_BOUND = 30.0
# Far past the daemon's deadlines (5 s for a connection that sends nothing, 10 s for a
# whole request); before them, every one of these connections stayed open for good.
BOUND = 30.0


def still_open(conns: list[socket.socket], bound: float) -> int:
    """How many of ``conns`` the server has not closed (EOF or reset) within ``bound`` seconds."""
    by_fd = {c.fileno(): c for c in conns}
    poller = select.poll()
    for fd in by_fd:
        poller.register(fd, select.POLLIN)
    deadline = time.monotonic() + bound
    while by_fd and time.monotonic() < deadline:
        for fd, _ in poller.poll(200):
            try:
                closed = not by_fd[fd].recv(65536)  # a refused one reads its 503 first
            except ConnectionResetError:
                closed = True
            if closed:
                poller.unregister(fd)
                del by_fd[fd]
    return len(by_fd)


def test_a_flood_of_idle_connections_is_shed_and_metrics_still_answer(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = FLOOD + 500
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip(f"{FLOOD} connections need {need} open files; the hard limit is {hard}")
        # The daemon inherits this too, as it would under a service manager's higher limit:
        # what stops the flood must be the daemon's bound, not a file descriptor limit.
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
    standard_fleet(config_repo)
    cfg = write_config(tmp_path, config_repo, signing, poll_interval=3600)
    host, port = yaml.safe_load(cfg.read_text())["listen"].rsplit(":", 1)
    base = f"http://{host}:{port}"
    conns: list[socket.socket] = []
    with (tmp_path / "daemon.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "reconciler", "run", "-c", str(cfg)], stderr=log)
    try:
        wait_for(lambda: is_ready(base), 180, "/readyz")
        opening = time.monotonic() + OPEN_BOUND
        while len(conns) < FLOOD and time.monotonic() < opening:
            # From PEERS addresses of this machine, fewer connections each than one
            # peer may have served (16): it is the bound on all of them that sheds these.
            source = (f"127.0.0.{2 + len(conns) % PEERS}", 0)
            conns.append(socket.create_connection((host, int(port)), timeout=10, source_address=source))
        left = still_open(conns, BOUND)
        assert (len(conns), left) == (FLOOD, 0), (
            f"{len(conns)} of {FLOOD} connections opened in {OPEN_BOUND:g}s, "
            f"{left} of them still open {BOUND:g}s later"
        )

        with urllib.request.urlopen(base + "/metrics", timeout=10) as r:
            assert r.status == 200
            families = text_string_to_metric_families(r.read().decode())
        dropped = {
            s.labels["reason"]: s.value
            for fam in families
            for s in fam.samples
            if s.name == "reconciler_http_connections_dropped_total"
        }
        # Each flood connection was either refused on arrival or cut at its deadline, and
        # the first 64 (the daemon's bound) took places and held them until cut.
        assert dropped["busy"] + dropped["timeout"] == FLOOD
        assert dropped["timeout"] >= 64
        assert dropped["busy"] > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        assert "Traceback" not in (tmp_path / "daemon.log").read_text()
    finally:
        for c in conns:
            c.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
