"""Two daemons, one store: passes under the publisher lease (reconciler.daemon.lease) on
in-memory fakes of every port, with one clock they share (tests/fakes.py)."""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from reconciler.adapters.store import FilesystemStore
from reconciler.agent.logcheck import audit
from reconciler.config import (
    Config,
    LeaseConfig,
    NixConfig,
    RepoConfig,
    RetentionConfig,
    SigningConfig,
    StoreConfig,
)
from reconciler.core import tufrepo
from reconciler.core.layout import (
    CHECKPOINT,
    LEASE_PREFIX,
    inclusion_path,
    latest_path,
    lease_path,
    release_path,
)
from reconciler.core.lease import RECORD_LIMIT, Holder, LeaseRecord, Role
from reconciler.core.model import Status
from reconciler.core.note import MAX_NOTE
from reconciler.core.release import RELEASE_LIMIT
from reconciler.core.tlog import INCLUSION_LIMIT
from reconciler.core.tufroles import TIMESTAMP_LIMIT
from reconciler.daemon.gate import Gate
from reconciler.daemon.lease import FencedStore, PublisherLease
from reconciler.daemon.reconciler import Reconciler
from reconciler.daemon.tlog import TransparencyLog
from reconciler.daemon.tuf import TufRepository
from reconciler.errors import LeaseHeldError, LeaseLostError
from reconciler.ports import Ports
from reconciler.wiring import holder, lease_status
from tests.fakes import (
    FakeClock,
    FakeNix,
    FakeNoteKey,
    FakePackager,
    FakeSigner,
    FakeSource,
    MemoryLedger,
    MemoryStore,
    StoreProxy,
)

HOST = "name: {name}\nformats: [aci]\nnetwork: {{address: {address}}}\n"
FLEET = {
    "hosts/web-1.yaml": HOST.format(name="web-1", address="10.0.0.1/24"),
    "hosts/web-2.yaml": HOST.format(name="web-2", address="10.0.0.2/24"),
}
CHANGED = {**FLEET, "hosts/web-2.yaml": HOST.format(name="web-2", address="10.0.0.9/24")}
DURATION = 60.0


class Tagged(StoreProxy):
    """The shared store, recording which daemon wrote what."""

    def __init__(self, store: MemoryStore, who: str, log: list[tuple[str, str]]) -> None:
        super().__init__(store)
        self.who, self.log = who, log
        # Called when a read has its answer (a slow store advances the clock here).
        self.on_read: Callable[[], object] = lambda: None

    def wrote(self, key: str, size: int) -> None:
        self.log.append((self.who, key))

    def read(self, key: str, data: bytes | None) -> None:
        self.on_read()

    def delete(self, key: str) -> None:
        self.log.append((self.who, f"delete {key}"))
        super().delete(key)


@dataclass
class Fleet:
    """What the daemons share: the repository, the store, the signing key, Nix and time."""

    tmp: Path
    source: FakeSource = field(default_factory=FakeSource)
    store: MemoryStore = field(default_factory=MemoryStore)
    signer: FakeSigner = field(default_factory=FakeSigner)
    clock: FakeClock = field(default_factory=FakeClock)
    writes: list[tuple[str, str]] = field(default_factory=list)
    nix: FakeNix = field(init=False)

    def __post_init__(self) -> None:
        self.nix = FakeNix(self.tmp / "builds", self.source)

    def published_by(self, who: str) -> list[str]:
        """What ``who`` wrote to the store, but its lease records."""
        return [key for w, key in self.writes if w == who and not key.startswith(LEASE_PREFIX)]

    def releases(self, host: str) -> list[int]:
        prefix = f"hosts/{host}/releases/"
        # Release files only, not their attestations (N.provenance.json).
        names = [k[len(prefix) : -5] for k in self.store.list(prefix) if k.endswith(".json")]
        return sorted(int(n) for n in names if n.isdigit())


@dataclass
class Daemon:
    name: str
    rec: Reconciler
    lease: PublisherLease
    ledger: MemoryLedger
    woken: list[str]
    store: Tagged

    def listed(self) -> dict[str, int]:
        md = self.rec.tuf.load()
        return tufrepo.hosts_listed(md.bins.values())


