"""The read-only fleet page on the daemon's listen address, and who may read it.

The page (``/``, ``/host?name=``, ``/page.css``) is drawn by reconciler.daemon.page
from what the daemon holds already: the ledger, the event history, the store's release
files and the last pass's observation. It never reads a file of the machine: a failed
build's log is the redacted tail the ledger keeps (core.nixlog.build_failure).

Access (a Server guard over the page and the JSON APIs; /metrics and the probes are not
guarded): on a loopback listen address anyone who reaches it; with ``web.token_file``
(Authorization: Bearer) or ``web.basic_auth_file`` (htpasswd lines with bcrypt hashes)
only those who present one, wherever it listens; on any other address with neither,
nobody: the page is refused with a message naming the keys to set. An open loopback
page answers only requests that name this machine's loopback in their Host header:
else a web site whose name an attacker points at 127.0.0.1 (DNS rebinding) could read
it from a browser on this machine, or on a laptop with an ssh tunnel to it.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import logging
import re
import socket
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import bcrypt

from reconciler import log
from reconciler.adapters.http import GetHandler, Request, Response
from reconciler.core.events import MAX_LIMIT, Event, EventQuery, EventType
from reconciler.core.layout import release_path
from reconciler.core.model import COMMIT_KEY, Action, HostState, Status
from reconciler.core.plan import Plan
from reconciler.core.release import RELEASE_LIMIT, Artifact, parse_release
from reconciler.daemon import page
from reconciler.daemon.page import Filter, HostRow, Point, Series
from reconciler.daemon.triggers import Unauthorized, authorization, check_bearer
from reconciler.errors import ConfigError, ObjectTooLargeError, ReconcilerError, VerificationError

if TYPE_CHECKING:
    from reconciler.daemon.reconciler import Reconciler

# Sent with every answer of the page and the APIs. The page runs no script, loads only
# its own stylesheet, may not be framed, and its links leak no URL elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}
OUTCOMES = frozenset(
    {EventType.HOST_PUBLISHED, EventType.HOST_ADOPTED, EventType.HOST_FAILED, EventType.HOST_INVALID}
)
PUBLISHED = frozenset({EventType.HOST_PUBLISHED, EventType.HOST_ADOPTED})
CHALLENGE = 'Basic realm="reconciler", charset="UTF-8"'
HTML = "text/html; charset=utf-8"
# The newest releases of a host whose artifacts the host page reads from the store.
ARTIFACT_RELEASES = 10
# Events a host page reads of its host's history.
HOST_EVENTS = 500


# A bcrypt hash compared when the user is unknown, so the answer takes as long as for a
# known one: the timing does not tell which users exist. Its cost is the highest of the
# file's (a check's time doubles with each step of cost: a dummy of another cost than
# the users' would tell a known user from an unknown one).
@functools.cache
def _dummy(cost: int = 10) -> bytes:
    return bcrypt.hashpw(b"not a password", bcrypt.gensalt(cost))


def dummy_hash(users: Mapping[str, bytes]) -> bytes:
    """The hash an unknown user's password is checked against (see _dummy)."""
    return _dummy(max((int(h[4:6]) for h in users.values()), default=10))


# bcrypt reads at most this many bytes of a password (htpasswd -B hashes no more);
# bcrypt 5 raises ValueError on longer ones instead of cutting them.
MAX_PASSWORD = 72


# A bcrypt hash as htpasswd -B and bcrypt.hashpw write it: variant, cost, 22 characters
# of salt and 31 of hash.
_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")


