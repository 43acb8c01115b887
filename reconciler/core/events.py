"""The event history: what happened to the fleet, one record per thing that happened.

Pure: the event types and records, how long the history keeps them (retention), the
query the CLI, the HTTP API and the fleet page ask, and one line of text per event.
The records are kept in the state database (reconciler.adapters.eventlog).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum

from reconciler.core.schema import DURATION_RE, parse_duration
from reconciler.errors import ConfigError, ReconcilerError

# What an event's data may hold: JSON scalars, so that every reader gets them back as written.
Scalar = str | int | float | bool | None

# An error summary is one line of at most this many characters: enough to say why,
# never a whole build log (the host's status keeps the full error).
ERROR_SUMMARY = 300

# Events a query returns at most, and by default.
MAX_LIMIT = 10_000
DEFAULT_LIMIT = 100


class EventType(StrEnum):
    """What happened. The value is what the history stores and what queries name."""

    PASS_STARTED = "pass_started"  # commit, data: hosts, rebuild
    PASS_FINISHED = "pass_finished"  # commit, seconds, error; data: ok, published, failed, invalid, ...
    HOST_BUILT = "host_built"  # host, version, commit, seconds (the build); data: builder
    HOST_PUBLISHED = "host_published"  # host, version, commit, seconds; data: latency, artifacts, recovered
    HOST_ADOPTED = "host_adopted"  # as published: a release already in the store became the host's
    HOST_FAILED = "host_failed"  # host, commit, seconds, error; data: failures, retry_in
    HOST_INVALID = "host_invalid"  # host, commit, error: its definition became invalid
    COMMIT_UNTRUSTED = "commit_untrusted"  # commit, error; data: reason (the gate's Refusal)
    WEBHOOK_REFUSED = "webhook_refused"  # error; data: suppressed (refusals not recorded before it)
    SUSPENDED = "suspended"  # host (none: the whole fleet)
    RESUMED = "resumed"  # host (none: the whole fleet)


@dataclass(frozen=True)
class Event:
    """One thing that happened, at unix time ``time``.

    The common fields are columns of the history (and filters of a query); what only
    some types carry is in ``data``. ``id`` is the history's sequence number, set once
    recorded: later events have larger ids.
    """

    type: EventType
    time: float
    host: str | None = None
    commit: str | None = None
    version: int | None = None
    seconds: float | None = None  # how long it took: the pass, the build, the host's publication
    error: str | None = None  # one line (summary()), never a log
    data: Mapping[str, Scalar] = field(default_factory=dict)
    id: int | None = None

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "time": self.time,
            "at": rfc3339(self.time),
            "type": self.type.value,
            "host": self.host,
            "commit": self.commit,
            "version": self.version,
            "seconds": self.seconds,
            "error": self.error,
            "data": dict(self.data),
        }


def rfc3339(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")[:-4] + "Z"


def summary(error: str, limit: int = ERROR_SUMMARY) -> str:
    """``error`` as one line of at most ``limit`` characters: whitespace runs (newlines
    of a build log) become one space, and what is cut is marked."""
    line = " ".join(error.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


@dataclass(frozen=True)
class Retention:
    """How much history is kept: at most ``keep`` events, none older than ``max_age``
    seconds. Whichever limit is reached first deletes the oldest events."""

    keep: int = 100_000
    max_age: float = 30 * 86400.0

    def cutoff(self, now: float) -> float:
        """Events before this unix time are deleted."""
        return now - self.max_age

    def first_kept(self, last_id: int) -> int:
        """Events with a smaller id than this are deleted, when ``last_id`` is the newest."""
        return last_id - self.keep + 1


class QueryError(ReconcilerError):
    """A query of the history is malformed: which parameter, and why."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"{key}: {reason}")


@dataclass(frozen=True)
class EventQuery:
    """Which events to return: those matching every filter given, the newest ``limit``
    of them, in the order they happened (ascending id). ``after`` and ``before`` are
    ids: a reader that polls asks for what came after the last id it saw."""

    host: str | None = None
    types: frozenset[EventType] = frozenset()  # empty: every type
    since: float | None = None  # unix time, inclusive
    until: float | None = None  # unix time, exclusive
    after: int | None = None
    before: int | None = None
    limit: int = DEFAULT_LIMIT

    def matches(self, event: Event) -> bool:
        return (
            (self.host is None or event.host == self.host)
            and (not self.types or event.type in self.types)
            and (self.since is None or event.time >= self.since)
            and (self.until is None or event.time < self.until)
            and (self.after is None or (event.id is not None and event.id > self.after))
            and (self.before is None or (event.id is not None and event.id < self.before))
        )

    def select(self, events: Sequence[Event]) -> list[Event]:
        """The answer to this query from ``events`` in history order: what the
        database's query returns, for a history held in memory."""
        found = [e for e in events if self.matches(e)]
        return found[len(found) - self.limit :] if len(found) > self.limit else found


_HOST_RE = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
QUERY_KEYS = frozenset({"host", "type", "since", "until", "after", "before", "limit"})


