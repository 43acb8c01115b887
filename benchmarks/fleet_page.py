"""The fleet page at fleet scale: how long the daemon takes to render it, and Chromium
to show it, in one run.

A generated fleet (default 1,000 hosts, benchmarks/fleet_scale.py's repository) is
seeded as published from its commit without building anything; 5% of the hosts are
recorded as failing with a build log tail, and the event history gets a day of passes
(one a minute) and one publication per host. A real daemon (`reconciler run`) then
does its first pass and serves the page. Prints:
  - the server's time to answer / (the whole fleet), /?status=failing and a failing
    host's page, median of --repeat requests, with the page's size;
  - headless Chromium's (Debian's, through Playwright) first contentful paint and
    load event for the fleet page, median of --repeat fresh pages;
then PASS/FAIL against TARGETS.

    python3 benchmarks/fleet_page.py [--hosts 1000] [--repeat 5] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet_scale import ROOT, make_repo, run_each, seed, write_config

from reconciler.adapters.eventlog import EventLog
from reconciler.adapters.ledger import State
from reconciler.core.events import Event, EventType
from reconciler.demo import KeyType, make_signing_key
from tests.conftest import is_ready, reconciler_run

CHROMIUM = "/usr/bin/chromium"
# Seconds. The page must come up at once for an operator who opens it during an incident.
TARGETS = {"server_fleet": 0.5, "server_host": 0.2, "first_contentful_paint": 1.0, "load": 2.0}
FAILING_EVERY = 20  # one host in this many is failing
LOG = """\
build of host '{host}' failed: builder for '/nix/store/{h}-site.drv' failed with exit code 1; its last lines:
  compiling site
  checking assets
  error: asset index.html is missing
whole log: nix-store --read-log /nix/store/{h}-site.drv"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def history(cfg: Path, work: Path, hosts: int, now: float) -> None:
    """A day of history, and the failing hosts in the ledger."""
    state_dir = work / "state"
    state = State(state_dir)
    events = EventLog(state_dir)
    try:
        recorded = state.hosts()
        commit = next(iter(recorded.values())).commit
        batch = [
            Event(
                EventType.PASS_FINISHED,
                now - 86400 + 60 * i,
                commit=commit,
                seconds=2 + (i % 7) * 0.5,
                data={"ok": True, "published": 0, "failed": 0, "invalid": 0},
            )
            for i in range(1440)
        ]
        for i, name in enumerate(sorted(recorded)):
            at = now - 86400 + 86 * i % 86400
            batch.append(
                Event(EventType.HOST_BUILT, at - 20, name, commit, 1, 15.0, data={"builder": "local"})
            )
            batch.append(
                Event(
                    EventType.HOST_PUBLISHED,
                    at,
                    name,
                    commit,
                    1,
                    21.0,
                    data={
                        "latency": 30.0 + i % 90,
                        "artifacts": "aci",
                        "reasons": "new host, never published",
                    },
                )
            )
        failing = [name for i, name in enumerate(sorted(recorded)) if i % FAILING_EVERY == 1]
        for name in failing:
            hs = recorded[name]
            error = LOG.format(host=name, h="0" * 32)
            batch.append(
                Event(
                    EventType.HOST_FAILED,
                    now - 900,
                    name,
                    commit,
                    seconds=3.0,
                    error=error[:300],
                    data={"failures": 3, "retry_in": 240, "reasons": "packages/site.nix changed"},
                )
            )
            state.record_build_failure(name, error, hs.image or "", 3, now + 600, hs.version + 1)
        events.append(*sorted(batch, key=lambda e: e.time))
    finally:
        events.close()
        state.close()
    print(f"  seeded {hosts} hosts ({len(failing)} failing) and {len(batch)} events")


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def median_get(url: str, repeat: int) -> tuple[float, int]:
    times, size = [], 0
    for _ in range(repeat):
        t = time.perf_counter()
        code, body = get(url)
        times.append(time.perf_counter() - t)
        assert code == 200, (url, code, body[:200])
        size = len(body)
    return statistics.median(times), size