def daemon(
    fleet: Fleet,
    name: str,
    holder: str | None = None,
    ledger: MemoryLedger | None = None,
    keep: int = 10,
    log_key: FakeNoteKey | None = None,
) -> Daemon:
    """A daemon process with a state directory of its own (``holder``: its lease id);
    with ``log_key``, it keeps the store's transparency log, through the fenced store."""
    state = fleet.tmp / name
    state.mkdir(parents=True, exist_ok=True)
    cfg = Config(
        path=fleet.tmp / "reconciler.yaml",
        repo=RepoConfig(url="/nonexistent/repo"),
        store=StoreConfig(type="filesystem", path=fleet.tmp / "unused-store"),
        state_dir=state,
        signing=SigningConfig(gnupghome=fleet.tmp / "gnupg", key="K"),
        nix=NixConfig(),
        retention=RetentionConfig(keep=keep, interval=0),
        lease=LeaseConfig(duration=DURATION, renew=DURATION / 3),
    )
    ledger = ledger if ledger is not None else MemoryLedger()
    tagged = Tagged(fleet.store, name, fleet.writes)
    lease = PublisherLease(
        tagged, cfg.lease, Holder(holder or name, f"host-{name}"), fleet.clock, background=False
    )
    store = FencedStore(tagged, lease)
    ports = Ports(
        fleet.source,
        fleet.nix,
        store,
        ledger,
        Gate(cfg.repo),
        lambda: fleet.signer,
        fleet.clock,
        FakePackager(),
    )
    rec = Reconciler(
        cfg,
        ports,
        tuf=lambda online: TufRepository(store, state / "tuf", online, fleet.clock, cfg.tuf),
        lease=lease,
        tlog=(
            (lambda signer: TransparencyLog(store, lambda: log_key, lambda: log_key, state / "tlog"))
            if log_key is not None
            else None
        ),
    )
    woken: list[str] = []
    lease.on_wake = lambda: woken.append(name)
    return Daemon(name, rec, lease, ledger, woken, tagged)


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    return Fleet(tmp_path)


def gauge(registry: CollectorRegistry, name: str) -> float | None:
    return registry.get_sample_value(name)


def record(fleet: Fleet, term: int) -> dict[str, object]:
    data = fleet.store.get_bytes(lease_path(term), RECORD_LIMIT)
    assert data is not None
    doc = json.loads(data)
    assert isinstance(doc, dict)
    return doc


def test_of_two_daemons_only_the_lease_holder_builds_signs_and_publishes(fleet: Fleet) -> None:
    fleet.source.push(FLEET)
    a, b = daemon(fleet, "a"), daemon(fleet, "b")
    result = a.rec.reconcile()
    assert {o.host: o.version for o in result.outcomes} == {"web-1": 1, "web-2": 1}
    builds, signed = len(fleet.nix.builds), fleet.signer
    standby = b.rec.reconcile()
    assert standby.standby and standby.outcomes == () and standby.ok
    # It observed and planned: both hosts would be rebuilt by it.
    assert [e.host for e in standby.plan.entries] == ["web-1", "web-2"]
    assert fleet.published_by("b") == [] and len(fleet.nix.builds) == builds and signed is fleet.signer
    assert b.ledger.states == {} and "commit" not in b.ledger.meta
    assert b.lease.status().role is Role.STANDBY and b.lease.status().holder == "host-a"
    assert record(fleet, 1)["holder"] == "a" and fleet.store.list(LEASE_PREFIX) == [lease_path(1)]
    # A commit later: still only the holder publishes.
    fleet.source.push(CHANGED)
    assert b.rec.reconcile().standby
    assert {o.host: o.version for o in a.rec.reconcile().outcomes} == {"web-2": 2}
    assert fleet.published_by("b") == [] and fleet.releases("web-2") == [1, 2]
    registry_a, registry_b = a.rec.metrics.registry, b.rec.metrics.registry
    assert gauge(registry_a, "reconciler_publisher_active") == 1
    assert gauge(registry_b, "reconciler_publisher_active") == 0
    assert gauge(registry_a, "reconciler_lease_term") == gauge(registry_b, "reconciler_lease_term") == 1
    assert registry_b.get_sample_value("reconciler_reconcile_runs_total", {"result": "standby"}) == 2
    assert registry_b.get_sample_value("reconciler_reconcile_runs_total", {"result": "success"}) == 0


