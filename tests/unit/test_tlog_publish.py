"""The transparency log in the publish step (reconciler.daemon.tlog), read by the agent
and audited (reconciler.agent.logcheck), on a store in memory with in-memory note keys.

What is shown: the order of writes (log before latest.json, checkpoint last), that a
crash at any write leaves a log that continues as one history with every published
release in it once, that the daemon refuses to extend a store whose log went back,
forked or had a tile rewritten, and that the agent refuses a release whose log shows
a split view or does not hold it."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reconciler.agent.logcheck import LogClient, audit
from reconciler.core import tlog
from reconciler.core.layout import CHECKPOINT, inclusion_path, latest_path, log_path, release_path
from reconciler.core.note import Note, Signature, openpgp_key_id, parse_note
from reconciler.core.release import RELEASE_LIMIT, Artifact, Release, new_release
from reconciler.core.trust import Reason, RefusalError
from reconciler.daemon.gate import Gate
from reconciler.daemon.publish import publish
from reconciler.daemon.reconciler import Reconciler
from reconciler.daemon.tlog import TransparencyLog, cosign, default_origin
from reconciler.daemon.tuf import TufRepository
from reconciler.errors import LogError, StoreError, VerificationError
from reconciler.ports import Ports
from tests.fakes import CrashError, FakeNoteKey, FakeSigner, MemoryStore
from tests.unit.test_daemon_pass import FLEET, HOST, outcomes, take_version_2
from tests.unit.test_daemon_pass import World as PassWorld

NOW = datetime(2026, 3, 1, tzinfo=UTC)


class HistoryStore(MemoryStore):
    """A memory store that keeps every checkpoint ever written."""

    def __init__(self, crash_at: int | None = None) -> None:
        super().__init__(crash_at=crash_at)
        self.checkpoints: list[bytes] = []

    def put_bytes(self, key: str, data: bytes) -> None:
        super().put_bytes(key, data)
        if key == CHECKPOINT:
            self.checkpoints.append(data)


def release(host: str, version: int) -> Release:
    blob = f"{host} {version}".encode()
    art = Artifact("appimage", f"{host}-{version}.AppImage", len(blob), hashlib.sha256(blob).hexdigest())
    return new_release(host, version, "c" * 40, "/nix/store/x.drv", (art,), NOW, timedelta(days=30))


@dataclass
class World:
    tmp: Path
    store: HistoryStore = field(default_factory=HistoryStore)
    key: FakeNoteKey = field(default_factory=FakeNoteKey)
    logs: list[TransparencyLog] = field(default_factory=list)

    def daemon(self) -> TransparencyLog:
        """The log of a (re)started daemon process."""
        log = TransparencyLog(self.store, lambda: self.key, lambda: self.key, self.tmp / "state" / "tlog")
        self.logs.append(log)
        return log

    def publish(self, log: TransparencyLog | None, host: str, version: int) -> Release:
        r = release(host, version)
        files = {}
        self.tmp.mkdir(parents=True, exist_ok=True)
        for a in r.artifacts:
            path = self.tmp / a.name
            path.write_bytes(f"{host} {version}".encode())
            files[a.format] = path
        publish(
            self.store,
            r,
            files,
            lambda p: b"sig",
            lambda d: b"sig",
            log=(lambda rel, meta: log.append_release(rel.host, rel.version, meta)) if log else None,
        )
        return r

    def read(self, key: str, limit: int) -> bytes | None:
        return self.store.get_bytes(key, limit)

    def agent(self, name: str = "agent", origin: str | None = None) -> LogClient:
        return LogClient(self.read, self.key, None, frozenset(), self.tmp / name / "log-checkpoint", origin)

    def check(self, agent: LogClient, host: str, version: int) -> tlog.Checkpoint:
        data = self.store.get_bytes(release_path(host, version), RELEASE_LIMIT)
        assert data is not None
        return agent.check(host, version, hashlib.sha256(data).hexdigest())

    def audit(self) -> list[str]:
        found = audit(self.read, self.store.list(), self.key)
        return found.problems


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path)


def entries(store: MemoryStore) -> list[tlog.Entry]:
    cp = tlog.parse_checkpoint(parse_note(store.objects[CHECKPOINT]).text)
    out = []
    for b in range((cp.size + 255) // 256):
        bundle = tlog.Bundle(b, min(256, cp.size - 256 * b))
        out += [tlog.parse_entry(e) for e in tlog.decode_bundle(bundle, store.objects[log_path(bundle)])]
    return out


def test_a_release_is_logged_after_its_file_and_before_latest_json(world: World) -> None:
    world.publish(world.daemon(), "web-1", 1)
    writes = world.store.writes
    assert writes.index(release_path("web-1", 1)) < writes.index("log/tile/0/000.p/1")
    assert writes[writes.index("log/tile/0/000.p/1") :] == [
        "log/tile/0/000.p/1",
        "log/tile/entries/000.p/1",
        inclusion_path("web-1", 1),
        CHECKPOINT,
        latest_path("web-1") + ".asc",
        latest_path("web-1"),
    ]
    note = parse_note(world.store.objects[CHECKPOINT])
    cp = tlog.parse_checkpoint(note.text)
    assert (cp.origin, cp.size) == (default_origin(world.key.fingerprint), 1)
    assert world.key.verified(note) == {world.key.fingerprint}
    assert entries(world.store) == [
        tlog.Entry("web-1", 1, hashlib.sha256(release("web-1", 1).to_json()).hexdigest())
    ]
    # The daemon's own copy of the last head it signed.
    assert (world.tmp / "state" / "tlog" / "checkpoint").read_bytes() == world.store.objects[CHECKPOINT]


def test_inclusion_and_consistency_check_out_across_many_publishes(world: World) -> None:
    log = world.daemon()
    agent = world.agent()
    sizes = []
    for i in range(1, 300):
        host = f"web-{i % 7}"
        version = i // 7 + 1
        world.publish(log, host, version)
        if i % 37 == 0 or i > 290:
            sizes.append(world.check(agent, host, version).size)
    assert sizes == sorted(sizes) and sizes[-1] == 299
    seen = agent.seen()
    assert seen is not None and seen.size == 299
    # An old release is proved against the newest head by consistency.
    world.check(agent, "web-1", 1)
    assert world.audit() == []
    assert len(entries(world.store)) == 299


def test_publishing_a_release_again_logs_it_once(world: World) -> None:
    log = world.daemon()
    world.publish(log, "web-1", 1)
    world.publish(log, "web-2", 1)
    world.publish(world.daemon(), "web-1", 1)  # adopted after a restart
    assert [e.host for e in entries(world.store)] == ["web-1", "web-2"]
    assert world.audit() == []


def test_a_store_that_had_no_log_gets_every_release_logged_first(world: World) -> None:
    world.publish(None, "web-2", 1)
    world.publish(None, "web-1", 1)
    world.publish(None, "web-1", 2)
    world.publish(world.daemon(), "web-3", 1)
    assert [(e.host, e.version) for e in entries(world.store)] == [
        ("web-1", 1),
        ("web-1", 2),
        ("web-2", 1),
        ("web-3", 1),
    ]
    assert world.audit() == []


SCENARIO = [("web-1", 1), ("web-2", 1), ("web-1", 2), ("web-3", 1), ("web-2", 2)]


def writes_of_scenario(tmp: Path) -> int:
    w = World(tmp)
    log = w.daemon()
    for host, version in SCENARIO:
        w.publish(log, host, version)
    return len(w.store.writes)


def test_a_crash_at_any_write_leaves_one_history_with_every_release_once(tmp_path: Path) -> None:
    total = writes_of_scenario(tmp_path / "count")
    for crash_at in range(total):
        w = World(tmp_path / str(crash_at))
        w.store.crash_at = crash_at
        log = w.daemon()
        done = 0
        try:
            for host, version in SCENARIO:
                w.publish(log, host, version)
                done += 1
        except CrashError:
            pass
        # The next process publishes what was left, the crashed release again first.
        w.store.crash_at = None
        log = w.daemon()
        for host, version in SCENARIO[done:]:
            w.publish(log, host, version)
        assert w.audit() == [], crash_at
        logged = [(e.host, e.version) for e in entries(w.store)]
        assert sorted(logged) == sorted(SCENARIO), crash_at
        final = tlog.parse_checkpoint(parse_note(w.store.objects[CHECKPOINT]).text)
        leaves = [tlog.leaf_hash(tlog.release_entry(e.host, e.version, e.sha256)) for e in entries(w.store)]
        for data in w.store.checkpoints:
            cp = tlog.parse_checkpoint(parse_note(data).text)
            assert tlog.merkle_root(leaves[: cp.size]) == cp.root, (
                f"crash at {crash_at}: a head off the history"
            )
        assert final.size == len(SCENARIO)
        agent = w.agent()
        for host, version in SCENARIO:
            w.check(agent, host, version)


def test_two_processes_taking_turns_extend_one_history(world: World) -> None:
    """The daemon and a `reconciler reconcile` beside it, one pass at a time."""
    daemon, once = world.daemon(), world.daemon()
    world.publish(daemon, "web-1", 1)
    world.publish(once, "web-2", 1)
    world.publish(daemon, "web-3", 1)
    world.publish(once, "web-1", 2)
    assert [(e.host, e.version) for e in entries(world.store)] == [
        ("web-1", 1),
        ("web-2", 1),
        ("web-3", 1),
        ("web-1", 2),
    ]
    assert world.audit() == []
    leaves = [tlog.leaf_hash(tlog.release_entry(e.host, e.version, e.sha256)) for e in entries(world.store)]
    for data in world.store.checkpoints:
        cp = tlog.parse_checkpoint(parse_note(data).text)
        assert tlog.merkle_root(leaves[: cp.size]) == cp.root


def test_the_daemon_will_not_extend_a_log_that_went_back(world: World) -> None:
    log = world.daemon()
    world.publish(log, "web-1", 1)
    older = world.store.objects[CHECKPOINT]
    world.publish(log, "web-2", 1)
    world.store.objects[CHECKPOINT] = older
    with pytest.raises(LogError, match="went back or forked"):
        world.publish(world.daemon(), "web-3", 1)
    assert latest_path("web-3") not in world.store.objects


def test_the_preflight_says_whether_the_daemon_can_extend_the_store_s_log(world: World) -> None:
    assert world.daemon().describe() == "no log in the store yet: the first release published starts it"
    log = world.daemon()
    world.publish(log, "web-1", 1)
    older = world.store.objects[CHECKPOINT]
    world.publish(log, "web-2", 1)
    origin = default_origin(world.key.fingerprint)
    writes = len(world.store.writes)
    assert world.daemon().describe() == f"{origin} at size 2: signed by this key, its tiles hash to its head"
    world.store.objects[CHECKPOINT] = older
    with pytest.raises(LogError, match="went back or forked"):
        world.daemon().describe()
    assert len(world.store.writes) == writes  # a check writes nothing


def test_the_daemon_will_not_extend_a_forked_log(world: World, tmp_path: Path) -> None:
    log = world.daemon()
    world.publish(log, "web-1", 1)
    world.publish(log, "web-2", 1)
    # The same key signed another history of the same size elsewhere.
    other = World(tmp_path / "other", key=world.key)
    other_log = other.daemon()
    other.publish(other_log, "web-1", 1)
    other.publish(other_log, "web-9", 1)
    for key in [k for k in world.store.objects if k.startswith("log/")]:
        del world.store.objects[key]
    world.store.objects.update({k: v for k, v in other.store.objects.items() if k.startswith("log/")})
    with pytest.raises(LogError, match="went back or forked"):
        world.publish(world.daemon(), "web-3", 1)


def test_the_daemon_will_not_extend_tiles_that_do_not_hash_to_its_head(world: World) -> None:
    log = world.daemon()
    for i in range(1, 4):
        world.publish(log, f"web-{i}", 1)
    tile = log_path(tlog.Tile(0, 0, 3))
    data = world.store.objects[tile]
    world.store.objects[tile] = data[:40] + bytes([data[40] ^ 1]) + data[41:]
    with pytest.raises(LogError, match="log tiles"):
        world.publish(world.daemon(), "web-4", 1)


def test_a_daemon_without_its_copy_takes_only_a_head_it_signed(world: World, tmp_path: Path) -> None:
    log = world.daemon()
    world.publish(log, "web-1", 1)
    (world.tmp / "state" / "tlog" / "checkpoint").unlink()
    world.publish(world.daemon(), "web-2", 1)  # its own head: taken, and extended
    (world.tmp / "state" / "tlog" / "checkpoint").unlink()
    world.key = FakeNoteKey(secret=b"another key, same fingerprint")
    with pytest.raises(LogError):
        world.publish(world.daemon(), "web-3", 1)


# -- the agent's check ------------------------------------------------------------


def test_the_agent_refuses_a_release_the_log_does_not_hold(world: World) -> None:
    agent = world.agent()
    world.publish(None, "web-1", 1)
    with pytest.raises(RefusalError) as no_log:
        world.check(agent, "web-1", 1)
    assert no_log.value.reason is Reason.NOT_IN_LOG
    log = world.daemon()
    world.publish(log, "web-2", 1)
    world.check(agent, "web-1", 1)  # logged with the first append
    world.publish(log, "web-1", 2)
    del world.store.objects[inclusion_path("web-1", 2)]
    with pytest.raises(RefusalError, match="no inclusion proof") as missing:
        world.check(agent, "web-1", 2)
    assert missing.value.reason is Reason.NOT_IN_LOG
    # Another release's inclusion proof under this one's name.
    world.store.objects[inclusion_path("web-1", 2)] = world.store.objects[inclusion_path("web-2", 1)]
    with pytest.raises(RefusalError) as wrong:
        world.check(agent, "web-1", 2)
    assert wrong.value.reason is Reason.NOT_IN_LOG


def test_the_agent_sees_a_rewritten_leaf(world: World) -> None:
    log = world.daemon()
    for i in range(1, 6):
        world.publish(log, f"web-{i}", 1)
    agent = world.agent()
    world.check(agent, "web-5", 1)
    world.publish(log, "web-6", 1)
    # The store rewrites web-2's leaf in the tile the proofs are computed from.
    tile = log_path(tlog.Tile(0, 0, 6))
    data = world.store.objects[tile]
    fake = tlog.leaf_hash(tlog.release_entry("web-2", 1, "f" * 64))
    world.store.objects[tile] = data[:32] + fake + data[64:]
    with pytest.raises(RefusalError, match="does not match its checkpoint") as rewritten:
        world.check(agent, "web-6", 1)
    assert rewritten.value.reason is Reason.NOT_IN_LOG
    assert any("rewritten" in p for p in world.audit())


def fork(world: World, tmp: Path, hosts: list[str]) -> bytes:
    """Another history signed with the publisher's key: its checkpoint (the tiles go
    into the world's store beside the honest ones, under the same paths)."""
    other = World(tmp, key=world.key)
    other_log = other.daemon()
    for h in hosts:
        other.publish(other_log, h, 1)
    for key, data in other.store.objects.items():
        if key.startswith("log/") or key.endswith(".inclusion.json"):
            world.store.objects[key] = data
        else:
            world.store.objects.setdefault(key, data)
    return other.store.objects[CHECKPOINT]


