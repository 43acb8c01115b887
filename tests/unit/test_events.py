"""The event model and its queries (reconciler.core.events) and the history in sqlite
(reconciler.adapters.eventlog)."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.adapters.eventlog import EventLog
from reconciler.core.events import (
    MAX_LIMIT,
    Event,
    EventQuery,
    EventType,
    QueryError,
    Retention,
    Scalar,
    describe,
    parse_query,
    summary,
)

NOW = 1_700_000_000.0


def test_an_error_summary_is_one_line_cut_to_its_limit() -> None:
    assert (
        summary("build of host 'web-1' failed:\n  error: exit 1\n\n")
        == "build of host 'web-1' failed: error: exit 1"
    )
    cut = summary("x" * 500, limit=300)
    assert len(cut) == 300 and cut.endswith("…")
    assert summary("short") == "short"


def test_retention_keeps_the_newest_by_count_and_by_age() -> None:
    r = Retention(keep=10, max_age=3600)
    assert r.cutoff(NOW) == NOW - 3600
    assert r.first_kept(100) == 91  # ids 91..100: ten events


def test_a_query_returns_the_newest_matching_events_oldest_first() -> None:
    events = [
        Event(
            EventType.HOST_PUBLISHED if i % 2 else EventType.PASS_FINISHED, NOW + i, host=f"web-{i % 3}", id=i
        )
        for i in range(1, 21)
    ]
    q = EventQuery(host="web-1", types=frozenset({EventType.HOST_PUBLISHED}), limit=3)
    got = q.select(events)
    assert [e.id for e in got] == [7, 13, 19]
    assert [e.id for e in EventQuery(since=NOW + 18).select(events)] == [18, 19, 20]
    assert [e.id for e in EventQuery(until=NOW + 3).select(events)] == [1, 2]
    assert [e.id for e in EventQuery(after=17, before=20).select(events)] == [18, 19]


def test_a_query_string_is_parsed_with_durations_times_and_limits() -> None:
    q = parse_query(
        {"host": ["web-1"], "type": ["host_failed,host_published", "pass_finished"], "since": ["24h"]}, NOW
    )
    assert q.host == "web-1"
    assert q.types == {EventType.HOST_FAILED, EventType.HOST_PUBLISHED, EventType.PASS_FINISHED}
    assert q.since == NOW - 86400 and q.until is None and q.limit == 100
    assert parse_query({"since": ["2023-11-14T22:13:20+00:00"]}, NOW).since == NOW
    assert parse_query({"since": ["2023-11-14T22:13:20Z"], "until": [str(NOW + 5)]}, NOW).until == NOW + 5
    assert parse_query({"limit": [str(MAX_LIMIT)], "after": ["0"], "before": ["9"]}, NOW).limit == MAX_LIMIT


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"hots": ["web-1"]}, "hots"),
        ({"host": ["../etc"]}, "host"),
        ({"host": ["a", "b"]}, "host"),
        ({"type": ["host_exploded"]}, "type"),
        ({"since": ["yesterday"]}, "since"),
        ({"since": ["2023-11-14T22:13:20"]}, "since"),  # no offset: whose time?
        ({"until": ["nan"]}, "until"),
        ({"limit": ["0"]}, "limit"),
        ({"limit": [str(MAX_LIMIT + 1)]}, "limit"),
        ({"limit": ["9" * 400]}, "limit"),
        ({"after": ["-1"]}, "after"),
        ({"before": ["0"]}, "before"),
        # Digits to str.isdigit(), not to int().
        ({"limit": ["\u00b2"]}, "limit"),
        ({"after": ["\u00b9"]}, "after"),
        ({"before": ["1\u00b2"]}, "before"),
    ],
)
def test_a_malformed_query_names_the_parameter(params: dict[str, list[str]], key: str) -> None:
    with pytest.raises(QueryError) as exc:
        parse_query(params, NOW)
    assert exc.value.key == key


@given(
    st.dictionaries(
        st.sampled_from(["host", "type", "since", "until", "limit", "after", "before"]),
        st.lists(st.text() | st.text(st.characters(categories=["Nd", "No"]), min_size=1)),
    )
)
def test_any_query_string_parses_or_is_refused_as_a_query_error(params: dict[str, list[str]]) -> None:
    with contextlib.suppress(QueryError):
        parse_query(params, NOW)


@pytest.mark.parametrize("kind", list(EventType))
def test_every_event_type_reads_as_one_line(kind: EventType) -> None:
    e = Event(
        kind,
        NOW,
        host="web-1",
        commit="c" * 40,
        version=3,
        seconds=75.0,
        error="exit 1",
        data={"builder": "b1"},
    )
    line = describe(e)
    assert line and "\n" not in line
    if kind not in (
        EventType.PASS_STARTED,
        EventType.PASS_FINISHED,
        EventType.COMMIT_UNTRUSTED,
        EventType.WEBHOOK_REFUSED,
    ):
        assert "web-1" in line
    doc = e.to_json()
    assert doc["type"] == kind.value and doc["at"] == "2023-11-14T22:13:20.000Z"


def test_descriptions_say_what_happened() -> None:
    published = Event(EventType.HOST_PUBLISHED, NOW, "web-1", "a" * 40, 4, 42.0, data={"recovered": True})
    assert describe(published) == "web-1 published version 4 from aaaaaaaaaaaa in 42.0s (recovered)"
    finished = Event(
        EventType.PASS_FINISHED,
        NOW,
        commit="b" * 40,
        seconds=3725.0,
        data={"published": 2, "failed": 1, "invalid": 0},
    )
    assert describe(finished) == "pass finished in 1h02m at bbbbbbbbbbbb: 2 published, 1 failed, 0 invalid"
    failed = Event(EventType.PASS_FINISHED, NOW, seconds=0.25, error="cannot fetch", data={"ok": False})
    assert describe(failed) == "pass failed in 0.2s: cannot fetch"
    assert describe(Event(EventType.SUSPENDED, NOW)) == "fleet suspended"


# -- the history in sqlite -------------------------------------------------------------


def event(kind: EventType, t: float, host: str | None = None, **data: Scalar) -> Event:
    return Event(kind, t, host=host, commit="c" * 40, data=data)


def test_the_history_keeps_what_is_recorded_and_answers_queries(tmp_path: Path) -> None:
    log = EventLog(tmp_path)
    log.record(
        event(EventType.PASS_STARTED, NOW, hosts=2, rebuild=1),
        Event(EventType.HOST_FAILED, NOW + 1, "web-1", "c" * 40, None, 2.5, "exit 1", {"failures": 1}),
        event(EventType.HOST_PUBLISHED, NOW + 2, "web-2", recovered=False, latency=12.5),
    )
    log.record(event(EventType.PASS_FINISHED, NOW + 3, ok=False))
    every = log.query(EventQuery())
    assert [(e.id, e.type) for e in every] == [
        (1, EventType.PASS_STARTED),
        (2, EventType.HOST_FAILED),
        (3, EventType.HOST_PUBLISHED),
        (4, EventType.PASS_FINISHED),
    ]
    assert every[1] == Event(
        EventType.HOST_FAILED, NOW + 1, "web-1", "c" * 40, None, 2.5, "exit 1", {"failures": 1}, 2
    )
    assert every[2].data == {"recovered": False, "latency": 12.5}
    for q in (
        EventQuery(host="web-1"),
        EventQuery(types=frozenset({EventType.HOST_FAILED, EventType.HOST_PUBLISHED}), limit=1),
        EventQuery(since=NOW + 1, until=NOW + 3),
        EventQuery(after=1, before=4),
        EventQuery(limit=2),
    ):
        # The database answers as the pure query does on the same history.
        assert log.query(q) == q.select(every), q
    log.close()


def test_the_history_forgets_the_oldest_beyond_its_count_and_age(tmp_path: Path) -> None:
    log = EventLog(tmp_path, Retention(keep=5, max_age=100))
    for i in range(8):
        log.record(event(EventType.PASS_FINISHED, NOW + i))
    assert [e.id for e in log.query(EventQuery())] == [4, 5, 6, 7, 8]
    log.record(event(EventType.PASS_FINISHED, NOW + 106.5))
    # More than 100 s before the newest: gone, however few are left.
    assert [(e.id, e.time) for e in log.query(EventQuery())] == [(8, NOW + 7), (9, NOW + 106.5)]
    log.close()


def test_a_read_only_history_reads_the_file_and_writes_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "never"
    assert EventLog(missing, read_only=True).query(EventQuery()) == []
    assert not missing.exists()
    log = EventLog(tmp_path)
    log.record(event(EventType.PASS_FINISHED, NOW))
    # While the daemon has it open (its write-ahead log exists), a reader sees what it committed.
    reader = EventLog(tmp_path, read_only=True)
    assert [e.type for e in reader.query(EventQuery())] == [EventType.PASS_FINISHED]
    reader.record(event(EventType.PASS_STARTED, NOW))
    reader.close()
    log.close()
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    reader = EventLog(tmp_path, read_only=True)
    assert len(reader.query(EventQuery())) == 1
    reader.close()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    assert sorted(os.listdir(tmp_path)) == ["state.db"]


def test_a_database_without_a_history_has_none_and_unknown_types_are_skipped(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.commit()
    db.close()
    assert EventLog(tmp_path, read_only=True).query(EventQuery()) == []
    log = EventLog(tmp_path)
    log.record(event(EventType.PASS_FINISHED, NOW))
    db = sqlite3.connect(tmp_path / "state.db")
    # A newer version's event type, in a state directory it shares.
    db.execute("INSERT INTO events(time, type, data) VALUES (?, 'host_teleported', '{}')", (NOW + 1,))
    db.commit()
    db.close()
    assert [e.type for e in log.query(EventQuery())] == [EventType.PASS_FINISHED]
    log.close()


def test_a_long_query_holds_up_no_event_being_recorded(tmp_path: Path) -> None:
    """The fleet page's queries (up to 10,000 rows) and the pass's records shared one
    connection and its lock: a page read again and again stretched every pass."""
    log = EventLog(tmp_path)
    log.record(*(event(EventType.PASS_STARTED, NOW + i) for i in range(100)))
    reading, release = threading.Event(), threading.Event()
    reader = getattr(log, "_reader", None) or log._db
    assert reader is not None

    def held() -> int:
        # SQLite calls this as the query runs: the query stays in its middle until released.
        reading.set()
        release.wait(10)
        return 0

    reader.set_progress_handler(held, 1)
    query = threading.Thread(target=log.query, args=(EventQuery(),))
    query.start()
    assert reading.wait(10)
    recorder = threading.Thread(target=log.record, args=(event(EventType.PASS_FINISHED, NOW + 200),))
    recorder.start()
    recorder.join(5)
    recorded = not recorder.is_alive()
    release.set()
    query.join(10)
    recorder.join(10)
    reader.set_progress_handler(None, 1)
    assert recorded, "recording waited for the query"
    assert log.query(EventQuery(limit=1))[0].type is EventType.PASS_FINISHED
    log.close()