def test_a_standby_takes_over_once_the_holder_stops_renewing_and_catches_up(fleet: Fleet) -> None:
    fleet.source.push(FLEET)
    a, b = daemon(fleet, "a"), daemon(fleet, "b")
    a.rec.reconcile()
    assert b.rec.reconcile().standby  # b sees a's record from now on
    # a dies (kill -9: no release). Its record is unchanged for the whole duration.
    fleet.clock.advance(DURATION - 1)
    assert b.lease.tick() == pytest.approx(1.0) and b.woken == []
    assert b.rec.reconcile().standby
    fleet.clock.advance(1)
    b.lease.tick()
    assert b.woken == ["b"]  # the daemon's loop runs a pass now
    fleet.source.push(CHANGED)
    result = b.rec.reconcile()
    assert not result.standby and result.ok
    # web-1 is as a published it: adopted (built, not published again); web-2 changed.
    assert {o.host: o.version for o in result.outcomes} == {"web-1": 1, "web-2": 2}
    assert fleet.releases("web-1") == [1] and fleet.releases("web-2") == [1, 2]
    reasons = {e.host: e.reasons for e in result.plan.entries}
    assert reasons["web-1"] == ("published by another daemon (version 1) while this one stood by",)
    assert json.loads(fleet.store.get_bytes(latest_path("web-2"), RELEASE_LIMIT) or b"")["version"] == 2
    assert b.listed() == {"web-1": 1, "web-2": 2}
    assert record(fleet, 2)["holder"] == "b" and b.lease.status().role is Role.ACTIVE
    assert {h: s.version for h, s in b.ledger.states.items()} == {"web-1": 1, "web-2": 2}


def test_a_paused_holder_that_resumes_after_a_takeover_writes_nothing(fleet: Fleet) -> None:
    fleet.source.push(FLEET)
    a, b = daemon(fleet, "a"), daemon(fleet, "b")
    a.rec.reconcile()
    b.rec.reconcile()
    fleet.source.push(CHANGED)
    took_over: list[int] = []

    def pause(host: str) -> None:
        # a is stopped (SIGSTOP) in the middle of building web-2; b takes over and
        # publishes the same commit; then a goes on.
        if took_over:
            return
        took_over.append(len(fleet.writes))
        b.lease.tick()  # b sees the renewal a's pass began with
        fleet.clock.advance(DURATION)
        b.lease.tick()
        assert b.rec.reconcile().outcomes[-1].version == 2

    fleet.nix.while_building = pause
    result = a.rec.reconcile()
    after = [key for who, key in fleet.writes[took_over[0] :] if who == "a"]
    assert after == [], f"a wrote {after} after it lost the lease"
    assert result.interrupted == ("web-2",) and result.outcomes == ()
    assert result.metadata_error == "the publisher lease was lost during the pass"
    # Not a failure of the host: no backoff, no failed status in a's ledger.
    assert a.ledger.states["web-2"].status == Status.PUBLISHED and a.ledger.states["web-2"].failures == 0
    assert a.lease.status().role is Role.STANDBY and not a.lease.held
    assert fleet.releases("web-2") == [1, 2]
    assert (
        json.loads(fleet.store.get_bytes(release_path("web-2", 2), RELEASE_LIMIT) or b"")["commit"]
        == fleet.source.head
    )