def test_the_agent_refuses_a_forked_head_of_the_size_it_saw(world: World, tmp_path: Path) -> None:
    log = world.daemon()
    world.publish(log, "web-1", 1)
    world.publish(log, "web-2", 1)
    agent = world.agent()
    seen = world.check(agent, "web-2", 1)
    forked = fork(world, tmp_path / "fork", ["web-1", "web-9"])
    forked_cp = tlog.parse_checkpoint(parse_note(forked).text)
    assert forked_cp.size == seen.size and forked_cp.root != seen.root
    with pytest.raises(RefusalError, match="split view") as split:
        world.check(agent, "web-9", 1)
    assert split.value.reason is Reason.SPLIT_VIEW
    assert agent.seen() == seen  # what it saw stays
    # A host that saw nothing before takes the fork: only a witness or an audit can
    # tell it from the honest log then (see the witness test).
    world.check(world.agent("newcomer"), "web-9", 1)


def test_the_agent_refuses_a_longer_head_that_does_not_extend_what_it_saw(
    world: World, tmp_path: Path
) -> None:
    log = world.daemon()
    world.publish(log, "web-1", 1)
    world.publish(log, "web-2", 1)
    agent = world.agent()
    world.check(agent, "web-2", 1)
    fork(world, tmp_path / "fork", ["web-1", "web-9", "web-3"])
    with pytest.raises(RefusalError) as split:
        world.check(agent, "web-3", 1)
    assert split.value.reason is Reason.SPLIT_VIEW