def browser_times(url: str, repeat: int) -> tuple[float, float, int]:
    """Median first contentful paint and load event (seconds from navigation), and the
    rows the table shows."""
    from playwright.sync_api import sync_playwright

    fcp, load, rows = [], [], 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            for _ in range(repeat):
                context = browser.new_context(viewport={"width": 1280, "height": 900})
                page = context.new_page()
                page.goto(url, wait_until="load")
                # The paint entry may come after the load event: wait for it.
                got = json.loads(
                    page.evaluate(
                        """() => new Promise((resolve) => {
                            new PerformanceObserver((list, observer) => {
                                const paint = list.getEntriesByName('first-contentful-paint')[0];
                                if (!paint) return;
                                observer.disconnect();
                                resolve(JSON.stringify({
                                    fcp: paint.startTime,
                                    load: performance.getEntriesByType('navigation')[0].loadEventEnd,
                                }));
                            }).observe({type: 'paint', buffered: true});
                        })"""
                    )
                )
                fcp.append(got["fcp"] / 1000)
                load.append(got["load"] / 1000)
                rows = page.locator("#fleet tbody tr[data-host]").count()
                context.close()
        finally:
            browser.close()
    return statistics.median(fcp), statistics.median(load), rows


def run(work: Path, hosts: int, repeat: int) -> dict[str, bool]:
    print(f"\n== {hosts} hosts")
    repo = work / "repo"
    t = time.perf_counter()
    make_repo(repo, hosts)
    fpr = make_signing_key(work / "gnupg", key_type=KeyType.ED25519)
    port = free_port()
    cfg = write_config(work / "reconciler.yaml", work, repo, "state", fpr, port)
    seed(cfg)
    history(cfg, work, hosts, time.time())
    print(f"  set up in {time.perf_counter() - t:.1f}s")
    base = f"http://127.0.0.1:{port}"
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with reconciler_run(cfg, work / "daemon.log", env=env) as proc:
            t = time.perf_counter()
            deadline = time.monotonic() + 1800
            while not is_ready(base):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the daemon did not become ready; see {work / 'daemon.log'}")
                time.sleep(0.5)
            print(f"  daemon ready after its first pass in {time.perf_counter() - t:.1f}s")
            fleet, size = median_get(base + "/", repeat)
            failing, failing_size = median_get(base + "/?status=failing", repeat)
            host, _ = median_get(base + f"/host?name=host-{1:05d}", repeat)
            print(
                f"  server: / {fleet * 1000:.0f} ms ({size / 1024:.0f} KiB), "
                f"/?status=failing {failing * 1000:.0f} ms ({failing_size / 1024:.0f} KiB), "
                f"a failing host's page {host * 1000:.0f} ms"
            )
            fcp, load, rows = browser_times(base + "/", repeat)
            print(
                f"  chromium: first contentful paint {fcp * 1000:.0f} ms, load {load * 1000:.0f} ms, "
                f"{rows} rows"
            )
            assert rows == hosts, rows
    finally:
        subprocess.run(["gpgconf", "--homedir", str(work / "gnupg"), "--kill", "all"], capture_output=True)
    measured = {"server_fleet": fleet, "server_host": host, "first_contentful_paint": fcp, "load": load}
    return {
        f"{hosts} hosts: {what} {measured[what] * 1000:.0f} ms <= {limit * 1000:.0f} ms": measured[what]
        <= limit
        for what, limit in TARGETS.items()
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, nargs="+", default=[1000])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = ap.parse_args()
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "reconciler")], check=True)
    return run_each(
        args.hosts, args.keep, "reconciler-page-bench-", lambda work, n: run(work, n, args.repeat)
    )


if __name__ == "__main__":
    raise SystemExit(main())
