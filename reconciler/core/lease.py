"""The publisher lease: which of several daemons sharing a store may write to it. Pure.

A store has one publisher (versions strictly increasing per host, the TUF metadata's
numbers and the sweep of leftovers all need that). Daemons that share a store elect it
through records under ``lease/`` (core.layout), one per *term*:

- A term is won by creating ``lease/<T>.json`` where no object is (``Store.create``:
  O_EXCL/link(2) on a filesystem, ``If-None-Match: *`` on S3): of daemons racing for
  term T exactly one wins. Terms only grow; the newest is the lease.
- Its holder renews by rewriting its own record (a higher ``renewal``) well within its
  ``duration``; no one else writes that key.
- Whether a holder is gone is judged by the candidate's own monotonic clock, never by
  comparing wall clocks across machines (as client-go's leader election does): a record
  seen unchanged for its ``duration`` has lapsed, and the candidate takes term T + 1.
  Its holder stops writing earlier: at ``valid_until``, a margin before anyone can
  judge its record lapsed, counted from before its last successful write.
- A holder that stops cleanly marks its record released: the next daemon takes over at
  once. A process that finds the newest record written under its own identity (the
  same state directory: a restart) takes the next term at once, too.

The daemon side (reconciler.daemon.lease) does the reading and writing and checks the
lease before every write to the store.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from reconciler.errors import VerificationError

SCHEMA = 1
# The share of the duration a holder keeps as margin: it writes nothing after
# ``duration * (1 - DRIFT)`` from the start of its last renewal, while another daemon
# waits the whole duration from when it saw that renewal. The margin covers clocks
# that run at slightly different rates (NTP slews at most 0.05%) and the time from
# the holder's last check to the end of the write that check let through.
DRIFT = 0.1
# Records of older terms kept (for people reading the history); older ones are deleted
# by the holder of a new term.
KEEP_TERMS = 3
# Bounds of a record's duration: what a reader accepts from a record it did not write.
MIN_DURATION = 1.0
MAX_DURATION = 86400.0
# The most bytes of a record anyone reads: to_json writes seven short fields, a few
# hundred bytes with the longest holder name a configuration gives. A larger object
# under lease/ was not written by a daemon, and counts as an unreadable record.
RECORD_LIMIT = 64 * 1024


class Role(StrEnum):
    ACTIVE = "active"  # holds the lease: builds, signs and publishes
    STANDBY = "standby"  # another daemon holds it: observes and plans only


class How(StrEnum):
    """How a term was won (the lease_acquired / lease_takeover events say it)."""

    FIRST = "first"  # no record at all
    RELEASED = "released"  # the holder stopped cleanly
    LAPSED = "lapsed"  # the holder stopped renewing: a takeover
    SAME_HOLDER = "same-holder"  # the record is this identity's own (a restart)


@dataclass(frozen=True)
class Holder:
    """Who a daemon is: ``id`` stays with its state directory; ``name`` is for people."""

    id: str
    name: str


@dataclass(frozen=True)
class LeaseRecord:
    term: int
    holder: str  # Holder.id
    name: str  # Holder.name
    renewal: int  # 0 when the term is won, then one more per renewal
    duration: float  # seconds: the holder renews well within it, or has lapsed
    renewed: datetime  # wall time of the write: for people only, never compared
    released: bool = False

    def to_json(self) -> bytes:
        doc = {
            "schema": SCHEMA,
            "term": self.term,
            "holder": self.holder,
            "name": self.name,
            "renewal": self.renewal,
            "duration": self.duration,
            "renewed": self.renewed.astimezone(UTC).isoformat(),
            "released": self.released,
        }
        return (json.dumps(doc, indent=2) + "\n").encode()


def parse_record(data: bytes, term: int, where: str) -> LeaseRecord:
    """The record of ``term`` read from ``where``; VerificationError if it is not one."""
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
            raise ValueError(f"not a lease record of schema {SCHEMA}")
        fields = {
            "term": doc["term"],
            "holder": doc["holder"],
            "name": doc["name"],
            "renewal": doc["renewal"],
            "duration": doc["duration"],
            "released": doc["released"],
        }
        if not all(isinstance(fields[k], str) and fields[k] for k in ("holder", "name")):
            raise ValueError("holder and name must be non-empty strings")
        if not all(type(fields[k]) is int and fields[k] >= 0 for k in ("term", "renewal")):
            raise ValueError("term and renewal must be non-negative integers")
        duration = fields["duration"]
        if (
            isinstance(duration, bool)
            or not isinstance(duration, (int, float))
            or not math.isfinite(duration)
        ):
            raise ValueError("duration must be a number of seconds")
        if not isinstance(fields["released"], bool):
            raise ValueError("released must be true or false")
        renewed = datetime.fromisoformat(str(doc["renewed"]))
        if renewed.tzinfo is None:
            raise ValueError("renewed must carry a time zone")
    except (ValueError, KeyError, TypeError) as exc:
        raise VerificationError(f"{where}: malformed lease record: {exc}") from None
    if fields["term"] != term:
        raise VerificationError(f"{where}: holds the record of term {fields['term']}")
    return LeaseRecord(
        term=term,
        holder=fields["holder"],
        name=fields["name"],
        renewal=fields["renewal"],
        duration=min(max(float(duration), MIN_DURATION), MAX_DURATION),
        renewed=renewed,
        released=fields["released"],
    )


@dataclass(frozen=True)
class Seen:
    """The newest record as one candidate saw it, and since when (its monotonic clock)
    it has been exactly so. ``record`` None: the term's object was unreadable."""

    term: int
    record: LeaseRecord | None
    since: float