def test_the_log_goes_on_as_one_history_across_a_takeover(fleet: Fleet) -> None:
    key = FakeNoteKey()  # the publisher's key, which both daemons sign with
    fleet.source.push(FLEET)
    a, b = daemon(fleet, "a", log_key=key), daemon(fleet, "b", log_key=key)
    a.rec.reconcile()
    b.rec.reconcile()
    fleet.source.push(CHANGED)
    paused_at: list[int] = []

    def pause(host: str) -> None:
        # a is stopped mid-build; b takes over and logs web-2 v2 on top of a's log.
        if paused_at:
            return
        paused_at.append(len(fleet.writes))
        b.lease.tick()
        fleet.clock.advance(DURATION)
        b.lease.tick()
        assert b.rec.reconcile().outcomes[-1].version == 2

    fleet.nix.while_building = pause
    a.rec.reconcile()
    # a's log append would come after its build: fenced like every other write.
    after = [key for who, key in fleet.writes[paused_at[0] :] if who == "a"]
    assert after == [], f"a wrote {after} after it lost the lease"
    # a signed the heads of the first commit (one or two: its two build threads may have
    # written both release files before the first append logged them together), b the last.
    signers = [w for w, k in fleet.writes if k == CHECKPOINT]
    assert signers[-1] == "b" and set(signers[:-1]) == {"a"}, signers
    found = audit(lambda k, n: fleet.store.get_bytes(k, n), fleet.store.list(), key)
    assert found.problems == [] and found.entries == 3 and found.releases == 3