def parse_query(params: Mapping[str, Sequence[str]], now: float) -> EventQuery:
    """An EventQuery from a URL's query parameters (each may be given once, ``type``
    more than once or comma-separated); ``now`` anchors durations: since=24h is the
    last day. Raises QueryError."""
    unknown = sorted(set(params) - QUERY_KEYS)
    if unknown:
        raise QueryError(unknown[0], f"unknown parameter (known: {', '.join(sorted(QUERY_KEYS))})")

    def one(key: str) -> str | None:
        values = params.get(key) or []
        if len(values) > 1:
            raise QueryError(key, "given more than once")
        return values[0] if values else None

    host = one("host")
    if host is not None and not _HOST_RE.fullmatch(host):
        raise QueryError("host", "must be a host name")
    types = parse_types([part for value in params.get("type") or [] for part in value.split(",")])
    since, until = one("since"), one("until")
    return EventQuery(
        host=host,
        types=types,
        since=None if since is None else parse_when("since", since, now),
        until=None if until is None else parse_when("until", until, now),
        after=_count("after", one("after"), 0),
        before=_count("before", one("before"), 1),
        limit=_limit(one("limit")),
    )


def parse_types(names: Sequence[str]) -> frozenset[EventType]:
    out = set()
    for name in names:
        try:
            out.add(EventType(name.strip()))
        except ValueError:
            known = ", ".join(t.value for t in EventType)
            raise QueryError("type", f"unknown event type {name!r} (known: {known})") from None
    return frozenset(out)


def parse_when(key: str, value: str, now: float) -> float:
    """A point in time: a duration back from ``now`` (90m, 24h, 7d), unix seconds, or
    an RFC 3339 time with its offset."""
    if DURATION_RE.fullmatch(value):
        try:
            return now - parse_duration("query", key, value).total_seconds()
        except ConfigError as exc:
            raise QueryError(key, exc.reason) from None
    try:
        unix = float(value)
    except ValueError:
        pass
    else:
        if not math.isfinite(unix):
            raise QueryError(key, "must be a finite number of seconds")
        return unix
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise QueryError(
            key, f"must be a duration back from now (24h), unix seconds or an RFC 3339 time, got {value!r}"
        )
    return when.timestamp()


def _count(key: str, value: str | None, least: int) -> int | None:
    if value is None:
        return None
    if not _is_number(value) or len(value) > 18 or int(value) < least:
        raise QueryError(key, f"must be an event id (an integer >= {least})")
    return int(value)


def _is_number(value: str) -> bool:
    """ASCII digits only: str.isdigit() takes "²" too, which int() refuses."""
    return value.isascii() and value.isdigit()


def _limit(value: str | None) -> int:
    if value is None:
        return DEFAULT_LIMIT
    if not (_is_number(value) and len(value) <= 6 and 1 <= int(value) <= MAX_LIMIT):
        raise QueryError("limit", f"must be an integer from 1 to {MAX_LIMIT}")
    return int(value)


def short(commit: str | None) -> str:
    return commit[:12] if commit else "?"


def describe(event: Event) -> str:
    """The event as one line of text (without its time): `reconciler events`, chat messages."""
    e, d = event, event.data
    took = f" in {_duration(e.seconds)}" if e.seconds is not None else ""
    match e.type:
        case EventType.PASS_STARTED:
            rebuild, hosts = d.get("rebuild", 0), d.get("hosts", 0)
            return f"pass started at {short(e.commit)}: {rebuild} of {hosts} hosts to rebuild"
        case EventType.PASS_FINISHED:
            if "published" not in d:  # nothing could be observed
                return f"pass failed{took}: {e.error}"
            counts = ", ".join(f"{d.get(k, 0)} {k}" for k in ("published", "failed", "invalid"))
            problem = f"; {e.error}" if e.error else ""
            return f"pass finished{took} at {short(e.commit)}: {counts}{problem}"
        case EventType.HOST_BUILT:
            where = f" on {d['builder']}" if d.get("builder") else ""
            return f"{e.host} built version {e.version}{where}{took}"
        case EventType.HOST_PUBLISHED | EventType.HOST_ADOPTED:
            verb = "published" if e.type == EventType.HOST_PUBLISHED else "adopted"
            again = " (recovered)" if d.get("recovered") else ""
            return f"{e.host} {verb} version {e.version} from {short(e.commit)}{took}{again}"
        case EventType.HOST_FAILED:
            return f"{e.host} failed at {short(e.commit)}{took}: {e.error}"
        case EventType.HOST_INVALID:
            return f"{e.host} is invalid at {short(e.commit)}: {e.error}"
        case EventType.COMMIT_UNTRUSTED:
            return f"commit {short(e.commit)} refused ({d.get('reason')}): {e.error}"
        case EventType.WEBHOOK_REFUSED:
            more = f" (and {d['suppressed']} more not recorded)" if d.get("suppressed") else ""
            return f"webhook refused: {e.error}{more}"
        case EventType.SUSPENDED | EventType.RESUMED:
            return f"{e.host or 'fleet'} {e.type.value}"
    return e.type.value  # pragma: no cover -- every type is matched above


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"