def is_loopback(listen: str) -> bool:
    """Whether ``listen`` (HOST:PORT) is reachable only from this machine."""
    host = listen.rpartition(":")[0].strip("[]")
    if host == "localhost":
        # The listener binds to what the name resolves to (an IPv4 address: the
        # Server's family), which /etc/hosts may make any address: loopback only if
        # every address it names is.
        try:
            found = {a[4][0] for a in socket.getaddrinfo(host, None, socket.AF_INET, socket.SOCK_STREAM)}
        except OSError:
            return False
        return bool(found) and all(ipaddress.ip_address(a).is_loopback for a in found)
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _names_loopback(host: str) -> bool:
    """Whether a Host header (NAME or NAME:PORT) names this machine's loopback:
    localhost or a loopback address."""
    name = host.strip().lower()
    if name.startswith("["):
        name = name[1:].partition("]")[0]
    elif name.count(":") == 1:
        name = name.partition(":")[0]
    if name.rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def parse_htpasswd(text: str, file: str, key: str = "web.basic_auth_file") -> dict[str, bytes]:
    """user -> bcrypt hash from htpasswd lines (``htpasswd -B``); blank lines and #
    comments are skipped. Any other hash is refused: MD5, SHA-1 and crypt(3) are too
    fast to stand a stolen file."""
    users: dict[str, bytes] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not user or not hashed:
            raise ConfigError(file, key, f"line {n}: must be USER:HASH (htpasswd -B)")
        if not hashed.startswith("$2"):
            raise ConfigError(file, key, f"line {n}: only bcrypt hashes are accepted (htpasswd -B)")
        if not _BCRYPT.fullmatch(hashed):
            raise ConfigError(file, key, f"line {n}: not a whole bcrypt hash")
        users[user] = hashed.encode()
    if not users:
        raise ConfigError(file, key, "lists no user")
    costs = sorted({int(h[4:6]) for h in users.values()})
    if len(costs) > 1:
        # A wrong password takes as long as its user's cost: with two costs, how long
        # an answer takes tells which users exist (an unknown one costs the highest).
        raise ConfigError(
            file,
            key,
            f"hashes of different bcrypt costs ({', '.join(map(str, costs))}) tell which users exist "
            "by how long a wrong password takes: hash every password at one cost",
        )
    return users


class Access:
    """The guard of the page and the JSON APIs (module docstring)."""

    def __init__(
        self, listen: str, config: Path, token: bytes = b"", users: Mapping[str, bytes] | None = None
    ):
        self._token = token
        self._users = dict(users or {})
        self._open = is_loopback(listen) and not token and not self._users
        self._closed = (not is_loopback(listen)) and not token and not self._users
        self._refusal = (
            f"forbidden: the fleet page and the APIs are not served on {listen}, which is not a "
            f"loopback address, without web.token_file or web.basic_auth_file in {config}\n"
        ).encode()

    @property
    def challenge(self) -> str | None:
        return CHALLENGE if self._users else None

    @property
    def closed(self) -> bool:
        """Nobody may read the page: it listens beyond loopback with no credential set."""
        return self._closed

    def guard(self, request: Request) -> Response | None:
        if self._open:
            host = request.headers.get("host")
            if host is None or _names_loopback(host):
                return None  # a client that names no host is no browser
            return 403, "text/plain; charset=utf-8", b"forbidden: not this machine's loopback name in Host\n"
        if self._closed:
            return 403, "text/plain; charset=utf-8", self._refusal
        if self._token:
            try:
                check_bearer(request.headers, self._token)
            except Unauthorized:
                pass  # maybe a password, below; the answer says no more than "unauthorized"
            else:
                return None
        scheme, credential = authorization(request.headers) or ("", "")
        if self._users and scheme == "basic" and self._basic(credential):
            return None
        return 401, "text/plain; charset=utf-8", b"unauthorized\n"

    def _basic(self, credential: str) -> bool:
        try:
            user, sep, password = base64.b64decode(credential, validate=True).decode("utf-8").partition(":")
        # binascii.Error, UnicodeDecodeError, or a plain ValueError for a character
        # outside ASCII (http.server reads header values as Latin-1).
        except ValueError:
            return False
        hashed = self._users.get(user)
        # bcrypt 5 raises on a password longer than it reads, which would crash the
        # handler: it gets what bcrypt reads of it, as htpasswd -B hashed it.
        secret = password.encode()[:MAX_PASSWORD]
        # checkpw compares in constant time; an unknown user costs a check all the same.
        # The dummy is made on first use (cached): at a high cost it takes as long as a
        # login, which a daemon's start need not wait for.
        ok = bcrypt.checkpw(secret, hashed if hashed is not None else dummy_hash(self._users))
        return ok and hashed is not None and bool(sep)


def read_users(path: Path | None, config: Path) -> dict[str, bytes]:
    if path is None:
        return {}
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(str(config), "web.basic_auth_file", why or str(exc)) from None
    # The errors name the key in the config, never a line of the file (it holds hashes).
    return parse_htpasswd(text, str(config))


