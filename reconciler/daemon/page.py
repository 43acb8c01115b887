"""The fleet page as HTML: frozen views in, text out, no I/O (reconciler.daemon.web
gathers the views and serves them).

Everything a view holds that came from the config repository or a build (host names,
commits, reasons, errors, build log lines) is untrusted: every such string goes
through html.escape here, and into URLs through urllib.parse.quote. The page runs no
script and loads nothing but its own stylesheet (web.SECURITY_HEADERS); the plots are
inline SVG drawn with presentation attributes, which the Content-Security-Policy
allows where it refuses style attributes.
"""

from __future__ import annotations

import html
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from reconciler.core.model import Action, BuilderState
from reconciler.core.plan import HostPlan
from reconciler.core.release import Artifact

# The plots cover this many seconds back from now.
PLOT_WINDOW = 86400.0
# A host page shows this much of the last failed build's log, the end of it (the
# ledger's error is already a redacted tail: core.nixlog.build_failure).
LOG_TAIL_CHARS = 16 << 10
# Hosts whose next pass does something: the rest of the plan is "unchanged".
PLAN_SHOWN = (Action.REBUILD, Action.BACKOFF, Action.INVALID, Action.REMOVED, Action.SUSPENDED)


class Filter(StrEnum):
    """The fleet table's filters (``/?status=``)."""

    ALL = ""
    FAILING = "failing"  # the last build failed
    INVALID = "invalid"  # the definition does not parse or evaluate
    SUSPENDED = "suspended"  # an operator suspended it, or the fleet
    PENDING = "pending"  # the next pass would rebuild it, or waits out its backoff to


@dataclass(frozen=True)
class HostRow:
    name: str
    version: int  # 0: nothing published
    commit: str | None  # of the published version
    status: str  # core.model.Status, or "new" for a host no pass has recorded yet
    since: float | None  # unix time the status holds since
    suspended: bool
    action: Action | None  # what the next pass would do (None: no plan yet)
    error: str | None  # one line

    def matches(self, f: Filter) -> bool:
        match f:
            case Filter.FAILING:
                return self.status == "failed"
            case Filter.INVALID:
                return self.status == "invalid" or self.action == Action.INVALID
            case Filter.SUSPENDED:
                return self.suspended
            case Filter.PENDING:
                return self.action in (Action.REBUILD, Action.BACKOFF)
        return True


@dataclass(frozen=True)
class Point:
    time: float  # unix time
    value: float


@dataclass(frozen=True)
class Series:
    title: str
    unit: str
    points: tuple[Point, ...]


@dataclass(frozen=True)
class PlanView:
    commit: str
    entries: tuple[HostPlan, ...]  # the hosts whose next pass would do something


@dataclass(frozen=True)
class FleetView:
    now: float
    commit: str | None  # the last reconciled commit
    rows: tuple[HostRow, ...]  # every host, by name
    filter: Filter
    fleet_suspended: float | None
    plan: PlanView | None  # None: no pass has observed the repository yet
    plots: tuple[Series, ...]
    # Where builds ran (local: this machine), as `reconciler status` lists them.
    builders: tuple[BuilderState, ...] = ()

    def counts(self) -> dict[Filter, int]:
        return {f: sum(r.matches(f) for r in self.rows) for f in Filter}


@dataclass(frozen=True)
class Release:
    """One thing that happened to a host's releases: published, adopted or failed."""

    kind: str  # host_published, host_adopted, host_failed, host_invalid
    time: float
    version: int | None
    commit: str | None
    reasons: str | None
    seconds: float | None  # publishing it took
    build_seconds: float | None
    error: str | None
    # The release's artifacts as the store's release file lists them; None when that
    # is not read (a failure), no longer there (collected) or cannot be read
    # (``unreadable`` says why).
    artifacts: tuple[Artifact, ...] | None = None
    unreadable: str | None = None