def test_an_older_head_that_the_seen_one_extends_is_no_split_view(world: World) -> None:
    log = world.daemon()
    world.publish(log, "web-1", 1)
    older = world.store.objects[CHECKPOINT]
    world.publish(log, "web-2", 1)
    agent = world.agent()
    seen = world.check(agent, "web-2", 1)
    world.store.objects[CHECKPOINT] = older  # a mirror behind
    assert world.check(agent, "web-1", 1) == seen
    assert agent.seen() == seen


def test_the_agent_follows_one_origin(world: World, tmp_path: Path) -> None:
    log = world.daemon()
    world.publish(log, "web-1", 1)
    agent = world.agent()
    world.check(agent, "web-1", 1)
    other = World(tmp_path / "other", key=world.key)
    other.logs.append(
        TransparencyLog(
            other.store, lambda: world.key, lambda: world.key, other.tmp / "s", origin="elsewhere/log"
        )
    )
    other.publish(other.logs[-1], "web-1", 1)
    world.store.objects.update({k: v for k, v in other.store.objects.items() if k.startswith("log/")})
    world.store.objects[inclusion_path("web-1", 1)] = other.store.objects[inclusion_path("web-1", 1)]
    with pytest.raises(RefusalError, match="follows") as other_log:
        world.check(agent, "web-1", 1)
    assert other_log.value.reason is Reason.NOT_IN_LOG
    with pytest.raises(RefusalError, match="follows"):
        world.check(world.agent("pinned", origin=default_origin(world.key.fingerprint)), "web-1", 1)