class FleetPage:
    """The page's routes over a Reconciler's ledger, history, store and last plan."""

    def __init__(self, reconciler: Reconciler) -> None:
        self.reconciler = reconciler

    def routes(self) -> dict[str, GetHandler]:
        return {"/": self.fleet, "/host": self.host, "/page.css": self.css, "/favicon.svg": self.icon}

    def icon(self, request: Request) -> Response:
        return 200, "image/svg+xml", page.ICON.encode()

    def css(self, request: Request) -> Response:
        return 200, "text/css; charset=utf-8", page.CSS.encode()

    def fleet(self, request: Request) -> Response:
        values = request.query.get("status") or [""]
        try:
            chosen = Filter(values[0])
        except ValueError:
            known = ", ".join(f.value for f in Filter if f.value)
            return 400, "text/plain; charset=utf-8", f"status: must be one of {known}\n".encode()
        try:
            return 200, HTML, page.render_fleet(self.fleet_view(chosen)).encode()
        except ReconcilerError as exc:
            return _unavailable(exc)

    def host(self, request: Request) -> Response:
        names = request.query.get("name") or []
        if len(names) != 1:
            return 400, "text/plain; charset=utf-8", b"name: give one host name\n"
        try:
            view = self.host_view(names[0])
        except ReconcilerError as exc:
            return _unavailable(exc)
        if view is None:
            return 404, "text/plain; charset=utf-8", b"no such host\n"
        return 200, HTML, page.render_host(view).encode()

    # -- views ---------------------------------------------------------------

    def fleet_view(self, chosen: Filter = Filter.ALL) -> page.FleetView:
        rec = self.reconciler
        now = rec.clock.now().timestamp()
        plan = rec.next_plan()
        outcomes = rec.history(
            EventQuery(
                types=frozenset(
                    {
                        EventType.HOST_PUBLISHED,
                        EventType.HOST_ADOPTED,
                        EventType.HOST_FAILED,
                        EventType.HOST_INVALID,
                    }
                ),
                limit=MAX_LIMIT,
            )
        )
        passes = rec.history(
            EventQuery(
                types=frozenset({EventType.PASS_FINISHED}), since=now - page.PLOT_WINDOW, limit=MAX_LIMIT
            )
        )
        suspended = rec.state.suspensions()
        rows = fleet_rows(rec.state.hosts(), plan, suspended.covers, streaks(outcomes))
        return page.FleetView(
            now=now,
            commit=rec.state.get_meta(COMMIT_KEY),
            rows=rows,
            filter=chosen,
            fleet_suspended=suspended.fleet,
            plan=None
            if plan is None
            else page.PlanView(plan.commit, tuple(e for e in plan.entries if e.action in page.PLAN_SHOWN)),
            plots=plots(passes, outcomes),
            builders=tuple(rec.state.builders().values()),
        )

    def host_view(self, name: str) -> page.HostView | None:
        rec = self.reconciler
        now = rec.clock.now().timestamp()
        hosts = rec.state.hosts()
        plan = rec.next_plan()
        entry = next((e for e in plan.entries if e.host == name), None) if plan is not None else None
        if name not in hosts and entry is None:
            return None
        events = rec.history(EventQuery(host=name, limit=HOST_EVENTS))
        suspended = rec.state.suspensions()
        only = {name: hosts[name]} if name in hosts else {}
        rows = fleet_rows(
            only, Plan(plan.commit, (entry,)) if plan and entry else None, suspended.covers, streaks(events)
        )
        row = next(r for r in rows if r.name == name)
        hs = hosts.get(name)
        failing = hs is not None and hs.status == Status.FAILED
        return page.HostView(
            now=now,
            row=row,
            plan=entry,
            failures=hs.failures if hs is not None else 0,
            retry_at=hs.retry_at if failing and hs is not None else None,
            history=self._history(name, events),
            log_tail=hs.error if failing and hs is not None else None,
        )

    def _history(self, host: str, events: list[Event]) -> tuple[page.Release, ...]:
        built = {(e.version, e.commit): e.seconds for e in events if e.type == EventType.HOST_BUILT}
        out = []
        read = 0
        for ev in reversed(events):
            if ev.type not in OUTCOMES:
                continue
            artifacts = unreadable = None
            if ev.type in PUBLISHED and ev.version is not None and read < ARTIFACT_RELEASES:
                read += 1
                artifacts, unreadable = self._artifacts(host, ev.version)
            reasons = ev.data.get("reasons")
            out.append(
                page.Release(
                    kind=ev.type.value,
                    time=ev.time,
                    version=ev.version,
                    commit=ev.commit,
                    reasons=reasons if isinstance(reasons, str) else None,
                    seconds=ev.seconds,
                    build_seconds=built.get((ev.version, ev.commit)),
                    error=ev.error,
                    artifacts=artifacts,
                    unreadable=unreadable,
                )
            )
        return tuple(out)

    def _artifacts(self, host: str, version: int) -> tuple[tuple[Artifact, ...] | None, str | None]:
        """The artifacts ``host``'s release ``version`` lists (None: no longer in the
        store), or why its release file cannot be read: said on the page, not shown as
        collected, since a release file the store holds but no one can read is what a
        damaged or tampered store looks like. The reason names no store location."""
        key = release_path(host, version)
        try:
            data = self.reconciler.store.get_bytes(key, RELEASE_LIMIT)
            return (None if data is None else parse_release(data, key).artifacts), None
        except ObjectTooLargeError:
            why = f"larger than {RELEASE_LIMIT} bytes"
        except VerificationError:
            why = "not a valid release file"
        except ReconcilerError:
            why = "the store could not be read"
        log.event("release_unreadable", logging.WARNING, host=host, version=version, reason=why)
        return None, why


