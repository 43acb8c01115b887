"""The fleet page in headless Chromium (Debian's, driven by Playwright) against a real
daemon serving the demo fleet of `reconciler init` after one real pass, plus a host
whose build fails and a host file whose name is markup.

Screenshots go to $RECONCILER_TEST_ARTIFACTS/fleet-page (default test-artifacts/ at
the top of the repository).
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import git
import pytest
import yaml
from playwright.sync_api import Browser, Page, sync_playwright

from tests.conftest import TOOLCHAIN_DIR, cli, free_port, reconciler_run, stop_gpg_agent, wait_for

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("RECONCILER_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "fleet-page"
CHROMIUM = "/usr/bin/chromium"

# The builder prints markup and fails: its last lines are the log tail the page shows.
BROKEN = """\
{ toolchain }:
derivation {
  name = "broken";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  args = [ "sh" "-c" ''
    echo "compiling the thing"
    echo "<script>document.title='pwned'"
    echo "<b onmouseover=alert(1)>bold"
    echo "failing on purpose"
    exit 3
  '' ];
}
"""
BROKEN_HOST = """\
name: broken-1
include: [base]
formats: [aci]
services:
  app: {package: broken, exec: [bin/busybox, sleep, "9"]}
"""
# A host file named like markup: invalid (its name is not the file's), and shown inert.
EVIL = "<img src=x onerror=alert(1)>"


class Daemon:
    def __init__(self, base: str, demo: Path) -> None:
        self.base = base
        self.demo = demo


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], str]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, dict(r.headers.items()), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read().decode()


def ready(base: str) -> bool:
    try:
        return get(base + "/readyz")[0] == 200
    except urllib.error.URLError:
        return False  # not listening yet


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    demo = tmp_path_factory.mktemp("fleet-page") / "demo"
    made = cli("init", str(demo))
    assert made.returncode == 0, made.stderr
    repo = git.Repo(demo / "repo")
    (demo / "repo/packages/broken.nix").write_text(BROKEN)
    (demo / "repo/hosts/broken-1.yaml").write_text(BROKEN_HOST)
    (demo / "repo/hosts" / f"{EVIL}.yaml").write_text("name: evil\n")
    repo.git.add("-A")
    repo.index.commit("add broken-1 <script>alert('commit')</script>")
    cfg_path = demo / "reconciler.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    port = free_port()
    cfg.update(listen=f"127.0.0.1:{port}", poll_interval=3600, nix={"toolchain_dir": str(TOOLCHAIN_DIR)})
    cfg_path.write_text(yaml.safe_dump(cfg))
    base = f"http://127.0.0.1:{port}"
    try:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with reconciler_run(cfg_path, demo / "daemon.log", stop=20, env=env) as proc:
            wait_for(lambda: proc.poll() is not None or ready(base), 300, "the first pass")
            assert proc.poll() is None, (demo / "daemon.log").read_text()[-3000:]
            yield Daemon(base, demo)
    finally:
        stop_gpg_agent(demo / "gnupg")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        # Debian's Chromium; Playwright downloads no browser of its own.
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@dataclass
class Tab:
    """A browser page, and what it logged to the console, threw or tried to show."""

    pg: Page
    errors: list[str] = field(default_factory=list)


@pytest.fixture
def tab(browser: Browser) -> Iterator[Tab]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    t = Tab(context.new_page())
    # A script that ran, a resource refused by the policy or missing, shows here.
    t.pg.on("console", lambda m: t.errors.append(m.text))
    t.pg.on("pageerror", lambda exc: t.errors.append(str(exc)))
    t.pg.on("dialog", lambda d: t.errors.append(f"dialog: {d.message}"))
    try:
        yield t
    finally:
        context.close()


def shot(pg: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def rows(pg: Page) -> dict[str, list[str]]:
    return {
        tr.get_attribute("data-host") or "": [td.inner_text() for td in tr.query_selector_all("td")]
        for tr in pg.query_selector_all("#fleet tbody tr[data-host]")
    }


def test_the_fleet_table_shows_every_host_its_status_and_the_plan(daemon: Daemon, tab: Tab) -> None:
    tab.pg.goto(daemon.base + "/")
    shot(tab.pg, "fleet")
    table = rows(tab.pg)
    assert sorted(table) == sorted(["web-1", "web-2", "worker-1", "broken-1", EVIL])
    for host in ("web-1", "web-2", "worker-1"):
        assert table[host][1] == "1" and table[host][3] == "published", table[host]
        assert len(table[host][2]) == 12  # the commit, short
        assert table[host][4].endswith("ago")
    assert table["broken-1"][3] == "failed"
    assert "exit code 3" in table["broken-1"][6]
    assert table["broken-1"][5] == "backoff"
    assert table[EVIL][3] == "invalid"
    # The next pass: the failed host waits out its backoff, the invalid one stays so.
    plan = tab.pg.inner_text("#plan")
    assert "broken-1\tbackoff" in plan and "build failed 1 time(s) in a row" in plan
    assert "web-1" not in plan
    # Two plots, each with a dot per pass and per publication of the last day.
    assert tab.pg.locator("#plots svg").count() == 2
    assert tab.pg.locator("#plots svg").nth(0).locator("circle").count() >= 1
    assert tab.pg.locator("#plots svg").nth(1).locator("circle").count() == 3
    assert tab.errors == []


def test_filters_narrow_the_table(daemon: Daemon, tab: Tab) -> None:
    tab.pg.goto(daemon.base + "/")
    tab.pg.click("a[data-filter=failing]")
    assert tab.pg.url.endswith("/?status=failing")
    shot(tab.pg, "fleet-failing")
    assert list(rows(tab.pg)) == ["broken-1"]
    tab.pg.goto(daemon.base + "/?status=invalid")
    assert list(rows(tab.pg)) == [EVIL]
    tab.pg.goto(daemon.base + "/?status=pending")
    assert list(rows(tab.pg)) == ["broken-1"]
    tab.pg.goto(daemon.base + "/?status=suspended")
    assert rows(tab.pg) == {}
    assert "failing (1)" in tab.pg.inner_text("#filters")


def test_a_host_page_shows_its_releases_with_artifacts_and_build_time(daemon: Daemon, tab: Tab) -> None:
    tab.pg.goto(daemon.base + "/")
    tab.pg.click("a[href='/host?name=web-1']")
    shot(tab.pg, "host-web-1")
    assert tab.pg.inner_text("h1") == "web-1"
    (published,) = tab.pg.query_selector_all("#history tbody tr.published")
    cells = [td.inner_text() for td in published.query_selector_all("td")]
    assert cells[1:3] == ["published", "1"]
    assert cells[4] == "new host, never published"
    assert cells[5].endswith("s")  # the build's duration
    store = daemon.demo / "store"
    release = yaml.safe_load((store / "hosts/web-1/releases/1.json").read_text())
    shown = tab.pg.inner_text("#history tbody tr.published ul")
    for artifact in release["artifacts"]:
        assert artifact["name"] in shown
        assert f"sha256:{artifact['sha256'][:16]}" in shown
    digests = [c.get_attribute("title") or "" for c in published.query_selector_all("code.digest")]
    assert sorted(digests) == sorted(f"sha256:{a['sha256']}" for a in release["artifacts"])
    assert tab.pg.query_selector("#log") is None


def test_a_failed_host_shows_its_build_log_tail_inert(daemon: Daemon, tab: Tab) -> None:
    tab.pg.goto(daemon.base + "/host?name=broken-1")
    shot(tab.pg, "host-broken-1")
    log = tab.pg.inner_text("#log pre")
    assert "compiling the thing" in log and "failing on purpose" in log
    # What the build printed is text on the page, never markup that runs.
    assert "<script>document.title='pwned'" in log and "<b onmouseover=alert(1)>bold" in log
    assert tab.pg.title() == "broken-1"
    assert tab.pg.locator("script").count() == 0 and tab.pg.locator("#log b").count() == 0
    assert "whole log: nix-store --read-log /nix/store/" in log
    (failed,) = tab.pg.query_selector_all("#history tbody tr.failed")
    assert "new host, never published" in failed.inner_text()
    assert tab.errors == []


def test_a_markup_host_name_is_inert_and_answers_carry_a_strict_policy(daemon: Daemon, tab: Tab) -> None:
    tab.pg.goto(daemon.base + "/?status=invalid")
    shot(tab.pg, "fleet-invalid")
    assert tab.pg.locator("#fleet img").count() == 0
    assert tab.errors == []
    code, headers, body = get(daemon.base + "/")
    assert code == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Content-Security-Policy"].startswith("default-src 'none'")
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert "&lt;img src=x onerror=alert(1)&gt;" in body
    assert "<script" not in body
    assert get(daemon.base + "/host?name=nobody")[0] == 404
    assert get(daemon.base + "/?status=bogus")[0] == 400
