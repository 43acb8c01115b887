"""Durable daemon state: sqlite in WAL mode in the state directory.

It records what the controller has observed and done: the last reconciled commit,
and per host the published version, the image derivation it was built from, and
the outcome of the last attempt.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS hosts (
    name TEXT PRIMARY KEY,
    version INTEGER NOT NULL DEFAULT 0,
    image TEXT,
    commit_id TEXT,
    status TEXT NOT NULL,
    error TEXT,
    updated REAL NOT NULL,
    failures INTEGER NOT NULL DEFAULT 0,
    failed_image TEXT,
    retry_at REAL
);
-- The image derivation each host evaluated to, under the key of its inputs
-- (nix.eval_key): a host whose key is unchanged need not be evaluated again.
CREATE TABLE IF NOT EXISTS evaluations (host TEXT PRIMARY KEY, key TEXT NOT NULL, image TEXT NOT NULL);
"""


@dataclass(frozen=True)
class HostState:
    name: str
    version: int  # 0: never published
    image: str | None  # image derivation of the published version
    commit: str | None
    status: str  # published | failed | invalid | removed
    error: str | None
    updated: float
    failures: int = 0  # consecutive failed builds of failed_image
    failed_image: str | None = None
    retry_at: float | None = None  # unix time before which failed_image is not retried


class State:
    def __init__(self, state_dir: Path) -> None:
        state_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(state_dir / "state.db", check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO meta(key, value) VALUES(?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def hosts(self) -> Mapping[str, HostState]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, version, image, commit_id, status, error, updated,"
                " failures, failed_image, retry_at FROM hosts ORDER BY name"
            ).fetchall()
        return {r[0]: HostState(*r) for r in rows}

    def evaluated(self, keys: Mapping[str, str]) -> dict[str, str]:
        """Image derivations recorded for hosts whose key (host -> key) is unchanged."""
        with self._lock:
            rows = self._db.execute("SELECT host, key, image FROM evaluations").fetchall()
        return {host: image for host, key, image in rows if keys.get(host) == key}

    def record_evaluated(self, entries: Mapping[str, tuple[str, str]]) -> None:
        """Remember host -> (key, image derivation)."""
        with self._lock, self._db:
            self._db.executemany(
                "INSERT INTO evaluations(host, key, image) VALUES(?, ?, ?) "
                "ON CONFLICT(host) DO UPDATE SET key = excluded.key, image = excluded.image",
                [(host, key, image) for host, (key, image) in entries.items()],
            )

    def record_published(self, name: str, version: int, image: str, commit: str) -> None:
        self._upsert(
            name,
            status="published",
            error=None,
            version=version,
            image=image,
            commit_id=commit,
            failures=0,
            failed_image=None,
            retry_at=None,
        )

    def record_build_failure(self, name: str, error: str, image: str, failures: int, retry_at: float) -> None:
        """A failed build of ``image``: the ``failures``-th in a row, not retried before ``retry_at``."""
        self._upsert(
            name, status="failed", error=error, failures=failures, failed_image=image, retry_at=retry_at
        )

    def record_failure(self, name: str, status: str, error: str) -> None:
        """Mark a host failed/invalid/removed; what it has published stays recorded."""
        self._upsert(name, status=status, error=error)

    def _upsert(self, name: str, **cols: object) -> None:
        cols["updated"] = time.time()
        names = ", ".join(cols)
        marks = ", ".join("?" for _ in cols)
        updates = ", ".join(f"{c} = excluded.{c}" for c in cols)
        with self._lock:
            self._db.execute(
                f"INSERT INTO hosts(name, {names}) VALUES(?, {marks}) "
                f"ON CONFLICT(name) DO UPDATE SET {updates}",
                (name, *cols.values()),
            )
