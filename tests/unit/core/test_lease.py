"""The publisher lease's rules (reconciler.core.lease), pure: records, observation,
the decision, and a simulation of several daemons that never hold it at once."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.core.lease import (
    DRIFT,
    KEEP_TERMS,
    Acquire,
    Held,
    How,
    LeaseRecord,
    LeaseStatus,
    Lost,
    Renew,
    Role,
    Seen,
    Standby,
    decide,
    observe,
    obsolete,
    parse_record,
    valid_until,
)
from reconciler.errors import VerificationError

T0 = datetime(2026, 1, 1, tzinfo=UTC)
D = 60.0


def record(term: int = 3, holder: str = "b", renewal: int = 0, released: bool = False) -> LeaseRecord:
    return LeaseRecord(term, holder, f"host-{holder}:/var/lib/reconciler", renewal, D, T0, released)


records = st.builds(
    LeaseRecord,
    term=st.integers(1, 10**12),
    holder=st.text(min_size=1, max_size=40),
    name=st.text(min_size=1, max_size=80),
    renewal=st.integers(0, 10**9),
    duration=st.floats(1.0, 86400.0),
    renewed=st.datetimes(timezones=st.just(UTC)),
    released=st.booleans(),
)


@given(records)
def test_a_record_reads_back_as_written(rec: LeaseRecord) -> None:
    assert parse_record(rec.to_json(), rec.term, "lease/x.json") == rec


@pytest.mark.parametrize(
    "change",
    [
        {"schema": 2},
        {"term": 4},
        {"term": "3"},
        {"holder": ""},
        {"name": 7},
        {"renewal": -1},
        {"renewal": True},
        {"duration": "60"},
        {"duration": float("nan")},
        {"duration": True},
        {"released": "no"},
        {"renewed": "2026-01-01T00:00:00"},
        {"renewed": "yesterday"},
    ],
)
def test_a_malformed_record_is_refused_naming_its_key(change: dict[str, object]) -> None:
    doc = json.loads(record().to_json())
    doc.update(change)
    with pytest.raises(VerificationError, match=r"^lease/3\.json: "):
        parse_record(json.dumps(doc).encode(), 3, "lease/3.json")


@pytest.mark.parametrize("data", [b"", b"[]", b"{", b'{"schema": 1}', b"\xff"])
def test_what_is_not_a_record_is_refused(data: bytes) -> None:
    with pytest.raises(VerificationError):
        parse_record(data, 3, "lease/3.json")


def test_a_duration_from_another_writer_is_bounded() -> None:
    doc = json.loads(record().to_json())
    doc["duration"] = 0.001
    assert parse_record(json.dumps(doc).encode(), 3, "k").duration == 1.0
    doc["duration"] = 1e9
    assert parse_record(json.dumps(doc).encode(), 3, "k").duration == 86400.0


def test_an_unchanged_record_keeps_the_time_it_was_first_seen() -> None:
    first = observe(None, 3, record(), 10.0)
    assert first == Seen(3, record(), 10.0)
    assert observe(first, 3, record(), 50.0) is first
    # A renewal, a new term, an unreadable record, a release: seen anew.
    assert observe(first, 3, record(renewal=1), 50.0) == Seen(3, record(renewal=1), 50.0)
    assert observe(first, 4, record(term=4), 50.0) == Seen(4, record(term=4), 50.0)
    assert observe(first, 3, None, 50.0) == Seen(3, None, 50.0)
    assert observe(first, 3, record(released=True), 50.0) == Seen(3, record(released=True), 50.0)
    assert observe(first, None, None, 50.0) is None


def test_the_first_daemon_takes_term_one() -> None:
    assert decide("a", None, None, 0.0, D) == Acquire(1, How.FIRST, None)


def test_another_holder_s_record_lapses_a_whole_duration_after_it_was_seen() -> None:
    seen = Seen(3, record(), 100.0)
    assert decide("a", None, seen, 100.0 + D - 0.001, D) == Standby(seen, 100.0 + D)
    assert decide("a", None, seen, 100.0 + D, D) == Acquire(4, How.LAPSED, record())
    # Its own duration counts, not the reader's.
    short = Seen(3, replace(record(), duration=5.0), 100.0)
    assert decide("a", None, short, 105.0, D) == Acquire(4, How.LAPSED, short.record)


def test_an_unreadable_record_lapses_after_the_reader_s_own_duration() -> None:
    seen = Seen(3, None, 100.0)
    assert isinstance(decide("a", None, seen, 100.0 + D - 1, D), Standby)
    assert decide("a", None, seen, 100.0 + D, D) == Acquire(4, How.LAPSED, None)


def test_a_released_lease_or_one_s_own_record_is_taken_at_once() -> None:
    released = record(released=True)
    assert decide("a", None, Seen(3, released, 100.0), 100.0, D) == Acquire(4, How.RELEASED, released)
    own = record(holder="a")
    assert decide("a", None, Seen(3, own, 100.0), 100.0, D) == Acquire(4, How.SAME_HOLDER, own)


def test_the_holder_renews_while_valid_and_loses_otherwise() -> None:
    mine = record(holder="a", renewal=5)
    held = Held(3, 5, D, 200.0)
    assert decide("a", held, Seen(3, mine, 150.0), 199.0, D) == Renew(3, 6)
    assert decide("a", held, Seen(3, mine, 150.0), 200.0, D) == Lost(3, "not renewed in time")
    newer = decide("a", held, Seen(4, record(term=4), 150.0), 199.0, D)
    assert isinstance(newer, Lost) and "term 4 was taken by host-b" in newer.reason
    assert isinstance(decide("a", held, None, 199.0, D), Lost)
    assert isinstance(decide("a", held, Seen(2, record(term=2), 150.0), 199.0, D), Lost)
    assert isinstance(decide("a", held, Seen(3, record(holder="b"), 150.0), 199.0, D), Lost)
    assert isinstance(decide("a", held, Seen(3, None, 150.0), 199.0, D), Lost)
    released = record(holder="a", released=True)
    assert isinstance(decide("a", held, Seen(3, released, 150.0), 199.0, D), Lost)


def test_a_holder_stops_writing_before_anyone_can_judge_it_lapsed() -> None:
    # Renewed at 100 (write started then), seen by a standby no earlier than that.
    assert valid_until(100.0, D) == 100.0 + D * (1 - DRIFT) < 100.0 + D


@given(st.lists(st.integers(1, 60), unique=True, min_size=1), st.integers(1, 60))
def test_old_terms_are_deleted_but_the_newest_kept(terms: list[int], mine: int) -> None:
    gone = obsolete(terms, mine)
    assert set(gone) <= set(terms)
    assert all(t < mine for t in gone)
    kept_below = [t for t in terms if mine - KEEP_TERMS < t <= mine]
    assert not set(gone) & set(kept_below)
    assert set(gone) | {t for t in terms if t > mine - KEEP_TERMS} == set(terms)


def test_the_status_says_who_publishes() -> None:
    assert LeaseStatus(Role.ACTIVE, 4, "me").describe() == (
        "active: this daemon holds the publisher lease (term 4)"
    )
    standby = LeaseStatus(Role.STANDBY, 4, "host-b:/srv/state", 12.4).describe()
    assert standby == (
        "standby: the publisher lease is held by host-b:/srv/state (term 4, lapses in 12s unless renewed)"
    )


# -- several daemons, one store ------------------------------------------------------


@dataclass
class Daemon:
    id: str
    rate: float  # its monotonic clock's rate against real time
    held: Held | None = None
    seen: Seen | None = None
    # Real-time intervals during which it believed it could write: [start, end).
    beliefs: list[tuple[float, float]] = field(default_factory=list)

    def mono(self, t: float) -> float:
        return self.rate * t

    def believe(self, t: float, held: Held | None) -> None:
        """From real time ``t`` it holds ``held`` (None: it learnt it does not)."""
        if self.beliefs and self.beliefs[-1][1] > t:
            self.beliefs[-1] = (self.beliefs[-1][0], t)
        self.held = held
        if held is not None:
            self.beliefs.append((t, held.valid_until / self.rate))


def step(d: Daemon, t: float, store: dict[int, LeaseRecord], release: bool) -> None:
    """One look by ``d`` at real time ``t``, as daemon.lease does it (writes instantaneous)."""
    now = d.mono(t)
    term = max(store) if store else None
    d.seen = observe(d.seen, term, store.get(term) if term is not None else None, now)
    decision = decide(d.id, d.held, d.seen, now, D)
    if isinstance(decision, Lost):
        d.believe(t, None)
    elif isinstance(decision, Renew):
        if release:
            store[decision.term] = replace(store[decision.term], renewal=decision.renewal, released=True)
            d.believe(t, None)
        else:
            store[decision.term] = replace(store[decision.term], renewal=decision.renewal)
            d.believe(t, Held(decision.term, decision.renewal, D, valid_until(now, D)))
    elif isinstance(decision, Acquire) and decision.term not in store:
        store[decision.term] = LeaseRecord(decision.term, d.id, d.id, 0, D, T0 + timedelta(seconds=t))
        d.believe(t, Held(decision.term, 0, D, valid_until(now, D)))


# Time steps: the boundaries the rules turn on (a renewal's margin, a whole duration)
# and anything between.
ADVANCES = st.sampled_from([0.0, 0.1 * D, 0.5 * D, 0.89 * D, 0.9 * D, 0.95 * D, D, 1.05 * D, 2 * D])


@settings(max_examples=1000)
@given(
    rates=st.lists(st.sampled_from([0.99, 1.0, 1.01]) | st.floats(0.99, 1.01), min_size=2, max_size=3),
    schedule=st.lists(
        st.tuples(st.integers(0, 2), ADVANCES | st.floats(0.0, 2 * D), st.booleans()),
        min_size=1,
        max_size=30,
    ),
)
def test_no_two_daemons_ever_believe_they_hold_the_lease_at_once(
    rates: list[float], schedule: list[tuple[int, float, bool]]
) -> None:
    """Daemons look at arbitrary times, pause for any while (a SIGSTOP, a dead process:
    simply not stepped), release now and then, with clocks 1% apart: the real-time
    intervals in which each believes it may write never overlap another's."""
    daemons = [Daemon(f"d{i}", rate) for i, rate in enumerate(rates)]
    store: dict[int, LeaseRecord] = {}
    t = 0.0
    for who, advance, release in schedule:
        t += advance
        step(daemons[who % len(daemons)], t, store, release and advance > D / 2)
    intervals = [(s, e, d.id) for d in daemons for s, e in d.beliefs if e > s]
    for i, (s1, e1, a) in enumerate(intervals):
        for s2, e2, b in intervals[i + 1 :]:
            if a != b:
                assert e1 <= s2 or e2 <= s1, f"{a} [{s1}, {e1}) and {b} [{s2}, {e2}) overlap"
    # Every term was won once, by one daemon, in order.
    assert sorted(store) == list(range(1, len(store) + 1))