@dataclass(frozen=True)
class HostView:
    now: float
    row: HostRow
    plan: HostPlan | None
    failures: int
    retry_at: float | None
    history: tuple[Release, ...]  # newest first
    log_tail: str | None  # the last failed build's, when the host is failing


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


def host_url(name: str) -> str:
    return "/host?name=" + urllib.parse.quote(name, safe="")


def when(unix: float | None, now: float) -> str:
    """A time as UTC and how long ago, in a <time> element."""
    if unix is None:
        return "-"
    at = datetime.fromtimestamp(unix, UTC)
    stamp = at.strftime("%Y-%m-%d %H:%M:%SZ")
    return f'<time datetime="{e(at.isoformat())}" title="{e(stamp)}">{e(ago(now - unix))}</time>'


def ago(seconds: float) -> str:
    if seconds < 0:
        return "in " + duration(-seconds)
    return duration(seconds) + " ago"


def duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    if seconds < 86400:
        return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
    return f"{int(seconds // 86400)}d{int(seconds % 86400 // 3600):02d}h"


def short(commit: str | None) -> str:
    if not commit:
        return "-"
    return f'<code title="{e(commit)}">{e(commit[:12])}</code>'


def _page(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f'<title>{e(title)}</title><link rel="stylesheet" href="/page.css">'
        '<link rel="icon" href="/favicon.svg" type="image/svg+xml"></head>'
        f'<body><header><a href="/">fleet</a></header><main>{body}</main></body></html>\n'
    )


def render_fleet(view: FleetView) -> str:
    counts = view.counts()
    shown = [r for r in view.rows if r.matches(view.filter)]
    parts = ["<h1>Fleet</h1>"]
    parts.append(
        f'<p id="summary">{len(view.rows)} hosts; last reconciled commit {short(view.commit)}'
        + (
            '; <strong class="warn">the whole fleet is suspended</strong> since '
            + when(view.fleet_suspended, view.now)
            if view.fleet_suspended is not None
            else ""
        )
        + "</p>"
    )
    links = []
    for f in Filter:
        label = f.value or "all"
        href = "/" if f is Filter.ALL else f"/?status={f.value}"
        current = ' aria-current="page"' if f is view.filter else ""
        links.append(f'<a href="{e(href)}"{current} data-filter="{e(label)}">{e(label)} ({counts[f]})</a>')
    parts.append(f'<nav id="filters">{" ".join(links)}</nav>')
    parts.append(f'<section id="plots">{"".join(plot(s, view.now) for s in view.plots)}</section>')
    parts.append(_fleet_table(shown, view.now))
    parts.append(_plan(view.plan))
    parts.append(_builders(view.builders, view.now))
    return _page("Fleet", "".join(parts))


def _fleet_table(rows: Sequence[HostRow], now: float) -> str:
    head = (
        '<table id="fleet"><thead><tr><th>host</th><th>version</th><th>commit</th><th>status</th>'
        "<th>since</th><th>next pass</th><th>why</th></tr></thead><tbody>"
    )
    out = [head]
    for r in rows:
        status = r.status + (" (suspended)" if r.suspended else "")
        out.append(
            f'<tr class="{e(r.status)}" data-host="{e(r.name)}">'
            f'<td><a href="{e(host_url(r.name))}">{e(r.name)}</a></td>'
            f"<td>{r.version or '-'}</td><td>{short(r.commit)}</td>"
            f'<td class="status">{e(status)}</td><td>{when(r.since, now)}</td>'
            f"<td>{e(r.action or '-')}</td><td>{e(r.error or '')}</td></tr>"
        )
    if not rows:
        out.append('<tr><td colspan="7">no host matches</td></tr>')
    out.append("</tbody></table>")
    return "".join(out)