def test_a_holder_that_lost_the_lease_after_a_release_file_does_not_append_to_the_log(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = FakeNoteKey()
    fleet.source.push(FLEET)
    a = daemon(fleet, "a", log_key=key)
    a.rec.reconcile()
    fleet.source.push(CHANGED)
    written = a.store.put_bytes

    def put_bytes(key: str, data: bytes) -> None:
        written(key, data)
        if key == release_path("web-2", 2):
            # Another daemon wins term 2 between the release file and the log append.
            other = LeaseRecord(2, "c", "host-c", 0, DURATION, fleet.clock.now())
            assert fleet.store.create(lease_path(2), other.to_json())

    monkeypatch.setattr(a.store, "put_bytes", put_bytes)
    head = fleet.store.get_bytes(CHECKPOINT, MAX_NOTE)
    result = a.rec.reconcile()
    assert result.interrupted == ("web-2",) and not a.lease.held
    after = [k for who, k in fleet.writes if who == "a"]
    assert after[-1] == release_path("web-2", 2), after[-3:]
    # The log is as the lease's holder left it: its new holder logs web-2 v2 when it
    # adopts the release.
    assert fleet.store.get_bytes(CHECKPOINT, MAX_NOTE) == head
    assert fleet.store.get_bytes(inclusion_path("web-2", 2), INCLUSION_LIMIT) is None


def test_a_holder_whose_deadline_has_not_passed_still_stops_at_a_newer_term(fleet: Fleet) -> None:
    fleet.source.push(FLEET)
    a = daemon(fleet, "a")
    a.rec.reconcile()
    # Another daemon won term 2 (how it judged term 1 lapsed does not matter here).
    other = LeaseRecord(2, "c", "host-c", 0, DURATION, fleet.clock.now())
    assert fleet.store.create(lease_path(2), other.to_json())
    assert a.lease.held  # by its own clock
    with pytest.raises(LeaseLostError, match="term 2 was taken"):
        a.rec.store.put_bytes("hosts/web-1/latest.json", b"stale")
    assert (
        not a.lease.held
        and json.loads(fleet.store.get_bytes(latest_path("web-1"), RELEASE_LIMIT) or b"")["version"] == 1
    )
    fleet.source.push(CHANGED)
    assert a.rec.reconcile().standby


def test_a_clean_stop_hands_the_lease_over_at_once(fleet: Fleet) -> None:
    fleet.source.push(FLEET)
    a, b = daemon(fleet, "a"), daemon(fleet, "b")
    a.rec.reconcile()
    assert b.rec.reconcile().standby
    a.rec.close()
    assert record(fleet, 1)["released"] is True
    b.lease.tick()
    assert b.woken == ["b"]
    fleet.source.push(CHANGED)
    result = b.rec.reconcile()
    assert {o.host: o.version for o in result.outcomes} == {"web-1": 1, "web-2": 2}
    assert record(fleet, 2)["holder"] == "b"


def test_a_record_larger_than_any_is_refused_unread_and_waited_out(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    """A released record someone else padded (still valid JSON): not read, so not taken
    at its word; unreadable as a malformed record is, it lapses after a duration."""
    fleet.source.push(FLEET)
    a, b = daemon(fleet, "a"), daemon(fleet, "b")
    a.rec.reconcile()
    a.rec.close()
    key = lease_path(1)
    fleet.store.objects[key] += b" " * RECORD_LIMIT
    caplog.set_level(logging.WARNING, logger="reconciler")
    assert b.rec.reconcile().standby
    errors = [
        str(getattr(r, "fields", {}).get("error"))
        for r in caplog.records
        if r.getMessage() == "lease_unreadable"
    ]
    assert errors and all(f"{key}" in e and f"larger than {RECORD_LIMIT} bytes" in e for e in errors)
    fleet.clock.advance(DURATION)
    b.lease.tick()
    assert b.woken == ["b"]
    assert not b.rec.reconcile().standby
    assert record(fleet, 2)["holder"] == "b"


def test_a_restarted_daemon_takes_its_own_lease_back_at_once(fleet: Fleet) -> None:
    fleet.source.push(FLEET)
    ledger = MemoryLedger()
    first = daemon(fleet, "a", ledger=ledger)
    first.rec.reconcile()
    # kill -9, and the same state directory (its id, its ledger) starts again at once.
    again = daemon(fleet, "a-again", holder="a", ledger=ledger)
    fleet.source.push(CHANGED)
    result = again.rec.reconcile()
    assert {o.host: o.version for o in result.outcomes} == {"web-2": 2}
    assert record(fleet, 2)["holder"] == "a"
    # Its own ledger is current: no catch-up reads, no adoption of web-1.
    assert [e.host for e in result.plan.entries if e.action == "rebuild"] == ["web-2"]


def test_a_one_shot_command_fails_against_a_renewing_holder(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    fleet.source.push(FLEET)
    a, b = daemon(fleet, "a"), daemon(fleet, "b")
    a.rec.reconcile()
    sleep = fleet.clock.sleep

    def renewing(seconds: float) -> None:
        sleep(seconds)
        a.lease.tick()

    monkeypatch.setattr(fleet.clock, "sleep", renewing)
    started = fleet.clock.t
    with pytest.raises(LeaseHeldError, match=r"held by host-a \(term 1\), which renews it"):
        b.rec.reconcile(standby=False)
    assert fleet.clock.t - started <= DURATION / 3
    assert fleet.published_by("b") == []


def test_a_one_shot_command_waits_out_a_dead_holder_and_publishes(fleet: Fleet) -> None:
    fleet.source.push(FLEET)
    a, b = daemon(fleet, "a"), daemon(fleet, "b")
    a.rec.reconcile()
    fleet.source.push(CHANGED)
    started = fleet.clock.t
    result = b.rec.reconcile(standby=False)
    assert DURATION <= fleet.clock.t - started <= DURATION + 1
    assert {o.host: o.version for o in result.outcomes} == {"web-1": 1, "web-2": 2}
    b.rec.close()
    assert record(fleet, 2)["released"] is True


def test_daemons_taking_turns_never_publish_a_version_twice_or_list_an_old_one(fleet: Fleet) -> None:
    """b publishes, a takes over and publishes a change, b takes over again with its
    ledger two releases behind: it adopts what a published and lists it in TUF."""
    fleet.source.push(FLEET)
    a, b = daemon(fleet, "a"), daemon(fleet, "b")
    b.rec.reconcile()
    b.rec.close()
    b = daemon(fleet, "b", ledger=b.ledger)  # restarted
    fleet.source.push(CHANGED)
    a.rec.reconcile()
    fleet.source.push({**CHANGED, "hosts/web-1.yaml": HOST.format(name="web-1", address="10.0.0.7/24")})
    a.rec.reconcile()
    assert fleet.releases("web-1") == [1, 2] and fleet.releases("web-2") == [1, 2]
    a.rec.close()
    result = b.rec.reconcile()
    assert {o.host: o.version for o in result.outcomes} == {"web-1": 2, "web-2": 2}
    assert fleet.releases("web-1") == [1, 2] and fleet.releases("web-2") == [1, 2]
    assert b.listed() == {"web-1": 2, "web-2": 2}
    assert {h: s.version for h, s in b.ledger.states.items()} == {"web-1": 2, "web-2": 2}
    # Caught up: the next pass has nothing to do.
    again = b.rec.reconcile()
    assert again.outcomes == () and {e.action for e in again.plan.entries} == {"unchanged"}


def test_a_failed_adoption_after_a_takeover_keeps_the_store_s_version_listed(fleet: Fleet) -> None:
    fleet.source.push(FLEET)
    a, b = daemon(fleet, "a"), daemon(fleet, "b")
    b.rec.reconcile()
    b.rec.close()
    b = daemon(fleet, "b", ledger=b.ledger)  # restarted
    fleet.source.push(CHANGED)
    a.rec.reconcile()
    a.rec.close()
    fleet.nix.failing.add("web-2")
    result = b.rec.reconcile()
    assert [(o.host, o.ok) for o in result.outcomes] == [("web-2", False)]
    # b's ledger says web-2 is version 1; the store and TUF say 2, and stay so.
    assert b.ledger.states["web-2"].version == 1
    assert b.listed() == {"web-1": 1, "web-2": 2}


def test_a_lost_ledger_keeps_a_failing_host_listed_through_restarts(fleet: Fleet) -> None:
    fleet.source.push(FLEET)
    a = daemon(fleet, "a")
    a.rec.reconcile()
    a.rec.close()
    fleet.nix.failing.add("web-2")
    for _ in range(2):  # state.db moved away, and the daemon restarted, twice
        a = daemon(fleet, "a")
        result = a.rec.reconcile()
        a.rec.close()
        assert [(o.host, o.ok) for o in result.outcomes] == [("web-1", True), ("web-2", False)]
        assert a.listed() == {"web-1": 1, "web-2": 1}
    assert fleet.releases("web-1") == [1]  # adopted, not published again


def test_a_ledger_restored_from_an_old_backup_never_lists_an_older_release(fleet: Fleet) -> None:
    fleet.source.push(FLEET)
    a = daemon(fleet, "a")
    a.rec.reconcile()
    backup = copy.deepcopy(a.ledger)
    fleet.source.push(CHANGED)
    assert {o.host: o.version for o in a.rec.reconcile().outcomes} == {"web-2": 2}
    a.rec.close()
    fleet.nix.failing.add("web-2")
    a = daemon(fleet, "a", ledger=backup)
    result = a.rec.reconcile()
    assert [(o.host, o.ok) for o in result.outcomes] == [("web-2", False)]
    assert a.listed() == {"web-1": 1, "web-2": 2}
    reasons = {e.host: e.reasons for e in result.plan.entries}
    assert reasons["web-2"] == ("the store lists version 2, newer than this ledger records",)
    fleet.nix.failing.clear()
    # Built again, web-2 is the release the store has: adopted, not a third.
    assert {o.host: o.version for o in a.rec.reconcile(respect_backoff=False).outcomes} == {"web-2": 2}
    assert fleet.releases("web-2") == [1, 2] and a.listed() == {"web-1": 1, "web-2": 2}
    assert a.ledger.states["web-2"].version == 2


def test_comparing_the_ledger_with_an_empty_store_writes_and_fails_nothing(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    """The comparison only reads: the first sync creates the repository, under the lease."""
    fleet.source.push(FLEET)
    a = daemon(fleet, "a")
    with caplog.at_level(logging.INFO, logger="reconciler"):
        a.rec.plan()
    assert fleet.published_by("a") == [] and "tuf_failed" not in caplog.text
    assert a.rec.reconcile().ok and a.listed() == {"web-1": 1, "web-2": 1}


def test_garbage_collection_never_deletes_the_lease(fleet: Fleet, monkeypatch: pytest.MonkeyPatch) -> None:
    fleet.source.push(FLEET)
    a, b = daemon(fleet, "a", keep=1), daemon(fleet, "b", keep=1)
    for i in range(4):
        fleet.source.push({**FLEET, "hosts/web-2.yaml": HOST.format(name="web-2", address=f"10.0.1.{i}/24")})
        a.rec.reconcile()
    deleted = a.rec.collect_garbage(dry_run=False, on_delete=lambda key: None)
    assert deleted and not [k for k in deleted if k.startswith(LEASE_PREFIX)]
    assert fleet.store.list(LEASE_PREFIX) == [lease_path(1)]

    # A standby's `reconciler gc` waits for the lease like any one-shot command.
    def sleep(seconds: float) -> None:
        fleet.clock.advance(seconds)
        a.lease.tick()

    with pytest.raises(LeaseHeldError):
        monkeypatch.setattr(fleet.clock, "sleep", sleep)
        b.rec.collect_garbage(dry_run=False, on_delete=lambda key: None)
    assert not [k for w, k in fleet.writes if w == "b" and k.startswith("delete")]


def test_old_terms_are_deleted_by_a_new_holder(fleet: Fleet) -> None:
    fleet.source.push(FLEET)
    for i in range(6):
        d = daemon(fleet, f"d{i}")
        d.rec.reconcile()
        d.rec.close()
    assert fleet.store.list(LEASE_PREFIX) == [lease_path(t) for t in (4, 5, 6)]


def test_without_the_lease_the_store_refuses_every_write(fleet: Fleet) -> None:
    a = daemon(fleet, "a")
    for write in (
        lambda: a.rec.store.put_bytes("hosts/x/latest.json", b"x"),
        lambda: a.rec.store.delete("hosts/x/latest.json"),
        lambda: a.rec.store.sweep(),
        lambda: a.rec.store.create("x", b"x"),
    ):
        with pytest.raises(LeaseLostError, match="does not hold the store's publisher lease"):
            write()
    assert fleet.store.objects == {}


def timestamp_version(fleet: Fleet) -> int:
    data = fleet.store.get_bytes("tuf/timestamp.json", TIMESTAMP_LIMIT)
    assert data is not None
    return int(json.loads(data)["signed"]["version"])


def test_a_daemon_that_wins_the_lease_back_signs_on_from_the_other_s_metadata(fleet: Fleet) -> None:
    """One process each, back and forth: the TUF timestamp's version only grows, and the
    bins list what the last holder published (an agent would refuse a rollback)."""
    fleet.source.push(FLEET)
    a, b = daemon(fleet, "a"), daemon(fleet, "b")
    b.rec.reconcile()
    versions = [timestamp_version(fleet)]
    assert a.rec.reconcile().standby
    fleet.clock.advance(DURATION)  # b stops renewing (paused)
    a.lease.tick()
    fleet.source.push(CHANGED)
    assert a.rec.reconcile().outcomes[-1].version == 2
    versions.append(timestamp_version(fleet))
    assert b.rec.reconcile().standby  # b resumes: it lost term 1, stands by for term 2
    fleet.clock.advance(DURATION)  # now a stops renewing
    b.lease.tick()
    fleet.source.push({**CHANGED, "hosts/web-1.yaml": HOST.format(name="web-1", address="10.0.0.7/24")})
    result = b.rec.reconcile()
    assert {o.host: o.version for o in result.outcomes} == {"web-1": 2, "web-2": 2}
    versions.append(timestamp_version(fleet))
    assert versions == sorted(set(versions)), versions
    assert b.listed() == {"web-1": 2, "web-2": 2}
    assert [int(k.split("/")[1].split(".")[0]) for k in fleet.store.list(LEASE_PREFIX)] == [1, 2, 3]


def test_a_command_of_the_same_state_directory_borrows_the_lease_without_an_alarm(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    """`reconciler gc` beside the running daemon: it takes the next term, releases it when
    done, and the daemon takes the one after; nothing is logged as an error."""
    fleet.source.push(FLEET)
    ledger = MemoryLedger()
    running = daemon(fleet, "a", ledger=ledger)
    running.rec.reconcile()
    gc = daemon(fleet, "a-gc", holder="a", ledger=ledger)
    gc.rec.collect_garbage(dry_run=False, on_delete=lambda key: None)
    gc.rec.close()
    assert record(fleet, 2)["released"] is True
    caplog.set_level(logging.INFO, logger="reconciler")
    caplog.clear()
    running.lease.tick()
    assert running.woken == ["a"]
    assert [r.getMessage() for r in caplog.records] == ["lease_passed"]
    assert all(r.levelname == "INFO" for r in caplog.records)
    fleet.source.push(CHANGED)
    assert {o.host: o.version for o in running.rec.reconcile().outcomes} == {"web-2": 2}
    assert record(fleet, 3)["holder"] == "a"


def test_a_record_counts_as_seen_when_a_slow_read_of_it_ends(fleet: Fleet) -> None:
    """A read that takes 20s and returns a fresh renewal: its lapse is counted from the
    end of the read (the renewal may have been written just before it ended)."""
    fleet.source.push(FLEET)
    a, b = daemon(fleet, "a"), daemon(fleet, "b")
    a.rec.reconcile()
    b.store.on_read = lambda: fleet.clock.advance(20)
    assert b.lease.tick() == pytest.approx(DURATION / 3)
    status = b.lease.status()
    assert status.role is Role.STANDBY and status.lapses_in == pytest.approx(DURATION)


def test_held_and_status_do_not_wait_for_a_renewal_stuck_on_the_store(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/readyz and /metrics ask while the keeper's renewal hangs on a slow store."""
    fleet.source.push(FLEET)
    a = daemon(fleet, "a")
    a.rec.reconcile()
    stuck, release = threading.Event(), threading.Event()
    put = a.store.put_bytes

    def hanging(key: str, data: bytes) -> None:
        stuck.set()
        release.wait(10)
        put(key, data)

    monkeypatch.setattr(a.store, "put_bytes", hanging)
    keeper = threading.Thread(target=a.lease.tick)
    keeper.start()
    try:
        assert stuck.wait(10)
        asked: list[object] = []
        probe = threading.Thread(target=lambda: asked.extend([a.lease.held, a.lease.status().role]))
        probe.start()
        probe.join(2)
        assert asked == [True, Role.ACTIVE], "held/status waited for the stuck renewal"
    finally:
        release.set()
        keeper.join(10)


def test_a_state_directory_keeps_one_lease_identity(tmp_path: Path) -> None:
    def cfg(state: Path) -> Config:
        return Config(
            path=tmp_path / "reconciler.yaml",
            repo=RepoConfig(url="/nonexistent/repo"),
            store=StoreConfig(type="filesystem", path=tmp_path / "store"),
            state_dir=state,
            signing=SigningConfig(gnupghome=tmp_path / "gnupg", key="K"),
            nix=NixConfig(),
        )

    a, b = cfg(tmp_path / "a"), cfg(tmp_path / "b")
    assert holder(a, create=False).id == ""  # `status` creates nothing
    assert not (tmp_path / "a").exists()
    first = holder(a)
    assert len(first.id) == 32 and first.name.endswith(f":{tmp_path / 'a'}")
    assert holder(a) == first == holder(a, create=False)
    assert holder(b).id not in ("", first.id)
    # An empty file (a crash between creating and writing it) is replaced.
    (tmp_path / "a" / "publisher.id").write_text("")
    again = holder(a)
    assert again.id not in ("", first.id) and holder(a) == again
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["publisher.id"]


def test_status_reads_no_record_past_its_limit(tmp_path: Path) -> None:
    """`reconciler status` on a store where someone padded the newest record."""
    cfg = Config(
        path=tmp_path / "reconciler.yaml",
        repo=RepoConfig(url="/nonexistent/repo"),
        store=StoreConfig(type="filesystem", path=tmp_path / "store"),
        state_dir=tmp_path / "state",
        signing=SigningConfig(gnupghome=tmp_path / "gnupg", key="K"),
        nix=NixConfig(),
    )
    key = lease_path(1)
    padded = LeaseRecord(1, "x", "host-x", 0, DURATION, datetime.now(UTC)).to_json() + b" " * RECORD_LIMIT
    FilesystemStore(tmp_path / "store").put_bytes(key, padded)
    status = lease_status(cfg)
    assert (status["enabled"], status["term"]) == (True, 1) and "holder" not in status
    assert key in str(status["error"]) and f"larger than {RECORD_LIMIT} bytes" in str(status["error"])