def _unavailable(exc: ReconcilerError) -> Response:
    """The state could not be read (a damaged database): said in a line, not a dropped
    connection."""
    log.event("fleet_page_failed", logging.ERROR, error=str(exc))
    return 503, "text/plain; charset=utf-8", f"cannot read the daemon's state: {exc}\n".encode()


def streaks(events: list[Event]) -> dict[str, float]:
    """host -> since when its last outcome holds, from its outcomes in history order:
    the first failure after its last publication, or that publication."""
    since: dict[str, float] = {}
    failing: dict[str, bool] = {}
    for ev in events:
        if ev.host is None:
            continue
        bad = ev.type in (EventType.HOST_FAILED, EventType.HOST_INVALID)
        if not bad or not failing.get(ev.host, False):
            since[ev.host] = ev.time
        failing[ev.host] = bad
    return since


def fleet_rows(
    hosts: Mapping[str, HostState],
    plan: Plan | None,
    suspended: Callable[[str], bool] | None = None,
    since: Mapping[str, float] | None = None,
) -> tuple[HostRow, ...]:
    """A row per host the ledger or the plan knows, by name."""
    entries = {e.host: e for e in plan.entries} if plan is not None else {}
    covers = suspended or (lambda _: False)
    known = since or {}
    rows = []
    for name in sorted(hosts.keys() | entries.keys()):
        hs, entry = hosts.get(name), entries.get(name)
        if hs is None:
            assert entry is not None
            status = "invalid" if entry.action == Action.INVALID else "new"
            error = entry.reasons[0] if entry.action == Action.INVALID else None
            rows.append(HostRow(name, 0, None, status, None, covers(name), entry.action, error))
            continue
        error = hs.error.splitlines()[0] if hs.error else None
        # What the ledger says, unless the history knows when the streak began.
        at = known.get(name, hs.updated) if hs.status in (Status.FAILED, Status.INVALID) else hs.updated
        rows.append(
            HostRow(
                name,
                hs.version,
                hs.commit,
                hs.status.value,
                at or None,
                covers(name),
                entry.action if entry is not None else None,
                error,
            )
        )
    return tuple(rows)


def plots(passes: list[Event], outcomes: list[Event]) -> tuple[Series, ...]:
    durations = tuple(
        Point(e.time, e.seconds) for e in passes if e.seconds is not None and "published" in e.data
    )
    latencies = []
    for e in outcomes:
        latency = e.data.get("latency")
        if e.type == EventType.HOST_PUBLISHED and isinstance(latency, (int, float)):
            latencies.append(Point(e.time, float(latency)))
    return (
        Series("pass duration", "s", durations),
        Series("commit to published", "s", tuple(latencies)),
    )
