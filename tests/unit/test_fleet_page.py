"""The fleet page without a browser: its views over a pass on in-memory ports, the HTML
they render (every string from the repository escaped), the plots, and who may read it
(reconciler.daemon.page, reconciler.daemon.web)."""

from __future__ import annotations

import base64
import re
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from prometheus_client import CollectorRegistry

from reconciler.adapters.http import Request, Server
from reconciler.config import load_config
from reconciler.core.builders import Probe, Sandbox
from reconciler.core.events import Event, EventType
from reconciler.core.layout import release_path
from reconciler.core.model import Action, BuilderState, HostState, Status
from reconciler.core.plan import HostPlan, Plan
from reconciler.core.release import RELEASE_LIMIT
from reconciler.daemon import page
from reconciler.daemon.page import Filter, HostRow, Point, Series
from reconciler.daemon.triggers import Unauthorized, check_bearer
from reconciler.daemon.web import (
    SECURITY_HEADERS,
    Access,
    FleetPage,
    dummy_hash,
    fleet_rows,
    is_loopback,
    parse_htpasswd,
    streaks,
)
from reconciler.errors import ConfigError
from tests.unit.test_daemon_pass import FLEET, HOST
from tests.unit.test_pass_events import EventWorld

EVIL = "<script>alert(1)</script>"
# Cost 4: the tests check what is compared, not how slowly.
HASH = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(4)).decode()


@pytest.fixture
def world(tmp_path: Path) -> EventWorld:
    return EventWorld(tmp_path)


def req(path: str = "/", headers: dict[str, str] | None = None, **query: str) -> Request:
    return Request(path, {k: [v] for k, v in query.items()}, headers or {}, "127.0.0.1")


def text(html: str) -> str:
    """What a browser shows of ``html``, roughly: tags out, entities as characters."""
    import html as h

    return h.unescape(re.sub(r"<[^>]+>", " ", html))


# -- views over a pass ---------------------------------------------------------


def test_the_fleet_view_shows_each_host_its_status_and_the_next_pass(world: EventWorld) -> None:
    world.source.push({**FLEET, "hosts/db-1.yaml": HOST.format(name="db-1", address="10.0.0.3/24")})
    world.nix.failing.add("db-1")
    world.nix.builder_probes = {"b1": Probe(0.0, Sandbox.OFF)}
    rec = world.reconciler()
    site = FleetPage(rec)
    assert rec.next_plan() is None
    rec.reconcile()
    view = site.fleet_view()
    by = {r.name: r for r in view.rows}
    assert (by["web-1"].status, by["web-1"].version, by["web-1"].action) == ("published", 1, Action.UNCHANGED)
    assert (by["db-1"].status, by["db-1"].action) == ("failed", Action.BACKOFF)
    assert "exit code 1" in (by["db-1"].error or "")
    # Where the builds ran: web-1 and web-2 here, db-1's failure too; b1, found building
    # outside its sandbox, got none.
    b1, local = view.builders
    assert (local.name, local.builds, local.failures, local.unreachable) == ("local", 2, 1, 0)
    assert (b1.name, b1.builds, b1.sandbox) == ("b1", 0, "off")
    html = page.render_fleet(view)
    assert '<section id="builders">' in html and '<tr data-builder="local">' in html
    row = re.search(r'<tr data-builder="b1">.*?</tr>', html)
    assert row is not None and "<td>off</td>" in row.group(0)
    # The failure streak's start comes from the history.
    assert by["db-1"].since == world.clock.t
    assert view.plan is not None and [e.host for e in view.plan.entries] == ["db-1"]
    assert view.counts()[Filter.FAILING] == 1 and view.counts()[Filter.PENDING] == 1
    # Once its backoff is over, the next pass rebuilds it.
    world.clock.advance(31)
    plan = site.fleet_view().plan
    assert plan is not None
    (entry,) = plan.entries
    assert entry.action == Action.REBUILD
    code, ctype, body = site.fleet(req(status="failing"))
    assert (code, ctype) == (200, "text/html; charset=utf-8")
    assert 'data-host="db-1"' in body.decode() and 'data-host="web-1"' not in body.decode()
    assert site.fleet(req(status="broken"))[0] == 400