def test_a_witness_co_signs_only_an_extension_of_what_it_co_signed(world: World, tmp_path: Path) -> None:
    witness = FakeNoteKey("CD" * 20, b"witness")
    state = tmp_path / "witness" / "checkpoint"
    log = world.daemon()
    world.publish(log, "web-1", 1)
    cp, new = cosign(world.store, world.key, witness, "witness.example", state)
    assert (cp.size, new) == (1, True)
    note = parse_note(world.store.objects[CHECKPOINT])
    assert witness.verified(note) == {witness.fingerprint}
    assert world.key.verified(note) == {world.key.fingerprint}
    assert cosign(world.store, world.key, witness, "witness.example", state)[1] is False
    # An agent that needs the witness takes only a co-signed head.
    agent = LogClient(world.read, world.key, witness, frozenset({witness.fingerprint}), tmp_path / "a" / "cp")
    world.check(agent, "web-1", 1)
    world.publish(log, "web-2", 1)
    with pytest.raises(RefusalError, match="not co-signed") as unwitnessed:
        world.check(agent, "web-2", 1)
    assert unwitnessed.value.reason is Reason.NOT_IN_LOG
    cosign(world.store, world.key, witness, "witness.example", state)
    world.check(agent, "web-2", 1)
    # A fork the witness has not seen: it refuses to co-sign, so the witnessed agent,
    # even a new one, never takes it.
    fork(world, tmp_path / "fork", ["web-1", "web-9"])
    with pytest.raises(LogError, match="split view"):
        cosign(world.store, world.key, witness, "witness.example", state)
    fresh = LogClient(world.read, world.key, witness, frozenset({witness.fingerprint}), tmp_path / "b" / "cp")
    with pytest.raises(RefusalError, match="not co-signed"):
        world.check(fresh, "web-9", 1)