def _plan(plan: PlanView | None) -> str:
    if plan is None:
        return (
            '<section id="plan"><h2>Next pass</h2><p>No pass has observed the repository yet.</p></section>'
        )
    head = (
        f'<section id="plan"><h2>Next pass</h2><p>At commit {short(plan.commit)} (the head the last '
        "pass observed; a newer one is fetched when the pass starts): "
        f"{len(plan.entries)} hosts to act on, the others unchanged.</p>"
    )
    if not plan.entries:
        return head + "</section>"
    rows = "".join(
        f'<tr><td><a href="{e(host_url(p.host))}">{e(p.host)}</a></td><td>{e(p.action)}</td>'
        f"<td>{e('; '.join(p.reasons))}</td></tr>"
        for p in plan.entries
    )
    table = "<table><thead><tr><th>host</th><th>action</th><th>why</th></tr></thead>"
    return head + f"{table}<tbody>{rows}</tbody></table></section>"


def _builders(builders: Sequence[BuilderState], now: float) -> str:
    if not builders:
        return ""
    head = (
        '<section id="builders"><h2>Builders</h2><table><thead><tr><th>builder</th><th>built</th>'
        "<th>failed</th><th>unreachable</th><th>last build</th><th>took</th><th>sandbox</th>"
        "<th>last error</th></tr></thead><tbody>"
    )
    rows = []
    for b in builders:
        took = "-" if b.last_seconds is None else duration(b.last_seconds)
        error = "" if b.last_error is None else f"{when(b.last_error_at, now)}: {e(b.last_error)}"
        rows.append(
            f'<tr data-builder="{e(b.name)}"><td>{e(b.name)}</td><td>{b.builds}</td><td>{b.failures}</td>'
            f"<td>{b.unreachable}</td><td>{when(b.last_build, now)}</td><td>{took}</td>"
            f"<td>{e(b.sandbox or '-')}</td><td>{error}</td></tr>"
        )
    return head + "".join(rows) + "</tbody></table></section>"


def render_host(view: HostView) -> str:
    r, now = view.row, view.now
    parts = [f"<h1>{e(r.name)}</h1>", '<dl id="host">']
    facts: list[tuple[str, str]] = [
        ("status", e(r.status + (" (suspended)" if r.suspended else ""))),
        ("since", when(r.since, now)),
        ("published version", str(r.version or "-")),
        ("commit", short(r.commit)),
    ]
    if view.failures:
        retry = f"; next retry {when(view.retry_at, now)}" if view.retry_at is not None else ""
        facts.append(("failed builds in a row", f"{view.failures}{retry}"))
    if view.plan is not None:
        facts.append(("next pass", f"{e(view.plan.action)}: {e('; '.join(view.plan.reasons))}"))
    parts += [f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts]
    parts.append("</dl>")
    if view.log_tail is not None:
        tail = view.log_tail[-LOG_TAIL_CHARS:]
        parts.append(f'<section id="log"><h2>Last failed build</h2><pre>{e(tail)}</pre></section>')
    parts.append(_history(view.history, now))
    return _page(r.name, "".join(parts))


def _history(history: Iterable[Release], now: float) -> str:
    out = [
        '<section id="history"><h2>Releases</h2><table><thead><tr><th>when</th><th>what</th>'
        "<th>version</th><th>commit</th><th>why</th><th>build</th><th>took</th><th>artifacts</th>"
        "</tr></thead><tbody>"
    ]
    n = 0
    for rel in history:
        n += 1
        what = rel.kind.removeprefix("host_")
        took = duration(rel.seconds) if rel.seconds is not None else "-"
        build = duration(rel.build_seconds) if rel.build_seconds is not None else "-"
        why = rel.reasons or ""
        if rel.error:
            why = f"{why}: {rel.error}" if why else rel.error
        out.append(
            f'<tr class="{e(what)}"><td>{when(rel.time, now)}</td><td>{e(what)}</td>'
            f"<td>{e(rel.version if rel.version is not None else '-')}</td><td>{short(rel.commit)}</td>"
            f"<td>{e(why)}</td><td>{build}</td><td>{took}</td><td>{_artifacts(rel)}</td></tr>"
        )
    if not n:
        out.append('<tr><td colspan="8">nothing recorded in the event history</td></tr>')
    out.append("</tbody></table></section>")
    return "".join(out)