def test_a_host_view_lists_its_releases_with_artifacts_and_its_failure_log(world: EventWorld) -> None:
    world.source.push(FLEET)
    rec = world.reconciler()
    rec.reconcile()
    world.nix.failing.add("web-1")
    world.source.push({**FLEET, "hosts/web-1.yaml": HOST.format(name="web-1", address="10.0.0.9/24")})
    world.clock.advance(5)
    rec.reconcile()
    site = FleetPage(rec)
    view = site.host_view("web-1")
    assert view is not None
    assert [(r.kind, r.version) for r in view.history] == [("host_failed", None), ("host_published", 1)]
    failed, published = view.history
    assert failed.reasons == "hosts/web-1.yaml changed"
    assert published.reasons == "new host, never published" and published.build_seconds is not None
    assert published.artifacts is not None and [a.name for a in published.artifacts] == [
        "web-1-1-linux-amd64.aci"
    ]
    assert view.log_tail is not None and "exit code 1" in view.log_tail
    assert view.failures == 1 and view.retry_at == world.clock.t + 30
    body = site.host(req("/host", name="web-1"))[2].decode()
    digest = published.artifacts[0].sha256
    assert f'title="sha256:{digest}"' in body and "exit code 1" in body
    assert site.host(req("/host", name="nobody"))[0] == 404
    assert site.host(req("/host"))[0] == 400


def test_a_release_file_the_store_holds_but_cannot_be_read_is_said_so(world: EventWorld) -> None:
    world.source.push(FLEET)
    rec = world.reconciler()
    rec.reconcile()
    site = FleetPage(rec)
    key = release_path("web-1", 1)
    for damage, why in (
        (b"{not json", "not a valid release file"),
        (b" " * (RELEASE_LIMIT + 1), f"larger than {RELEASE_LIMIT} bytes"),
    ):
        world.store.objects[key] = damage
        view = site.host_view("web-1")
        assert view is not None
        (published,) = view.history
        assert (published.artifacts, published.unreadable) == (None, why)
        body = text(site.host(req("/host", name="web-1"))[2].decode())
        assert f"(release file unreadable: {why})" in body and "no longer in the store" not in body
    del world.store.objects[key]
    view = site.host_view("web-1")
    assert view is not None and view.history[0].unreadable is None
    assert "(no longer in the store)" in text(site.host(req("/host", name="web-1"))[2].decode())


def test_a_collected_release_is_said_to_be_gone() -> None:
    rel = page.Release("host_published", 0.0, 3, "c" * 40, None, 1.0, None, None, None)
    assert "(no longer in the store)" in page._artifacts(rel)


# -- rendering -----------------------------------------------------------------


def evil_views() -> tuple[page.FleetView, page.HostView]:
    row = HostRow(EVIL, 2, EVIL, "failed", 100.0, False, Action.REBUILD, EVIL)
    plan = page.PlanView(EVIL, (HostPlan(EVIL, Action.REBUILD, (EVIL,)),))
    builder = BuilderState(EVIL, 3, 1, 2, 900.0, 75.0, EVIL, 950.0, EVIL)
    fleet = page.FleetView(
        1000.0, EVIL, (row,), Filter.ALL, None, plan, (Series(EVIL, "s", (Point(900.0, 1.0),)),), (builder,)
    )
    rel = page.Release("host_failed", 900.0, None, EVIL, EVIL, 1.0, None, EVIL)
    host = page.HostView(1000.0, row, plan.entries[0], 1, 1030.0, (rel,), f"line 1\n{EVIL}\n")
    return fleet, host


def test_everything_from_the_repository_is_escaped() -> None:
    fleet, host = evil_views()
    for html in (page.render_fleet(fleet), page.render_host(host)):
        assert "<script" not in html
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        assert EVIL in text(html)
    # In a link, the name is a query parameter, never a path or markup.
    assert 'href="/host?name=%3Cscript%3Ealert%281%29%3C%2Fscript%3E"' in page.render_fleet(fleet)


def test_the_log_tail_is_capped_to_its_end() -> None:
    _, host = evil_views()
    long = "x" * page.LOG_TAIL_CHARS + "THE END"
    html = page.render_host(page.HostView(0.0, host.row, None, 1, None, (), long))
    shown = re.search(r"<pre>(.*)</pre>", html, re.S)
    assert (
        shown is not None
        and len(shown.group(1)) == page.LOG_TAIL_CHARS
        and shown.group(1).endswith("THE END")
    )