def test_an_audit_sees_a_fork_against_a_head_seen_elsewhere(world: World, tmp_path: Path) -> None:
    log = world.daemon()
    world.publish(log, "web-1", 1)
    world.publish(log, "web-2", 1)
    seen = world.store.objects[CHECKPOINT]
    assert audit(world.read, world.store.list(), world.key, seen=[("agent", seen)]).problems == []
    fork(world, tmp_path / "fork", ["web-1", "web-9"])
    found = audit(world.read, world.store.list(), world.key, seen=[("agent", seen)])
    assert any(p.startswith("split view") for p in found.problems)
    # web-2's release file is no longer in the (forked) log.
    assert any(release_path("web-2", 1) in p and "not in the log" in p for p in found.problems)


def test_an_audit_without_a_listing_checks_each_logged_release(world: World) -> None:
    log = world.daemon()
    world.publish(log, "web-1", 1)
    world.publish(log, "web-2", 1)
    assert audit(world.read, None, world.key).problems == []
    world.store.objects[release_path("web-2", 1)] = (
        release("web-2", 1).to_json().replace(b"c" * 40, b"d" * 40)
    )
    found = audit(world.read, None, world.key)
    sha = hashlib.sha256(world.store.objects[release_path("web-2", 1)]).hexdigest()
    assert [p for p in found.problems if "not in the log" in p] == [
        f"{release_path('web-2', 1)} (sha256 {sha[:16]}...) is not in the log"
    ]


