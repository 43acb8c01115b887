"""The sqlite ledger (reconciler.adapters.ledger): transactions and the read-only copy."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from reconciler.adapters import ledger as ledger_module
from reconciler.adapters.eventlog import EventLog
from reconciler.adapters.ledger import State
from reconciler.core.events import Event, EventType
from reconciler.core.model import Status


def test_a_transaction_commits_all_or_nothing(tmp_path: Path) -> None:
    ledger = State(tmp_path)
    with pytest.raises(RuntimeError), ledger.transaction():
        ledger.record_published("web-1", 1, "/nix/store/x-image.drv", "c" * 40)
        ledger.set_meta("commit", "c" * 40)
        raise RuntimeError("the process dies here")
    assert ledger.hosts() == {} and ledger.get_meta("commit") is None
    with ledger.transaction():
        ledger.record_published("web-1", 1, "/nix/store/x-image.drv", "c" * 40)
        # Another reader (the CLI's status) sees nothing until the commit.
        assert State(tmp_path, read_only=True).hosts() == {}
    assert State(tmp_path, read_only=True).hosts()["web-1"].status == Status.PUBLISHED
    ledger.close()


def test_a_read_only_ledger_reads_the_file_and_writes_nothing(tmp_path: Path) -> None:
    missing = tmp_path / "never-reconciled"
    assert State(missing, read_only=True).hosts() == {}
    assert not missing.exists()

    ledger = State(tmp_path)
    ledger.set_meta("commit", "a" * 40)
    ledger.close()
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()}
    copy = State(tmp_path, read_only=True)
    assert copy.get_meta("commit") == "a" * 40
    copy.set_meta("commit", "b" * 40)
    copy.record_failure("web-1", Status.INVALID, "bad")
    copy.close()
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in tmp_path.iterdir()} == before
    assert State(tmp_path, read_only=True).get_meta("commit") == "a" * 40
    assert sorted(os.listdir(tmp_path)) == ["state.db"]


def test_builders_are_counted_and_a_read_only_copy_sees_them(tmp_path: Path) -> None:
    state = State(tmp_path)
    state.record_builder("b1", "success", 12.5, None)
    state.record_builder("b1", "unreachable", None, "web-1: Host key verification failed.")
    state.record_builder("b1", "failure", None, "web-2: exit code 1")
    state.record_builder("local", "success", 3.0, None)
    state.close()
    copy = State(tmp_path, read_only=True)
    b1 = copy.builders()["b1"]
    assert (b1.builds, b1.failures, b1.unreachable, b1.last_seconds) == (1, 1, 1, 12.5)
    assert b1.last_error == "web-2: exit code 1" and b1.last_build and b1.last_error_at
    assert copy.builders()["local"].builds == 1
    copy.close()


def test_evaluations_are_recorded_in_one_transaction(tmp_path: Path) -> None:
    # A row that cannot be written (an image is NOT NULL) takes the whole batch with
    # it: the rows were not committed one by one.
    ledger = State(tmp_path)
    entries: dict[str, tuple[str, str]] = {f"web-{i}": ("k", f"/nix/store/{i}-image.drv") for i in range(50)}
    entries["web-bad"] = ("k", None)  # type: ignore[assignment]  # the row the database refuses
    with pytest.raises(sqlite3.IntegrityError):
        ledger.record_evaluated(entries)
    assert ledger.evaluated(dict.fromkeys(entries, "k")) == {}
    del entries["web-bad"]
    ledger.record_evaluated(entries)
    assert len(ledger.evaluated(dict.fromkeys(entries, "k"))) == 50
    # Inside a transaction of the caller's, it is part of that one.
    with pytest.raises(RuntimeError), ledger.transaction():
        ledger.record_evaluated({"web-x": ("k", "/nix/store/x-image.drv")})
        raise RuntimeError("the pass dies")
    assert ledger.evaluated({"web-x": "k"}) == {}
    ledger.close()


def test_parse_results_are_kept_per_file_and_only_for_the_same_parser(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = State(tmp_path)
    ledger.record_parsed({("hosts/a.yaml", "d1", "c"): "A1", ("hosts/b.yaml", "d1", "c"): "B1"}, [])
    ledger.record_parsed({("hosts/a.yaml", "d2", "c"): "A2"}, ["hosts/b.yaml"])
    assert ledger.parsed() == {("hosts/a.yaml", "d2", "c"): "A2"}
    ledger.close()
    # What the plan command reads: a copy of the file.
    copy = State(tmp_path, read_only=True)
    assert copy.parsed() == {("hosts/a.yaml", "d2", "c"): "A2"}
    copy.close()
    # Another version of the parser may decide differently: nothing it recorded is used.
    monkeypatch.setattr(ledger_module, "PARSER", "another parser")
    again = State(tmp_path)
    assert again.parsed() == {}
    again.close()


def test_hosts_read_again_after_any_write_of_this_or_another_connection(tmp_path: Path) -> None:
    daemon, oneshot = State(tmp_path), State(tmp_path)
    daemon.record_published("web-1", 1, "/nix/store/a.drv", "c1")
    assert daemon.hosts()["web-1"].version == 1
    # Another process's pass (a one-shot `reconcile` beside the daemon) commits.
    oneshot.record_published("web-1", 2, "/nix/store/b.drv", "c2")
    assert daemon.hosts()["web-1"].version == 2
    with pytest.raises(RuntimeError), daemon.transaction():
        daemon.record_failure("web-1", Status.FAILED, "boom")
        assert daemon.hosts()["web-1"].status == Status.FAILED
        raise RuntimeError("the pass dies")
    assert daemon.hosts()["web-1"].status == Status.PUBLISHED
    # What a caller does with the mapping it got is not what the next caller sees.
    got = daemon.hosts()
    got.clear()  # type: ignore[attr-defined]  # a caller that mutates the read-only mapping anyway
    assert "web-1" in daemon.hosts()
    daemon.close()
    oneshot.close()


def test_hosts_are_not_read_again_while_only_other_tables_change(tmp_path: Path) -> None:
    daemon = State(tmp_path)
    daemon.record_published("web-1", 1, "/nix/store/a.drv", "c1")
    reads: list[str] = []
    daemon._db.set_trace_callback(lambda sql: reads.append(sql) if "FROM hosts" in sql else None)
    assert daemon.hosts()["web-1"].version == 1
    # The event history writes the same file through a connection of its own at every
    # pass; the meta rows change too: neither is a reason to read 10,000 rows again.
    history = EventLog(tmp_path)
    history.record(Event(EventType.PASS_STARTED, 1e9))
    daemon.set_meta("commit", "c2")
    assert daemon.hosts()["web-1"].version == 1
    assert len(reads) == 1
    history.close()
    daemon.close()


def test_suspensions_persist_and_a_read_only_copy_sees_them(tmp_path: Path) -> None:
    ledger = State(tmp_path)
    assert ledger.suspend("web-1", 100.0) and ledger.suspend(None, 200.0)
    # Suspended again: the first time stays.
    assert not ledger.suspend("web-1", 300.0)
    ledger.close()
    again = State(tmp_path)
    s = again.suspensions()
    assert (s.fleet, dict(s.hosts)) == (200.0, {"web-1": 100.0})
    assert s.since("web-1") == 100.0 and s.since("web-2") == 200.0
    assert State(tmp_path, read_only=True).suspensions() == s
    assert again.resume(None) and not again.resume(None)
    assert again.suspensions().fleet is None and again.suspensions().covers("web-1")
    assert not again.suspensions().covers("web-2")
    again.close()


def test_a_host_is_dated_since_its_status_changed_not_since_the_last_pass(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ledger = State(tmp_path)
    clock = [1000.0]
    monkeypatch.setattr("reconciler.adapters.ledger.time.time", lambda: clock[0])

    def since(host: str) -> float:
        return ledger.hosts()[host].updated

    ledger.record_published("web-1", 1, "/nix/store/a-image.drv", "a" * 40)
    ledger.record_failure("web-2", Status.INVALID, "hosts/web-2.yaml: name: must be a string")
    clock[0] = 2000.0
    # Every pass finds web-2 invalid again, and web-1's next build fails twice.
    ledger.record_failure("web-2", Status.INVALID, "hosts/web-2.yaml: name: must be a string")
    ledger.record_build_failure("web-1", "build failed", "/nix/store/b-image.drv", 1, 2030.0, 2)
    clock[0] = 3000.0
    ledger.record_build_failure("web-1", "build failed", "/nix/store/b-image.drv", 2, 3060.0, 2)
    assert since("web-2") == 1000.0
    assert since("web-1") == 2000.0 and ledger.hosts()["web-1"].failures == 2
    clock[0] = 4000.0
    ledger.record_published("web-1", 2, "/nix/store/b-image.drv", "b" * 40)
    assert since("web-1") == 4000.0
    clock[0] = 5000.0
    ledger.record_published("web-1", 3, "/nix/store/c-image.drv", "c" * 40)
    assert since("web-1") == 5000.0
    assert State(tmp_path, read_only=True).hosts()["web-2"].updated == 1000.0
    ledger.close()


def test_a_ledger_written_before_a_column_was_added_is_read_and_migrated(tmp_path: Path) -> None:
    """A ledger an older daemon wrote lacks the columns added since (ADDED_COLUMNS): a
    read-only copy leaves them empty and changes nothing on disk; the daemon adds them."""
    old = ledger_module.SCHEMA.replace(",\n    attempt_version INTEGER", "").replace(
        ",\n    sandbox TEXT", ""
    )
    assert old.count("\n") == ledger_module.SCHEMA.count("\n") - 2
    db = sqlite3.connect(tmp_path / "state.db")
    db.executescript(old)
    db.execute(
        "INSERT INTO hosts(name, version, status, updated, failures, failed_image, retry_at)"
        " VALUES ('web-1', 1, 'failed', 5.0, 2, '/nix/store/b-image.drv', 9.0)"
    )
    db.execute("INSERT INTO builders(name, builds) VALUES ('b1', 3)")
    db.commit()
    db.close()
    before = (tmp_path / "state.db").read_bytes()
    copy = State(tmp_path, read_only=True)
    hs = copy.hosts()["web-1"]
    assert (hs.version, hs.failures, hs.retry_at, hs.attempt_version) == (1, 2, 9.0, None)
    assert (copy.builders()["b1"].builds, copy.builders()["b1"].sandbox) == (3, None)
    copy.close()
    assert (tmp_path / "state.db").read_bytes() == before
    ledger = State(tmp_path)
    assert ledger.hosts()["web-1"].attempt_version is None
    ledger.record_build_failure("web-1", "build failed", "/nix/store/b-image.drv", 3, 20.0, 2)
    assert ledger.hosts()["web-1"].attempt_version == 2
    ledger.record_published("web-1", 2, "/nix/store/b-image.drv", "b" * 40)
    assert ledger.hosts()["web-1"].attempt_version is None
    ledger.record_builder_probe("b1", "off", "sandbox probe: builds outside Nix's sandbox")
    b1 = ledger.builders()["b1"]
    assert (b1.builds, b1.sandbox, b1.last_error) == (3, "off", "sandbox probe: builds outside Nix's sandbox")
    ledger.close()
