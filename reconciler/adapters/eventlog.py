"""The event history (reconciler.core.events) in the state database, ``state_dir/state.db``.

A table of its own beside the ledger's (reconciler.adapters.ledger), through a
connection of its own: a pass records its events after the ledger's transaction has
committed, as it logs. Every write deletes what the retention no longer keeps, so
the table never holds more than ``Retention.keep`` events for long.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from reconciler import log
from reconciler.core.events import Event, EventQuery, EventType, Retention
from reconciler.errors import StateError

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    type TEXT NOT NULL,
    host TEXT,
    commit_id TEXT,
    version INTEGER,
    seconds REAL,
    error TEXT,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_time ON events(time);
CREATE INDEX IF NOT EXISTS events_host ON events(host, id);
CREATE INDEX IF NOT EXISTS events_type ON events(type, id);
"""
COLUMNS = "id, time, type, host, commit_id, version, seconds, error, data"


class EventLog:
    """The history in ``state_dir``'s database. ``read_only`` (`reconciler events`):
    reads what the file holds and never writes it or creates anything beside it; with
    no database yet, there is no history."""

    def __init__(self, state_dir: Path, retention: Retention | None = None, read_only: bool = False) -> None:
        self._lock = threading.Lock()
        self._retention = retention or Retention()
        self._reader: sqlite3.Connection | None = None
        self._read_lock = self._lock
        self._read_only = read_only
        path = self._path = state_dir / "state.db"
        self._db: sqlite3.Connection | None
        if read_only:
            if not path.exists():
                self._db = None
                return
            # As the read-only ledger opens it: while a daemon has the database open
            # (its write-ahead log exists) "ro" reads the last committed writes;
            # otherwise "immutable" reads the file without creating the log files.
            live = path.with_name(path.name + "-wal").exists()
            mode = "mode=ro" if live else "immutable=1"
            self._db = sqlite3.connect(f"file:{path}?{mode}", uri=True, check_same_thread=False)
            return
        # 0700 whatever the umask: the unit's UMask=0022 is for the store nginx reads.
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)
        # Queries (the fleet page's, up to 10,000 rows) on a connection of their own: in
        # WAL mode a reader does not wait for the writer nor it for readers, and the pass
        # recording its events does not wait behind a page reading them.
        self._reader = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
        self._read_lock = threading.Lock()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
        if self._reader is not None:
            self._reader.close()

    def record(self, *events: Event) -> None:
        """Append ``events`` and apply the retention. A history that cannot be written
        is logged, never the caller's failure."""
        self.append(*events)

    def append(self, *events: Event) -> list[Event]:
        """record(), returning the events with the ids they were given (without, if
        they could not be written)."""
        if not events or self._read_only:
            return list(events)
        assert self._db is not None
        rows = [
            (
                e.time,
                e.type.value,
                e.host,
                e.commit,
                e.version,
                e.seconds,
                e.error,
                json.dumps(dict(e.data), sort_keys=True),
            )
            for e in events
        ]
        now = max(e.time for e in events)
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany(
                        "INSERT INTO events(time, type, host, commit_id, version, seconds, error, data)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        rows,
                    )
                    # One writer at a time (BEGIN IMMEDIATE) and AUTOINCREMENT: the rows
                    # just inserted have the ids up to the largest, in order.
                    last = self._db.execute("SELECT MAX(id) FROM events").fetchone()[0]
                    self._db.execute(
                        "DELETE FROM events WHERE id < ? OR time < ?",
                        (self._retention.first_kept(last), self._retention.cutoff(now)),
                    )
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
        except sqlite3.Error as exc:
            log.event("events_not_recorded", logging.ERROR, events=len(rows), error=str(exc))
            return list(events)
        first = last - len(events) + 1
        return [replace(e, id=first + i) for i, e in enumerate(events)]

    def query(self, q: EventQuery) -> list[Event]:
        """The events ``q`` asks for, oldest first."""
        if self._db is None:
            return []
        where: list[str] = []
        args: list[Any] = []
        if q.host is not None:
            where.append("host = ?")
            args.append(q.host)
        if q.types:
            where.append(f"type IN ({','.join('?' * len(q.types))})")
            args += sorted(t.value for t in q.types)
        for cond, value in (
            ("time >= ?", q.since),
            ("time < ?", q.until),
            ("id > ?", q.after),
            ("id < ?", q.before),
        ):
            if value is not None:
                where.append(cond)
                args.append(value)
        sql = f"SELECT {COLUMNS} FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        reader = self._reader or self._db
        try:
            with self._read_lock:
                rows = reader.execute(sql, (*args, q.limit)).fetchall()
        except sqlite3.OperationalError as exc:
            # A database no daemon of this version has written yet has no history.
            if "no such table" in str(exc):
                return []
            raise StateError(f"{self._path}: {exc}") from None
        except sqlite3.DatabaseError as exc:
            # Read-only, the file is first read here: said as the ledger says it.
            raise StateError(
                f"{self._path}: {exc} (a damaged ledger: move it away to start afresh)"
            ) from None
        return [e for e in map(_event, reversed(rows)) if e is not None]


KNOWN = frozenset(t.value for t in EventType)


def _event(row: Sequence[Any]) -> Event | None:
    """The event a row holds; None for a type this version does not know (written by a
    newer one sharing the state directory)."""
    id_, time, type_, host, commit, version, seconds, error, data = row
    if type_ not in KNOWN:
        return None
    return Event(
        type=EventType(type_),
        time=time,
        host=host,
        commit=commit,
        version=version,
        seconds=seconds,
        error=error,
        data=json.loads(data),
        id=id_,
    )