# -- a whole pass on fakes --------------------------------------------------------


def test_a_pass_logs_every_host_it_publishes_before_latest_moves(tmp_path: Path) -> None:
    pw = PassWorld(tmp_path)
    key = FakeNoteKey()
    cfg = pw.config()
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    ports = Ports(
        pw.source, pw.nix, pw.store, pw.ledger, Gate(cfg.repo), lambda: pw.signer, pw.clock, pw.packager
    )
    rec = Reconciler(
        cfg,
        ports,
        tuf=lambda online: TufRepository(pw.store, cfg.state_dir / "tuf", online, pw.clock, cfg.tuf),
        tlog=lambda signer: TransparencyLog(pw.store, lambda: key, lambda: key, cfg.state_dir / "tlog"),
    )
    pw.source.push(FLEET)
    result = rec.reconcile()
    assert result.succeeded
    order = pw.store.writes.index
    for host in ("web-1", "web-2"):
        assert order(release_path(host, 1)) < order(inclusion_path(host, 1)) < order(latest_path(host))
    # Two builds ran at once (jobs: 2); their appends were one after the other.
    assert len(entries(pw.store)) == 2
    assert audit(lambda k, n: pw.store.get_bytes(k, n), pw.store.list(), key).problems == []
    assert (
        rec.metrics.registry.get_sample_value("reconciler_stage_duration_seconds_count", {"stage": "log"})
        == 2
    )


class CrashingLogStore(MemoryStore):
    """A memory store that fails its first log write once ``armed``: after a release
    file is written, before its entry is (as if the process died there)."""

    armed = False

    def put_bytes(self, key: str, data: bytes) -> None:
        if self.armed and key.startswith("log/"):
            self.armed = False
            raise CrashError(f"crash before writing {key}")
        super().put_bytes(key, data)


def signed_by(signer: FakeSigner) -> Callable[[bytes, bytes, str], None]:
    """The check of a release file's signature that wiring.verify_signed makes, for a fake key."""

    def verify(data: bytes, signature: bytes, what: str) -> None:
        if signature != FakeSigner().sign(data):
            raise VerificationError(f"{what}: bad signature (not {signer.public_key()!r})")

    return verify


def logging_pass(pw: PassWorld, key: FakeNoteKey) -> Reconciler:
    """A daemon process over ``pw`` that keeps a transparency log."""
    cfg = pw.config()
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    ports = Ports(
        pw.source, pw.nix, pw.store, pw.ledger, Gate(cfg.repo), lambda: pw.signer, pw.clock, pw.packager
    )
    return Reconciler(
        cfg,
        ports,
        tuf=lambda online: TufRepository(pw.store, cfg.state_dir / "tuf", online, pw.clock, cfg.tuf),
        tlog=lambda signer: TransparencyLog(
            pw.store, lambda: key, lambda: key, cfg.state_dir / "tlog", verify_release=signed_by(pw.signer)
        ),
    )


def moved(address: str) -> dict[str, str]:
    return {**FLEET, "hosts/web-1.yaml": HOST.format(name="web-1", address=address)}


def test_a_release_a_crash_left_out_of_the_log_is_logged_when_its_host_moves_on(tmp_path: Path) -> None:
    pw = PassWorld(tmp_path, store=CrashingLogStore())
    store = pw.store
    assert isinstance(store, CrashingLogStore)
    key = FakeNoteKey()
    pw.source.push(FLEET)
    assert logging_pass(pw, key).reconcile().succeeded
    # Release 2 of web-1 is written, signed; the process dies before logging it.
    pw.source.push(moved("10.0.0.7/24"))
    store.armed = True
    assert outcomes(logging_pass(pw, key)) == {"web-1": (False, 2)}
    assert release_path("web-1", 2) in store.objects
    # web-1 moves again before the next pass: release 2 is never published.
    pw.source.push(moved("10.0.0.8/24"))
    assert outcomes(logging_pass(pw, key)) == {"web-1": (True, 3)}
    assert sorted((e.host, e.version) for e in entries(store)) == [
        ("web-1", 1),
        ("web-1", 2),
        ("web-1", 3),
        ("web-2", 1),
    ]
    assert audit(lambda k, n: store.get_bytes(k, n), store.list(), key).problems == []


