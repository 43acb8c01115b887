"""Durable daemon state: sqlite in WAL mode in the state directory.

It records what the controller has observed and done: the last reconciled commit,
and per host the published version, the image derivation it was built from, and
the outcome of the last attempt.
"""

from __future__ import annotations

import contextlib
import hashlib
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from reconciler.core import hosts, schema
from reconciler.core.hosts import ParseKey
from reconciler.core.model import BuilderState, HostState, Status, Suspensions
from reconciler.errors import StateError, ledger_error

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
    retry_at REAL,
    attempt_version INTEGER
);
-- The image derivation each host evaluated to, under the key of its inputs
-- (nix.eval_key): a host whose key is unchanged need not be evaluated again.
CREATE TABLE IF NOT EXISTS evaluations (host TEXT PRIMARY KEY, key TEXT NOT NULL, image TEXT NOT NULL);
-- Each host file's parse result (core.hosts.encode_parsed) under the digests of its
-- text and of what else its validation read, and of the parser's own code: a new
-- process parses only the host files that changed since.
CREATE TABLE IF NOT EXISTS parsed (
    path TEXT PRIMARY KEY, digest TEXT NOT NULL, context TEXT NOT NULL, parser TEXT NOT NULL,
    result TEXT NOT NULL
);
-- Per Nix builder (remote, or "local"): what host builds came to there.
CREATE TABLE IF NOT EXISTS builders (
    name TEXT PRIMARY KEY,
    builds INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    unreachable INTEGER NOT NULL DEFAULT 0,
    last_build REAL,
    last_seconds REAL,
    last_error TEXT,
    last_error_at REAL,
    sandbox TEXT
);
-- What operators suspended (`reconciler suspend`) and since when (unix time); the
-- host FLEET ('*', never a host name) is the whole fleet.
CREATE TABLE IF NOT EXISTS suspended (host TEXT PRIMARY KEY, since REAL NOT NULL);
-- How often the hosts table changed, counted by triggers whichever connection writes:
-- the daemon keeps its copy of the rows while the count stays (State.hosts). SQLite's
-- data_version would not do: the event history's connection commits to this file at
-- every pass.
CREATE TABLE IF NOT EXISTS revisions (name TEXT PRIMARY KEY, n INTEGER NOT NULL);
INSERT OR IGNORE INTO revisions VALUES ('hosts', 0);
CREATE TRIGGER IF NOT EXISTS hosts_inserted AFTER INSERT ON hosts
BEGIN UPDATE revisions SET n = n + 1 WHERE name = 'hosts'; END;
CREATE TRIGGER IF NOT EXISTS hosts_updated AFTER UPDATE ON hosts
BEGIN UPDATE revisions SET n = n + 1 WHERE name = 'hosts'; END;
CREATE TRIGGER IF NOT EXISTS hosts_deleted AFTER DELETE ON hosts
BEGIN UPDATE revisions SET n = n + 1 WHERE name = 'hosts'; END;
"""


# The code whose results the parsed table holds: another version of the parser may
# accept, refuse or normalise a file differently.
PARSER = hashlib.sha256(
    b"".join(Path(m.__file__).read_bytes() for m in (hosts, schema) if m.__file__ is not None)
).hexdigest()

# Columns added to a table since ledgers were first written, with their type: added to
# a ledger that lacks them when it is opened (a new column's rows start NULL).
ADDED_COLUMNS = {"hosts": (("attempt_version", "INTEGER"),), "builders": (("sandbox", "TEXT"),)}

# The suspended table's row for the whole fleet.
FLEET = "*"


class State:
    """The ledger in ``state_dir/state.db``. ``read_only``: a copy in memory of what the
    file holds (nothing if there is none), so that what only reads (``plan``,
    ``status``) creates and changes nothing on disk while a daemon writes it."""

    def __init__(self, state_dir: Path, read_only: bool = False) -> None:
        self._lock = threading.Lock()
        self._hosts: tuple[int, dict[str, HostState]] | None = None
        self.durable = not read_only
        path = state_dir / "state.db"
        try:
            self._open(state_dir, path, read_only)
        except OSError as exc:
            raise StateError(f"state_dir {state_dir}: cannot create it: {exc.strerror or exc}") from None
        except sqlite3.Error as exc:
            # A file that is not a database, or one damaged: said, not a traceback.
            raise ledger_error(str(path), str(exc)) from None

    def _open(self, state_dir: Path, path: Path, read_only: bool) -> None:
        if read_only:
            self._db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
            if path.exists():
                self._copy_from(path)
        else:
            # 0700 whatever the umask: the unit's UMask=0022 is for the store nginx reads.
            state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
        # A copy is migrated as the file would be: tables and columns added since an
        # older daemon wrote it are created (empty, NULL) in memory only.
        self._db.executescript(SCHEMA)
        for table, columns in ADDED_COLUMNS.items():
            have = _columns(self._db, table)
            for name, kind in columns:
                if name not in have:
                    self._db.execute(f"ALTER TABLE {table} ADD COLUMN {name} {kind}")

    def _copy_from(self, path: Path) -> None:
        # Through a connection of its own, which SQLite's URI modes keep from writing.
        # While a daemon has the database open (its write-ahead log exists) read-only
        # mode reads its last committed pass; otherwise the file alone is the database,
        # and "immutable" reads it without creating the log files beside it. SQLite's
        # backup copies pages: a twentieth of the time rows read and inserted again took
        # (6 against 117 ms at 10,000 hosts), which every `reconciler plan` paid.
        live = path.with_name(path.name + "-wal").exists()
        disk = sqlite3.connect(f"file:{path}?{'mode=ro' if live else 'immutable=1'}", uri=True)
        try:
            disk.backup(self._db)
        finally:
            disk.close()

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """What is written inside is committed together when the block ends, or not at
        all if it raises (or the process dies meanwhile)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            with self._lock:
                self._hosts = None
                self._db.execute("ROLLBACK")
            raise
        with self._lock:
            self._db.execute("COMMIT")

    @contextlib.contextmanager
    def _batch(self) -> Iterator[None]:
        """Many writes as one transaction, or as part of the caller's. The connection
        autocommits (isolation_level=None, so that transaction() decides), which makes
        every row of an executemany its own commit and fsync: 10,000 evaluated hosts
        took seconds instead of milliseconds."""
        if self._db.in_transaction:
            yield
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

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
            # A pass asks more than once, and at 10,000 hosts reading the rows again
            # was most of what a pass with nothing to do cost. The count moves with
            # every change of the table, this connection's or another's (a one-shot
            # `reconcile` beside the daemon); a rolled-back transaction drops the copy.
            version = self._db.execute("SELECT n FROM revisions WHERE name = 'hosts'").fetchone()[0]
            if self._hosts is not None and self._hosts[0] == version:
                return dict(self._hosts[1])
            rows = self._db.execute(
                "SELECT name, version, image, commit_id, status, error, updated,"
                " failures, failed_image, retry_at, attempt_version FROM hosts ORDER BY name"
            ).fetchall()
            hosts = {r[0]: HostState(r[0], r[1], r[2], r[3], Status(r[4]), *r[5:]) for r in rows}
            self._hosts = (version, hosts)
        return dict(hosts)

    def evaluated(self, keys: Mapping[str, str]) -> dict[str, str]:
        """Image derivations recorded for hosts whose key (host -> key) is unchanged."""
        with self._lock:
            rows = self._db.execute("SELECT host, key, image FROM evaluations").fetchall()
        return {host: image for host, key, image in rows if keys.get(host) == key}

    def record_evaluated(self, entries: Mapping[str, tuple[str, str]]) -> None:
        """Remember host -> (key, image derivation)."""
        with self._lock, self._batch():
            self._db.executemany(
                "INSERT INTO evaluations(host, key, image) VALUES(?, ?, ?) "
                "ON CONFLICT(host) DO UPDATE SET key = excluded.key, image = excluded.image",
                [(host, key, image) for host, (key, image) in entries.items()],
            )

    def parsed(self) -> dict[ParseKey, str]:
        """Parse results recorded by this version of the parser, as encoded."""
        with self._lock:
            rows = self._db.execute(
                "SELECT path, digest, context, result FROM parsed WHERE parser = ?", (PARSER,)
            ).fetchall()
        return {(path, digest, context): result for path, digest, context, result in rows}

    def record_parsed(self, entries: Mapping[ParseKey, str], removed: Iterable[str]) -> None:
        """Remember parse results (one per host file) and forget the files ``removed``."""
        with self._lock, self._batch():
            self._db.executemany("DELETE FROM parsed WHERE path = ?", [(p,) for p in removed])
            self._db.executemany(
                "INSERT INTO parsed(path, digest, context, parser, result) VALUES(?, ?, ?, ?, ?) "
                "ON CONFLICT(path) DO UPDATE SET digest = excluded.digest, context = excluded.context,"
                " parser = excluded.parser, result = excluded.result",
                [
                    (path, digest, context, PARSER, result)
                    for (path, digest, context), result in entries.items()
                ],
            )

    def record_published(self, name: str, version: int, image: str, commit: str) -> None:
        self._upsert(
            name,
            status=Status.PUBLISHED,
            error=None,
            version=version,
            image=image,
            commit_id=commit,
            failures=0,
            failed_image=None,
            retry_at=None,
            attempt_version=None,
        )

    def record_build_failure(
        self, name: str, error: str, image: str, failures: int, retry_at: float, version: int | None
    ) -> None:
        """A failed build of ``image`` as ``version``: the ``failures``-th in a row, not
        retried before ``retry_at``."""
        self._upsert(
            name,
            status=Status.FAILED,
            error=error,
            failures=failures,
            failed_image=image,
            retry_at=retry_at,
            attempt_version=version,
        )

    def record_failure(self, name: str, status: Status, error: str) -> None:
        """Mark a host failed/invalid/removed; what it has published stays recorded."""
        self._upsert(name, status=status, error=error)

    def _upsert(self, name: str, **cols: object) -> None:
        # ``updated`` is since when the host is as it is (`reconciler status`): it moves
        # when its status changes (or, published, its version), not at every pass that
        # finds it invalid or fails its build again.
        same = " AND ".join(f"hosts.{c} IS excluded.{c}" for c in ("status", "version") if c in cols)
        cols["updated"] = time.time()
        names = ", ".join(cols)
        marks = ", ".join("?" for _ in cols)
        updates = ", ".join(
            f"{c} = CASE WHEN {same} THEN hosts.{c} ELSE excluded.{c} END"
            if c == "updated"
            else f"{c} = excluded.{c}"
            for c in cols
        )
        with self._lock:
            self._hosts = None
            self._db.execute(
                f"INSERT INTO hosts(name, {names}) VALUES(?, {marks}) "
                f"ON CONFLICT(name) DO UPDATE SET {updates}",
                (name, *cols.values()),
            )

    def builders(self) -> Mapping[str, BuilderState]:
        with self._lock:
            rows = self._db.execute(
                "SELECT name, builds, failures, unreachable, last_build, last_seconds, last_error,"
                " last_error_at, sandbox FROM builders ORDER BY name"
            ).fetchall()
        return {r[0]: BuilderState(*r) for r in rows}

    def record_builder_probe(self, name: str, sandbox: str, error: str | None) -> None:
        """What a sandbox probe build on builder ``name`` found (core.builders.Sandbox's
        value), and why it is not used, if it is not."""
        with self._lock:
            self._db.execute("INSERT INTO builders(name) VALUES(?) ON CONFLICT(name) DO NOTHING", (name,))
            self._db.execute("UPDATE builders SET sandbox = ? WHERE name = ?", (sandbox, name))
            if error is not None:
                self._db.execute(
                    "UPDATE builders SET last_error = ?, last_error_at = ? WHERE name = ?",
                    (error, time.time(), name),
                )

    def record_builder(self, name: str, result: str, seconds: float | None, error: str | None) -> None:
        """One host build on builder ``name``: ``result`` success, failure or unreachable."""
        column = {"success": "builds", "failure": "failures", "unreachable": "unreachable"}[result]
        now = time.time()
        args: tuple[object, ...]
        if result == "success":
            sets, args = "last_build = ?, last_seconds = ?", (now, seconds)
        else:
            sets, args = "last_error = ?, last_error_at = ?", (error, now)
        with self._lock:
            self._db.execute("INSERT INTO builders(name) VALUES(?) ON CONFLICT(name) DO NOTHING", (name,))
            self._db.execute(
                f"UPDATE builders SET {column} = {column} + 1, {sets} WHERE name = ?", (*args, name)
            )

    def suspensions(self) -> Suspensions:
        with self._lock:
            rows = self._db.execute("SELECT host, since FROM suspended").fetchall()
        since = dict(rows)
        fleet = since.pop(FLEET, None)
        return Suspensions(fleet=fleet, hosts=since)

    def suspend(self, host: str | None, at: float) -> bool:
        """Suspend ``host`` (None: the fleet) from unix time ``at``; False if it was
        suspended already (its time stays)."""
        with self._lock:
            cur = self._db.execute(
                "INSERT INTO suspended(host, since) VALUES(?, ?) ON CONFLICT(host) DO NOTHING",
                (host or FLEET, at),
            )
        return cur.rowcount == 1

    def resume(self, host: str | None) -> bool:
        """Lift the suspension of ``host`` (None: the fleet's); False if there was none."""
        with self._lock:
            cur = self._db.execute("DELETE FROM suspended WHERE host = ?", (host or FLEET,))
        return cur.rowcount == 1


def _columns(db: sqlite3.Connection, table: str) -> list[str]:
    """The columns of ``table`` in ``db``, in their order."""
    return [row[1] for row in db.execute(f"PRAGMA table_info({table})")]