def test_a_plot_shows_the_last_day_only() -> None:
    now = 100_000.0
    points = (Point(now - 90_000, 5.0), Point(now - 3600, 2.0), Point(now - 60, 4.0))
    svg = page.plot(Series("pass duration", "s", points), now)
    assert svg.count("<circle") == 2
    assert "(2 in the last 1d00h)" in svg and ">4.0s<" in svg  # the axis tops at the largest
    assert page.plot(Series("empty", "s", ()), now).count("<circle") == 0


def test_filters_select_rows() -> None:
    rows = {
        "failed": HostRow("a", 1, None, "failed", None, False, Action.BACKOFF, None),
        "invalid": HostRow("b", 0, None, "invalid", None, False, Action.INVALID, None),
        "suspended": HostRow("c", 1, None, "published", None, True, Action.SUSPENDED, None),
        "new": HostRow("d", 0, None, "new", None, False, Action.REBUILD, None),
        "fine": HostRow("e", 1, None, "published", None, False, Action.UNCHANGED, None),
    }
    chosen = {f: sorted(k for k, r in rows.items() if r.matches(f)) for f in Filter}
    assert chosen == {
        Filter.ALL: sorted(rows),
        Filter.FAILING: ["failed"],
        Filter.INVALID: ["invalid"],
        Filter.SUSPENDED: ["suspended"],
        Filter.PENDING: ["failed", "new"],
    }


def test_a_status_holds_since_the_first_failure_after_the_last_publication() -> None:
    def ev(t: float, kind: EventType, host: str = "a") -> Event:
        return Event(kind, t, host)

    events = [
        ev(1, EventType.HOST_FAILED),
        ev(2, EventType.HOST_PUBLISHED),
        ev(3, EventType.HOST_FAILED),
        ev(4, EventType.HOST_FAILED),
        ev(5, EventType.HOST_PUBLISHED, "b"),
    ]
    assert streaks(events) == {"a": 3, "b": 5}
    hosts = {
        "a": HostState("a", 1, "i", "c", Status.FAILED, "boom\nmore", 4.0),
        "z": HostState("z", 1, "i", "c", Status.FAILED, "boom", 9.0),
    }
    plan = Plan("c", (HostPlan("new-1", Action.REBUILD, ("new host, never published",)),))
    rows = {r.name: r for r in fleet_rows(hosts, plan, lambda h: h == "z", streaks(events))}
    assert (rows["a"].since, rows["a"].error, rows["a"].action) == (3, "boom", None)
    assert (rows["z"].since, rows["z"].suspended) == (9.0, True)  # nothing in the history: the ledger's
    assert (rows["new-1"].status, rows["new-1"].action) == ("new", Action.REBUILD)


# -- access ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "loopback"),
    [
        ("127.0.0.1:9180", True),
        ("127.0.0.53:9180", True),
        ("localhost:9180", True),
        ("[::1]:9180", True),
        ("0.0.0.0:9180", False),
        ("[::]:9180", False),
        ("10.0.0.5:9180", False),
        ("fleet.example:9180", False),
    ],
)
def test_loopback_addresses(listen: str, loopback: bool) -> None:
    assert is_loopback(listen) is loopback


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_on_loopback_the_page_is_open_and_elsewhere_closed_without_a_credential(tmp_path: Path) -> None:
    assert Access("127.0.0.1:9180", tmp_path / "r.yaml").guard(req()) is None
    closed = Access("0.0.0.0:9180", tmp_path / "r.yaml")
    refused = closed.guard(req())
    assert closed.closed and refused is not None and refused[0] == 403
    assert (
        b"web.token_file or web.basic_auth_file" in refused[2]
        and str(tmp_path / "r.yaml").encode() in refused[2]
    )