def _artifacts(rel: Release) -> str:
    if rel.unreadable is not None:
        return f"(release file unreadable: {e(rel.unreadable)})"
    if rel.artifacts is None:
        return "-" if rel.kind not in ("host_published", "host_adopted") else "(no longer in the store)"
    items = "".join(
        f'<li>{e(a.name)} <span class="size">{e(size(a.size))}</span> '
        f'<code class="digest" title="sha256:{e(a.sha256)}">sha256:{e(a.sha256[:16])}…</code></li>'
        for a in rel.artifacts
    )
    return f"<ul>{items}</ul>"


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")  # pragma: no cover


# The plots' drawing area, in SVG user units.
W, H, PAD = 360, 120, 30


def plot(series: Series, now: float, window: float = PLOT_WINDOW) -> str:
    """``series`` over the ``window`` seconds before ``now`` as a small SVG: one dot per
    point, the largest value on the axis."""
    pts = [p for p in series.points if now - window <= p.time <= now]
    top = max((p.value for p in pts), default=0.0) or 1.0

    def x(t: float) -> float:
        return PAD + (W - PAD - 5) * (t - (now - window)) / window

    def y(v: float) -> float:
        return H - PAD + 10 - (H - PAD) * v / top

    dots = "".join(f'<circle cx="{x(p.time):.1f}" cy="{y(p.value):.1f}" r="2"/>' for p in pts)
    label = f"{series.title} ({len(pts)} in the last {duration(window)})"
    return (
        f'<figure><svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" width="{W}" height="{H}" '
        f'role="img" aria-label="{e(label)}">'
        f'<line x1="{PAD}" y1="{H - PAD + 10}" x2="{W - 5}" y2="{H - PAD + 10}" stroke="#888"/>'
        f'<line x1="{PAD}" y1="10" x2="{PAD}" y2="{H - PAD + 10}" stroke="#888"/>'
        f'<text x="2" y="14" font-size="9">{e(duration(top))}</text>'
        f'<text x="2" y="{H - PAD + 10}" font-size="9">0</text>'
        f'<text x="{PAD}" y="{H - 6}" font-size="9">-24h</text>'
        f'<text x="{W - 30}" y="{H - 6}" font-size="9">now</text>'
        f'<g fill="#2a6ebb">{dots}</g></svg><figcaption>{e(label)}</figcaption></figure>'
    )


# So that a browser's request for an icon finds one, not a 404.
ICON = (
    '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    '<circle cx="8" cy="8" r="7" fill="#2a6ebb"/></svg>\n'
)

CSS = """\
body { font: 14px/1.4 system-ui, sans-serif; margin: 0; color: #222; }
header { background: #223; padding: .4em 1em; }
header a { color: #fff; text-decoration: none; font-weight: bold; }
main { padding: 0 1em 2em; }
table { border-collapse: collapse; margin: .5em 0; }
th, td { text-align: left; padding: .15em .6em; border-bottom: 1px solid #ddd; vertical-align: top; }
tr.failed td.status, tr.failed td:first-child { color: #b00; font-weight: bold; }
tr.invalid td.status { color: #a60; font-weight: bold; }
nav a { margin-right: .8em; }
nav a[aria-current] { font-weight: bold; text-decoration: none; color: #222; }
#plots { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: .5em 0; }
figcaption { font-size: 12px; color: #555; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; max-width: 100%; white-space: pre-wrap; }
dl#host { display: grid; grid-template-columns: max-content auto; gap: .2em 1em; }
dt { color: #555; }
dd { margin: 0; }
ul { margin: 0; padding-left: 1.2em; }
.warn { color: #b00; }
"""