def observe(prev: Seen | None, term: int | None, record: LeaseRecord | None, now: float) -> Seen | None:
    """What a candidate knows after reading ``term``'s ``record`` at ``now``: the same
    observation as ``prev`` while nothing changed, a new one from ``now`` otherwise."""
    if term is None:
        return None
    if prev is not None and prev.term == term and prev.record == record:
        return prev
    return Seen(term, record, now)


@dataclass(frozen=True)
class Held:
    """This process's term: writes are allowed until ``valid_until`` (monotonic)."""

    term: int
    renewal: int
    duration: float
    valid_until: float


def valid_until(started: float, duration: float) -> float:
    """Until when a holder may write after a write of its record started at ``started``."""
    return started + duration * (1 - DRIFT)


@dataclass(frozen=True)
class Acquire:
    """Create the record of ``term``; whoever creates it first holds the lease."""

    term: int
    how: How
    previous: LeaseRecord | None


@dataclass(frozen=True)
class Renew:
    term: int
    renewal: int


@dataclass(frozen=True)
class Standby:
    """Another daemon holds ``seen``; it has lapsed at ``lapses_at`` unless renewed."""

    seen: Seen
    lapses_at: float


@dataclass(frozen=True)
class Lost:
    """This process held ``term`` and must no longer write."""

    term: int
    reason: str


Decision = Acquire | Renew | Standby | Lost


def decide(me: str, held: Held | None, seen: Seen | None, now: float, duration: float) -> Decision:
    """What holder ``me`` does next, holding ``held`` (or nothing), having observed the
    newest term as ``seen`` (None: there is none), at monotonic time ``now``.
    ``duration`` is this process's own, used for a record it cannot read."""
    if held is not None:
        if seen is None or seen.term < held.term:
            return Lost(held.term, "the lease record was removed from the store")
        if seen.term > held.term:
            who = seen.record.name if seen.record is not None else "another daemon"
            return Lost(held.term, f"term {seen.term} was taken by {who}")
        if seen.record is None or seen.record.holder != me:
            return Lost(held.term, f"the record of term {held.term} was overwritten")
        if seen.record.released:
            return Lost(held.term, "the lease was released")
        if now >= held.valid_until:
            return Lost(held.term, "not renewed in time")
        return Renew(held.term, max(held.renewal, seen.record.renewal) + 1)
    if seen is None:
        return Acquire(1, How.FIRST, None)
    record = seen.record
    if record is not None and record.released:
        return Acquire(seen.term + 1, How.RELEASED, record)
    if record is not None and record.holder == me:
        return Acquire(seen.term + 1, How.SAME_HOLDER, record)
    lapses_at = seen.since + (record.duration if record is not None else duration)
    if now >= lapses_at:
        return Acquire(seen.term + 1, How.LAPSED, record)
    return Standby(seen, lapses_at)


def obsolete(terms: list[int], mine: int) -> list[int]:
    """The terms whose records the holder of ``mine`` deletes: all but the newest
    KEEP_TERMS up to its own. Never ``mine`` or anything newer."""
    return sorted(t for t in terms if t <= mine - KEEP_TERMS)


@dataclass(frozen=True)
class LeaseStatus:
    """What ``status``, /readyz and the metrics say about the lease."""

    role: Role
    term: int | None  # the newest term this process knows of
    holder: str | None  # its holder's name
    lapses_in: float | None = None  # standby: seconds until it lapses unless renewed

    def describe(self) -> str:
        if self.role is Role.ACTIVE:
            return f"active: this daemon holds the publisher lease (term {self.term})"
        if self.term is None:
            return "standby: the publisher lease has not been read yet"
        lapse = f", lapses in {self.lapses_in:.0f}s unless renewed" if self.lapses_in is not None else ""
        return f"standby: the publisher lease is held by {self.holder} (term {self.term}{lapse})"