@pytest.mark.parametrize(
    ("host", "served"),
    [
        ("127.0.0.1:9180", True),
        ("localhost:9180", True),
        ("LOCALHOST.", True),
        ("[::1]:9180", True),
        ("127.1.2.3", True),
        ("rebind.attacker.example:9180", False),
        ("10.0.0.5:9180", False),
        ("[2001:db8::1]:9180", False),
        ("", False),
    ],
)
def test_an_open_page_answers_only_requests_naming_loopback(tmp_path: Path, host: str, served: bool) -> None:
    """Else a site whose name is pointed at 127.0.0.1 (DNS rebinding) reads it from a
    browser on this machine."""
    refused = Access("127.0.0.1:9180", tmp_path / "r.yaml").guard(req(headers={"host": host}))
    assert (refused is None) is served
    if refused is not None:
        assert refused[0] == 403


def page_server(access: Access) -> Server:
    """A started listener serving a page of "<p>fleet</p>" behind ``access``, as the daemon does."""
    server = Server(
        "127.0.0.1:0",
        CollectorRegistry(),
        lambda: (True, "ok"),
        lambda: (True, "ok"),
        get={"/": lambda r: (200, "text/html", b"<p>fleet</p>")},
        guard=access.guard,
        get_headers=SECURITY_HEADERS,
        challenge=access.challenge,
    )
    server.start()
    return server


@pytest.mark.parametrize(
    "host_lines",
    [b"host: rebind.attacker.example\r\n", b"Host: 127.0.0.1\r\nHost: rebind.attacker.example\r\n"],
    ids=["lower case", "twice"],
)
def test_an_open_page_reads_host_whatever_its_case_and_however_often_sent(
    tmp_path: Path, host_lines: bytes
) -> None:
    server = page_server(Access("127.0.0.1:0", tmp_path / "r.yaml"))
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as conn:
            conn.sendall(b"GET / HTTP/1.1\r\n" + host_lines + b"Connection: close\r\n\r\n")
            answer = b""
            while chunk := conn.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.0 403 ") or answer.startswith(b"HTTP/1.1 403 "), answer[:100]
        assert b"<p>fleet</p>" not in answer
    finally:
        server.stop()


@pytest.mark.parametrize("listen", ["127.0.0.1:9180", "0.0.0.0:9180"])
def test_a_token_or_a_password_is_needed_wherever_one_is_configured(tmp_path: Path, listen: str) -> None:
    # $2y$: what Apache's htpasswd -B writes.
    users = parse_htpasswd(f"ops:{HASH}\nci:{HASH.replace('$2b$', '$2y$')}\n", "r.yaml")
    access = Access(listen, tmp_path / "r.yaml", b"tok3n", users)
    assert access.challenge is not None
    assert access.guard(req(headers={"Authorization": "Bearer tok3n"})) is None
    assert access.guard(req(headers=basic("ops", "s3cret"))) is None
    assert access.guard(req(headers=basic("ci", "s3cret"))) is None
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": "Bearer tok3né"},
        basic("ops", "wrong"),
        basic("nobody", "s3cret"),
        {"Authorization": "Basic !!!not base64"},
        {"Authorization": "Basic " + base64.b64encode(b"\xff\xfe").decode()},
    ):
        refused = access.guard(req(headers=headers))
        assert refused is not None and refused[0] == 401, headers
    # A token alone: no basic-auth prompt, and a password is no way in.
    only_token = Access(listen, tmp_path / "r.yaml", b"tok3n")
    assert only_token.challenge is None
    assert only_token.guard(req(headers=basic("ops", "s3cret"))) is not None


def test_the_page_takes_a_token_exactly_when_post_reconcile_does(tmp_path: Path) -> None:
    # Both check the bearer token one way (triggers.check_bearer): a header that one
    # lets in and the other refuses would be a way around either. Malformed and
    # non-ASCII headers (http.server reads them as Latin-1) are refused, not a crash.
    access = Access("0.0.0.0:9180", tmp_path / "r.yaml", b"tok3n")
    for given in (
        "Bearer tok3n",
        "bearer   tok3n ",
        " BEARER tok3n",
        "Bearer tok3n2",
        "Bearer tok3",
        "Bearer",
        "Bearer ",
        "Bearer\ttok3n",
        "Token tok3n",
        "tok3n",
        "Bearer tok3n\u00e9",
        "Bearer \udcfftok3n",
        "",
    ):
        headers = {"Authorization": given}
        try:
            check_bearer(headers, b"tok3n")
            taken = True
        except Unauthorized:
            taken = False
        answer = access.guard(req(headers=headers))
        assert (answer is None) is taken, given
        assert answer is None or answer[:2] == (401, "text/plain; charset=utf-8"), given
    assert access.guard(req()) is not None