def test_a_release_in_the_store_this_key_did_not_sign_stays_out_of_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pw = PassWorld(tmp_path)
    key = FakeNoteKey()
    pw.source.push(FLEET)
    assert logging_pass(pw, key).reconcile().succeeded
    # Someone who can write the store, not the publisher, put a release 2 there.
    take_version_2(pw)
    pw.store.objects[release_path("web-1", 2) + ".asc"] = b"-----SIG forged-----\n"
    pw.source.push(moved("10.0.0.7/24"))
    with caplog.at_level(logging.WARNING, logger="reconciler"):
        assert outcomes(logging_pass(pw, key)) == {"web-1": (True, 3)}
    assert "tlog_unsigned" in caplog.text
    assert ("web-1", 2) not in {(e.host, e.version) for e in entries(pw.store)}
    problems = audit(lambda k, n: pw.store.get_bytes(k, n), pw.store.list(), key).problems
    assert [p for p in problems if "releases/2.json" in p]


def test_an_audit_reads_nothing_past_a_checkpoint_nobody_pinned_signed(world: World) -> None:
    # Its size is nobody's word: a mirror could serve a head of 2**48 entries and then
    # bundles without end, which the audit would read one by one.
    forged = FakeNoteKey(secret=b"someone else")
    text = tlog.Checkpoint("example.com/log", tlog.MAX_SIZE, bytes(32)).text()
    name = "example.com/log"
    note = Note(text, (Signature(name, openpgp_key_id(name, "CD" * 20), forged.sign_note(text)),))
    reads: list[str] = []

    def read(key: str, limit: int) -> bytes | None:
        reads.append(key)
        assert len(reads) < 10, "the audit reads on past an unsigned checkpoint"
        return note.to_bytes() if key == CHECKPOINT else None

    found = audit(read, None, world.key)
    assert reads == [CHECKPOINT]
    assert found.problems == [
        f"the checkpoint of example.com/log (size {tlog.MAX_SIZE}) is not signed by a pinned key"
    ]


def test_a_checkpoint_or_proof_with_a_character_outside_ascii_is_refused_not_a_crash(
    world: World,
) -> None:
    # base64 raised a plain ValueError on such a character, past the agent's refusal.
    log = world.daemon()
    world.publish(log, "web-1", 1)
    agent = world.agent()
    good = world.store.objects[CHECKPOINT]
    inclusion = world.store.objects[inclusion_path("web-1", 1)]
    note = parse_note(good)
    world.store.objects[CHECKPOINT] = (
        note.text + b"\n" + f"\u2014 {note.signatures[0].name} \u00e9AAAAAAA\n".encode()
    )
    with pytest.raises(RefusalError) as sig:
        world.check(agent, "web-1", 1)
    world.store.objects[CHECKPOINT] = good
    world.store.objects[inclusion_path("web-1", 1)] = inclusion.replace(
        b'"proof": [', '"proof": ["\u00e9", '.encode()
    )
    with pytest.raises(RefusalError) as proof:
        world.check(agent, "web-1", 1)
    assert sig.value.reason is proof.value.reason is Reason.NOT_IN_LOG


@pytest.mark.parametrize("key", [CHECKPOINT, "log/tile/0/000.p/1", "log/tile/entries/000.p/1"])
def test_the_daemon_and_the_witness_read_no_log_file_past_its_format_s_size(
    world: World, tmp_path: Path, key: str
) -> None:
    world.publish(world.daemon(), "web-1", 1)
    assert key in world.store.objects
    # A hostile store's oversized file: refused by its key, never read whole (the
    # memory store raises past the limit it is given; an unbounded read passes it).
    world.store.objects[key] += b"\n" * (tlog.BUNDLE_LIMIT + 1)
    witness = FakeNoteKey("CD" * 20, b"witness")
    if "entries" not in key:  # the witness reads tiles, not bundles
        with pytest.raises(StoreError, match=f"{key}.*larger than"):
            cosign(world.store, world.key, witness, "witness.example", tmp_path / "witness" / "checkpoint")
    (world.tmp / "state" / "tlog" / "checkpoint").unlink()
    with pytest.raises(StoreError, match=f"{key}.*larger than"):
        world.publish(world.daemon(), "web-2", 1)