def test_the_basic_auth_file_takes_only_bcrypt_hashes(tmp_path: Path) -> None:
    assert parse_htpasswd(f"# ops\n\nops:{HASH}\nci:{HASH.replace('$2b$', '$2y$')}\n", "f") == {
        "ops": HASH.encode(),
        "ci": HASH.replace("$2b$", "$2y$").encode(),
    }
    for bad, why in (
        ("ops:$apr1$abc$def\n", "line 1: only bcrypt hashes are accepted (htpasswd -B)"),
        ("ops:{SHA}abc=\n", "line 1: only bcrypt hashes are accepted (htpasswd -B)"),
        ("# none\n", "lists no user"),
        (f"ops:{HASH[:-1]}\n", "line 1: not a whole bcrypt hash"),
        ("ops:$2b$99$" + "a" * 53 + "\n", "line 1: not a whole bcrypt hash"),
        (f"ops:{HASH}\njust-a-name\n", "line 2: must be USER:HASH (htpasswd -B)"),
        # Who exists would show in how long a wrong password takes.
        (
            f"ops:{HASH}\nci:{HASH.replace('$04$', '$05$')}\n",
            "hashes of different bcrypt costs (4, 5) tell which users exist by how long a wrong "
            "password takes: hash every password at one cost",
        ),
    ):
        with pytest.raises(ConfigError) as exc:
            parse_htpasswd(bad, "reconciler.yaml")
        assert (exc.value.key, exc.value.reason) == ("web.basic_auth_file", why)


def test_the_config_names_the_web_files(tmp_path: Path) -> None:
    base = (
        "repo: {url: /r}\nstore: {type: filesystem, path: /s}\nstate_dir: /st\n"
        "signing: {gnupghome: /g, key: K}\n"
    )
    (tmp_path / "r.yaml").write_text(
        base + "web: {token_file: web.token, basic_auth_file: /etc/web.htpasswd}\n"
    )
    cfg = load_config(tmp_path / "r.yaml")
    assert (cfg.web.token_file, cfg.web.basic_auth_file) == (
        tmp_path / "web.token",
        Path("/etc/web.htpasswd"),
    )
    (tmp_path / "r.yaml").write_text(base + "web: {password: x}\n")
    with pytest.raises(ConfigError) as exc:
        load_config(tmp_path / "r.yaml")
    assert exc.value.key.startswith("web")


def test_the_server_sends_the_policy_and_asks_a_browser_for_a_password(tmp_path: Path) -> None:
    server = page_server(Access("127.0.0.1:0", tmp_path / "r.yaml", users=parse_htpasswd(f"ops:{HASH}", "f")))
    url = f"http://127.0.0.1:{server.port}/"
    try:
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(url, timeout=10)
        assert exc.value.code == 401
        assert exc.value.headers["WWW-Authenticate"] == 'Basic realm="reconciler", charset="UTF-8"'
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=basic("ops", "s3cret")), timeout=10
        ) as r:
            assert r.read() == b"<p>fleet</p>"
            assert r.headers["Content-Security-Policy"] == SECURITY_HEADERS["Content-Security-Policy"]
            assert r.headers["X-Content-Type-Options"] == "nosniff"
        # The probes stay unguarded and carry no page headers.
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=10) as r:
            assert r.headers["Content-Security-Policy"] is None
    finally:
        server.stop()


def test_the_daemon_reads_the_web_files_and_names_the_key_of_a_bad_one(tmp_path: Path) -> None:
    from reconciler.daemon.loop import access

    base = (
        "repo: {url: /r}\nstore: {type: filesystem, path: /s}\nstate_dir: /st\n"
        "signing: {gnupghome: /g, key: K}\nlisten: 0.0.0.0:9180\n"
    )
    path = tmp_path / "r.yaml"
    path.write_text(base)
    assert access(load_config(path)).closed
    (tmp_path / "web.token").write_text("tok3n\n")
    (tmp_path / "web.htpasswd").write_text(f"ops:{HASH}\n")
    path.write_text(base + "web: {token_file: web.token, basic_auth_file: web.htpasswd}\n")
    got = access(load_config(path))
    assert not got.closed and got.guard(req(headers={"Authorization": "Bearer tok3n"})) is None
    assert got.guard(req(headers=basic("ops", "s3cret"))) is None
    for files, key, reason in (
        ("{token_file: missing.token}", "web.token_file", "No such file or directory"),
        ("{token_file: empty.token}", "web.token_file", "the file is empty"),
        ("{basic_auth_file: md5.htpasswd}", "web.basic_auth_file", "line 1: only bcrypt hashes"),
    ):
        (tmp_path / "empty.token").write_text("\n")
        (tmp_path / "md5.htpasswd").write_text("ops:$apr1$salt$hash\n")
        path.write_text(base + f"web: {files}\n")
        with pytest.raises(ConfigError) as exc:
            access(load_config(path))
        assert (exc.value.path, exc.value.key) == (str(path), key)
        assert exc.value.reason.startswith(reason)
        # Never what the file holds.
        assert "$apr1$" not in str(exc.value)


def test_a_state_that_cannot_be_read_is_said_in_a_line(
    world: EventWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    from reconciler.errors import StateError

    world.source.push(FLEET)
    rec = world.reconciler()
    rec.reconcile()

    def damaged() -> dict[str, HostState]:
        raise StateError("state.db: file is not a database")

    monkeypatch.setattr(world.ledger, "hosts", damaged)
    site = FleetPage(rec)
    for answer in (site.fleet(req()), site.host(req("/host", name="web-1"))):
        assert answer == (
            503,
            "text/plain; charset=utf-8",
            b"cannot read the daemon's state: state.db: file is not a database\n",
        )


# -- review: attacks on the guard ---------------------------------------------------


def test_a_password_longer_than_bcrypt_reads_is_refused_not_a_crash(tmp_path: Path) -> None:
    # bcrypt 5 raises ValueError on more than 72 bytes: the guard raised, the handler
    # crashed and every such request logged an internal error.
    access = Access("0.0.0.0:9180", tmp_path / "r.yaml", users=parse_htpasswd(f"ops:{HASH}", "f"))
    for user in ("ops", "nobody"):
        refused = access.guard(req(headers=basic(user, "x" * 100)))
        assert refused is not None and refused[0] == 401
    # What htpasswd -B hashed of a long password (its first 72 bytes) lets its user in.
    long = "p" * 72
    cut = bcrypt.hashpw(long.encode(), bcrypt.gensalt(4)).decode()
    access = Access("0.0.0.0:9180", tmp_path / "r.yaml", users=parse_htpasswd(f"ops:{cut}", "f"))
    assert access.guard(req(headers=basic("ops", long + "tail"))) is None


def test_a_basic_credential_outside_ascii_is_refused_not_a_crash(tmp_path: Path) -> None:
    # http.server reads header values as Latin-1; base64 raised a plain ValueError on
    # them, which the guard did not catch: the handler crashed.
    access = Access("0.0.0.0:9180", tmp_path / "r.yaml", users=parse_htpasswd(f"ops:{HASH}", "f"))
    refused = access.guard(req(headers={"Authorization": "Basic b3BzOnMzY3JldA\u00e9="}))
    assert refused is not None and refused[0] == 401


def test_an_unknown_user_is_checked_at_the_cost_of_the_known_ones() -> None:
    # A dummy of another cost than the users' would let the timing tell which exist.
    costly = bcrypt.hashpw(b"x", bcrypt.gensalt(5))
    assert dummy_hash({"ops": costly})[:7] == b"$2b$05$"
    assert dummy_hash({"ops": HASH.encode(), "ci": costly})[:7] == b"$2b$05$"


def test_localhost_is_loopback_only_where_it_resolves_to_loopback(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    assert is_loopback("localhost:9180")  # this machine's /etc/hosts
    real = socket.getaddrinfo

    def hosts(host: str, *args: Any, **kwargs: Any) -> Any:
        if host == "localhost":  # an /etc/hosts that maps localhost to the LAN
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.5", 0))]
        return real(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", hosts)
    assert not is_loopback("localhost:9180")
    assert Access("localhost:9180", Path("r.yaml")).closed
