"""Unit tests of the publisher's TUF repository (reconciler.daemon.tuf) over an in-memory
store, a fake clock and real ed25519 keys. What it writes is read back by python-tuf's
own client (ngclient), kept across steps as an agent keeps it, so that a rollback, a
broken root chain or a snapshot naming what is not there fails the test as it would
fail an agent."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer import CryptoSigner, Signer
from tuf.api.exceptions import DownloadHTTPError
from tuf.api.metadata import Metadata, Root, Snapshot, SuccinctRoles, Targets, Timestamp
from tuf.ngclient import FetcherInterface, Updater

from reconciler.config import TufConfig
from reconciler.core import tufrepo
from reconciler.core.layout import release_path, tuf_path
from reconciler.core.tufrepo import SERIALIZER, RoleName, target_path
from reconciler.core.tufroles import ROOT_LIMIT, SNAPSHOT_LIMIT, TARGETS_LIMIT, TIMESTAMP_LIMIT
from reconciler.daemon.tuf import LOCAL_FILE, Metadatas, TufRepository
from reconciler.errors import ObjectTooLargeError, SigningError, TufError
from tests.fakes import CrashError, FakeClock, MemoryStore

TUF = TufConfig(bit_length=2)  # four bins: bins-0 .. bins-3
BINS = [f"bins-{i}" for i in range(4)]
TIMESTAMP = tuf_path("timestamp", None)
TIMESTAMP_LIFETIME = TUF.lifetimes.timestamp
SNAPSHOT_LIFETIME = TUF.lifetimes.snapshot

ONLINE = CryptoSigner.generate_ed25519()  # the daemon's key: every role at first
OFFLINE = CryptoSigner.generate_ed25519()  # a second root key, added later
OTHER = CryptoSigner.generate_ed25519()  # another signer (a new online key, an attacker)


def release(host: str, version: int) -> bytes:
    return json.dumps({"host": host, "version": version}).encode()


def keys_of(store: MemoryStore, role: str) -> list[str]:
    """The store keys of ``role``'s versioned metadata."""
    return sorted(k for k in store.objects if k.startswith("tuf/") and k.endswith(f".{role}.json"))


def versions_of(store: MemoryStore, role: str) -> list[int]:
    return sorted(int(k.split("/")[1].split(".")[0]) for k in keys_of(store, role))


def stored(store: MemoryStore, key: str) -> Metadata[Any]:
    return Metadata.from_bytes(store.objects[key])


def bin_of(host: str) -> str:
    roles = SuccinctRoles([], 1, TUF.bit_length, tufrepo.BINS_PREFIX)
    return roles.get_role_for_target(target_path(host))


class StoreFetcher(FetcherInterface):
    """python-tuf's client reading the store as an HTTP server would serve it."""

    def __init__(self, store: MemoryStore) -> None:
        self.store = store

    def _fetch(self, url: str) -> Iterator[bytes]:
        key = url.removeprefix("mem://store/")
        # ngclient checks each file's own limit; no file it reads may exceed this one.
        data = self.store.get_bytes(key, TARGETS_LIMIT)
        if data is None:
            raise DownloadHTTPError(f"{key} not found", 404)
        return iter([data])


class Client:
    """An agent's view: python-tuf's ngclient, trusting the store's first root, its
    trusted metadata kept between refreshes (so that a rollback shows)."""

    def __init__(self, store: MemoryStore, home: Path) -> None:
        self.store = store
        self.home = home
        home.mkdir()
        (home / "root.json").write_bytes(store.objects[tuf_path("root", 1)])

    def updater(self) -> Updater:
        updater = Updater(
            str(self.home), "mem://store/tuf/", fetcher=StoreFetcher(self.store), bootstrap=None
        )
        updater.refresh()
        return updater

    def root_version(self) -> int:
        """The root this client trusts after a refresh."""
        self.updater()
        return int(Metadata.from_bytes((self.home / "root.json").read_bytes()).signed.version)

    def listed(self, host: str) -> int | None:
        """The release number the store names for ``host`` (None: not listed)."""
        info = self.updater().get_targetinfo(target_path(host))
        return None if info is None else tufrepo.entry_version(info)


@dataclass
class World:
    store: MemoryStore
    clock: FakeClock
    tmp: Path

    def repo(self, local: str = "daemon", signer: Signer = ONLINE) -> TufRepository:
        return TufRepository(self.store, self.tmp / local, lambda: signer, self.clock, TUF)

    def publish(self, host: str, version: int) -> None:
        self.store.put_bytes(release_path(host, version), release(host, version))

    def client(self, name: str = "agent") -> Client:
        return Client(self.store, self.tmp / name)


@pytest.fixture
def world(tmp_path: Path) -> World:
    # Real time: python-tuf's client checks expiry against the system clock. Whole
    # seconds, as the expiry dates are: half a lifetime later is exactly half.
    return World(MemoryStore(), FakeClock(float(int(time.time()))), tmp_path)


PUBLISHED = {"web-1": 1, "web-2": 4, "db-1": 2}


@pytest.fixture
def synced(world: World) -> TufRepository:
    """A repository that has listed PUBLISHED."""
    for host, version in PUBLISHED.items():
        world.publish(host, version)
    repo = world.repo()
    assert repo.sync(PUBLISHED)
    return repo


# -- the first sync ------------------------------------------------------------------


def test_first_sync_creates_version_1_of_every_role_and_lists_the_hosts(world: World) -> None:
    for host, version in PUBLISHED.items():
        world.publish(host, version)
    repo = world.repo()
    assert not repo.exists()
    assert repo.sync(PUBLISHED)
    assert repo.exists()

    created = [tuf_path(r, 1) for r in ("root", "targets", *BINS, "snapshot")]
    assert [w for w in world.store.writes if w in created] == created
    root = stored(world.store, tuf_path("root", 1))
    assert isinstance(root.signed, Root) and root.signed.consistent_snapshot
    for name in BINS:
        assert stored(world.store, tuf_path(name, 1)).signed.targets == {}
    assert world.store.writes[-1] == TIMESTAMP

    client = world.client()
    assert {h: client.listed(h) for h in PUBLISHED} == PUBLISHED
    assert client.listed("not-published") is None
    info = client.updater().get_targetinfo(target_path("web-2"))
    assert info is not None
    info.verify_length_and_hashes(release("web-2", 4))  # raises on a length or hash mismatch
    assert tufrepo.hosts_listed(repo.load().bins.values()) == PUBLISHED


def test_a_host_whose_release_file_is_missing_is_not_listed(world: World) -> None:
    world.publish("web-1", 1)
    repo = world.repo()
    repo.sync({"web-1": 1, "web-2": 3})
    assert tufrepo.hosts_listed(repo.load().bins.values()) == {"web-1": 1}
    world.publish("web-2", 3)
    assert not repo.sync({"web-1": 1, "web-2": 3}), "not looked for again at once"
    world.clock.advance(601)
    assert repo.sync({"web-1": 1, "web-2": 3})
    assert world.client().listed("web-2") == 3


class CheckingStore(MemoryStore):
    """Checks, at each write of the timestamp, that everything it leads to is in the
    store already: what an agent reading at that moment would fetch."""

    def __init__(self) -> None:
        super().__init__()
        self.timestamps = 0

    def _put(self, key: str, data: bytes) -> None:
        if key == TIMESTAMP:
            self.timestamps += 1
            ts: Metadata[Timestamp] = Metadata.from_bytes(data)
            snapshot_key = tuf_path("snapshot", ts.signed.snapshot_meta.version)
            assert snapshot_key in self.objects, f"timestamp written before {snapshot_key}"
            snapshot: Metadata[Snapshot] = Metadata.from_bytes(self.objects[snapshot_key])
            for name, meta in snapshot.signed.meta.items():
                role_key = tuf_path(name.removesuffix(".json"), meta.version)
                assert role_key in self.objects, f"timestamp written before {role_key}"
        super()._put(key, data)


def test_each_timestamp_is_written_after_the_snapshot_and_bins_it_leads_to(world: World) -> None:
    world.store = store = CheckingStore()
    repo = world.repo()
    for version in range(1, 4):
        for host in ("web-1", "web-2", "db-1", "db-2"):
            world.publish(host, version)
        repo.sync({"web-1": version, "web-2": version, "db-1": 1, "db-2": version})
        world.clock.advance(SNAPSHOT_LIFETIME.total_seconds())
        repo.sync({"web-1": version, "web-2": version, "db-1": 1, "db-2": version})
    repo.change_keys(RoleName.BINS, add(RoleName.BINS, OTHER), by(ONLINE))
    repo.change_keys(RoleName.ROOT, add(RoleName.ROOT, OFFLINE), by(ONLINE))
    assert store.timestamps == 1 + 6 + 2


# -- later syncs ---------------------------------------------------------------------


def test_an_unchanged_sync_writes_nothing(world: World, synced: TufRepository) -> None:
    before = list(world.store.writes)
    assert synced.sync(PUBLISHED) is False
    world.clock.advance(TIMESTAMP_LIFETIME.total_seconds() / 2)
    assert synced.sync(PUBLISHED) is False
    assert world.store.writes == before


def test_after_half_its_lifetime_only_the_timestamp_is_signed_again(
    world: World, synced: TufRepository
) -> None:
    client = world.client()
    client.updater()
    before = len(world.store.writes)
    old = stored(world.store, TIMESTAMP).signed
    world.clock.advance(TIMESTAMP_LIFETIME.total_seconds() / 2 + 1)
    assert synced.sync(PUBLISHED) is True
    assert world.store.writes[before:] == [TIMESTAMP]
    new = stored(world.store, TIMESTAMP).signed
    assert new.version == old.version + 1
    assert new.snapshot_meta == old.snapshot_meta
    assert new.expires > old.expires
    assert client.listed("web-2") == 4
    assert synced.sync(PUBLISHED) is False


def test_after_half_the_snapshot_lifetime_the_bins_and_snapshot_are_signed_again(
    world: World, synced: TufRepository
) -> None:
    client = world.client()
    client.updater()
    before = len(world.store.writes)
    snapshot = stored(world.store, TIMESTAMP).signed.snapshot_meta.version
    world.clock.advance(SNAPSHOT_LIFETIME.total_seconds() / 2 + 1)
    assert synced.sync(PUBLISHED)
    written = world.store.writes[before:]
    assert sorted(written[:4]) == sorted(tuf_path(n, v) for n, v in synced_versions(synced).items())
    assert written[4:] == [tuf_path("snapshot", snapshot + 1), TIMESTAMP]
    assert client.listed("db-1") == 2


def synced_versions(repo: TufRepository) -> dict[str, int]:
    return {n: b.signed.version for n, b in repo.load().bins.items()}


def test_a_host_dropped_from_published_leaves_its_bin(world: World, synced: TufRepository) -> None:
    client = world.client()
    assert client.listed("web-1") == 1
    before = synced_versions(synced)
    assert synced.sync({"web-2": 4, "db-1": 2})
    after = synced_versions(synced)
    assert {n for n in BINS if after[n] != before[n]} == {bin_of("web-1")}
    assert (
        target_path("web-1")
        not in stored(world.store, tuf_path(bin_of("web-1"), after[bin_of("web-1")])).signed.targets
    )
    assert client.listed("web-1") is None
    assert client.listed("web-2") == 4


def test_a_new_release_moves_the_entry_on(world: World, synced: TufRepository) -> None:
    client = world.client()
    assert client.listed("web-1") == 1
    world.publish("web-1", 2)
    assert synced.sync({**PUBLISHED, "web-1": 2})
    assert client.listed("web-1") == 2


def test_versions_before_the_previous_one_are_deleted(world: World, synced: TufRepository) -> None:
    name = bin_of("web-1")
    untouched = [n for n in BINS if n not in {bin_of(h) for h in PUBLISHED}]
    listed = []
    for version in range(2, 8):
        world.publish("web-1", version)
        assert synced.sync({**PUBLISHED, "web-1": version})
        listed.append(synced_versions(synced)[name])
    assert versions_of(world.store, name) == listed[-2:]
    s = synced.load().snapshot.signed.version
    assert versions_of(world.store, "snapshot") == [s - 1, s]
    for n in untouched:
        assert versions_of(world.store, n) == [1], "a bin still named by the snapshot stays"
    assert versions_of(world.store, "root") == [1]
    assert versions_of(world.store, "targets") == [1]
    assert world.client().listed("web-1") == 7


# -- a new state directory: import from the store ----------------------------------


def test_a_new_state_dir_imports_the_stores_metadata_and_continues_its_versions(
    world: World, synced: TufRepository
) -> None:
    client = world.client()
    client.updater()
    before = synced.load()
    writes = len(world.store.writes)

    again = world.repo("new-state-dir")
    md = again.load()
    assert world.store.writes[writes:] == [], "an import writes nothing to the store"
    kept_root = json.loads((world.tmp / "new-state-dir" / LOCAL_FILE).read_bytes())["root"]
    assert Metadata.from_dict(kept_root).to_bytes(SERIALIZER) == before.root.to_bytes(SERIALIZER)
    assert tufrepo.hosts_listed(md.bins.values()) == PUBLISHED
    assert md.timestamp.signed.version == before.timestamp.signed.version
    kept = world.repo("new-state-dir").load()
    assert tufrepo.hosts_listed(kept.bins.values()) == PUBLISHED, "the import is kept whole in the state dir"

    world.publish("web-3", 1)
    assert again.sync({**PUBLISHED, "web-3": 1})
    assert md.snapshot.signed.version == before.snapshot.signed.version + 1
    assert md.timestamp.signed.version == before.timestamp.signed.version + 1
    assert client.listed("web-3") == 1, "the agent that saw the old versions takes the new ones"


def test_an_import_follows_the_root_chain(world: World, synced: TufRepository) -> None:
    add = partial(tufrepo.add_key, role=RoleName.ROOT, key=OFFLINE.public_key)
    synced.change_keys(RoleName.ROOT, add, {ONLINE.public_key.keyid: ONLINE})
    raise_ = partial(tufrepo.set_threshold, role=RoleName.ROOT, threshold=2)
    synced.change_keys(RoleName.ROOT, raise_, {s.public_key.keyid: s for s in (ONLINE, OFFLINE)})
    md = world.repo("new-state-dir").load()
    assert md.root.signed.version == 3
    assert md.root.signed.roles["root"].threshold == 2


def resign(md: Metadata[Any], *signers: Signer) -> bytes:
    md.signatures.clear()
    for s in signers:
        md.sign(s, append=True)
    return md.to_bytes(SERIALIZER)


def web_1_bin(store: MemoryStore) -> str:
    """Where the store holds the version of web-1's bin its current snapshot lists."""
    ts: Metadata[Timestamp] = stored(store, TIMESTAMP)
    snapshot: Metadata[Snapshot] = stored(store, tuf_path("snapshot", ts.signed.snapshot_meta.version))
    name = bin_of("web-1")
    return tuf_path(name, snapshot.signed.meta[f"{name}.json"].version)


def tamper_bin(store: MemoryStore) -> None:
    key = web_1_bin(store)
    md = stored(store, key)
    md.signed.targets[target_path("web-1")].length += 1  # the signature no longer covers it
    store.objects[key] = md.to_bytes(SERIALIZER)


def tamper_timestamp(store: MemoryStore) -> None:
    md = stored(store, TIMESTAMP)
    md.signed.snapshot_meta.version -= 1
    store.objects[TIMESTAMP] = md.to_bytes(SERIALIZER)


def timestamp_by_another_key(store: MemoryStore) -> None:
    store.objects[TIMESTAMP] = resign(stored(store, TIMESTAMP), OTHER)


def bin_by_another_key(store: MemoryStore) -> None:
    key = web_1_bin(store)
    store.objects[key] = resign(stored(store, key), OTHER)


def root_2_by_another_key(store: MemoryStore) -> None:
    """A second root whose root key is the attacker's, signed by it alone (every other
    role as before, so that only the chain can refuse it)."""
    md: Metadata[Root] = stored(store, tuf_path("root", 1))
    md.signed.version = 2
    md.signed.add_key(OTHER.public_key, "root")
    md.signed.revoke_key(ONLINE.public_key.keyid, "root")
    store.objects[tuf_path("root", 2)] = resign(md, OTHER)


def root_2_claiming_version_3(store: MemoryStore) -> None:
    md: Metadata[Root] = stored(store, tuf_path("root", 1))
    md.signed.version = 3
    store.objects[tuf_path("root", 2)] = resign(md, ONLINE)


def root_1_not_signed_by_its_keys(store: MemoryStore) -> None:
    key = tuf_path("root", 1)
    store.objects[key] = resign(stored(store, key), OTHER)


def bin_not_json(store: MemoryStore) -> None:
    store.objects[web_1_bin(store)] = b"\x00 not metadata"


def timestamp_not_metadata(store: MemoryStore) -> None:
    store.objects[TIMESTAMP] = b'{"signed": {"_type": "timestamp"}}'


def root_3_not_json(store: MemoryStore) -> None:
    """A good root 2, then garbage as root 3."""
    md: Metadata[Root] = stored(store, tuf_path("root", 1))
    md.signed.version = 2
    store.objects[tuf_path("root", 2)] = resign(md, ONLINE)
    store.objects[tuf_path("root", 3)] = b"{"


def bin_missing(store: MemoryStore) -> None:
    del store.objects[web_1_bin(store)]


def snapshot_without_a_bin(store: MemoryStore) -> None:
    """Signed by the right key, but naming no version of one bin."""
    ts: Metadata[Timestamp] = stored(store, TIMESTAMP)
    key = tuf_path("snapshot", ts.signed.snapshot_meta.version)
    md: Metadata[Snapshot] = stored(store, key)
    del md.signed.meta[f"{bin_of('web-1')}.json"]
    store.objects[key] = resign(md, ONLINE)


def targets_as_the_timestamp(store: MemoryStore) -> None:
    """Another role's metadata, signed by a key the timestamp role lists."""
    store.objects[TIMESTAMP] = resign(stored(store, tuf_path("targets", 1)), ONLINE)


def timestamp_as_root_2(store: MemoryStore) -> None:
    store.objects[tuf_path("root", 2)] = resign(stored(store, TIMESTAMP), ONLINE)


def targets_without_bins(store: MemoryStore) -> None:
    """Signed by the targets key, but delegating nothing: no bin to read."""
    md: Metadata[Targets] = stored(store, tuf_path("targets", 1))
    md.signed.delegations = None
    store.objects[tuf_path("targets", 1)] = resign(md, ONLINE)


def snapshot_replayed_under_a_newer_number(store: MemoryStore) -> None:
    """The previous snapshot (signed, but naming older bins) served as the current one."""
    ts: Metadata[Timestamp] = stored(store, TIMESTAMP)
    v = ts.signed.snapshot_meta.version
    store.objects[tuf_path("snapshot", v)] = store.objects[tuf_path("snapshot", v - 1)]


def bin_replayed_under_a_newer_number(store: MemoryStore) -> None:
    name = bin_of("web-1")
    store.objects[web_1_bin(store)] = store.objects[tuf_path(name, 1)]


TAMPERINGS = [
    tamper_bin,
    tamper_timestamp,
    timestamp_by_another_key,
    bin_by_another_key,
    root_2_by_another_key,
    root_2_claiming_version_3,
    root_1_not_signed_by_its_keys,
    bin_not_json,
    timestamp_not_metadata,
    root_3_not_json,
    bin_missing,
    snapshot_without_a_bin,
    targets_as_the_timestamp,
    timestamp_as_root_2,
    targets_without_bins,
    snapshot_replayed_under_a_newer_number,
    bin_replayed_under_a_newer_number,
]


@pytest.mark.parametrize("tamper", TAMPERINGS)
def test_an_import_of_a_store_that_does_not_verify_fails_with_a_tuf_error(
    world: World, synced: TufRepository, tamper: Any
) -> None:
    assert versions_of(world.store, bin_of("web-1")) == [1, synced_versions(synced)[bin_of("web-1")]]
    tamper(world.store)
    writes = list(world.store.writes)
    fresh = world.repo("new-state-dir")
    with pytest.raises(TufError):
        fresh.load()
    with pytest.raises(TufError):
        fresh.sync(PUBLISHED)
    assert world.store.writes == writes
    assert not (world.tmp / "new-state-dir" / LOCAL_FILE).exists(), "nothing unverified is kept"


def stored_key(md: Metadatas, role: str) -> str:
    """Where the store holds ``role``'s current metadata ("bin": web-1's bin)."""
    if role == "bin":
        return tuf_path(bin_of("web-1"), md.bins[bin_of("web-1")].signed.version)
    current = {"root": md.root, "timestamp": None, "snapshot": md.snapshot, "targets": md.targets}[role]
    return tuf_path(role, None if current is None else current.signed.version)


@pytest.mark.parametrize(
    ("role", "limit"),
    [
        ("root", ROOT_LIMIT),
        ("timestamp", TIMESTAMP_LIMIT),
        ("snapshot", SNAPSHOT_LIMIT),
        ("targets", TARGETS_LIMIT),
        ("bin", TARGETS_LIMIT),
    ],
)
def test_an_import_reads_no_metadata_past_its_role_s_limit(
    world: World, synced: TufRepository, role: str, limit: int
) -> None:
    """Metadata someone else padded (still valid JSON, every signature still good):
    refused by its key and limit, never read whole (the memory store raises past the
    limit it is given; an unbounded read takes the padded file)."""
    key = stored_key(synced.load(), role)
    world.store.objects[key] += b" " * limit
    writes = list(world.store.writes)
    with pytest.raises(ObjectTooLargeError, match=f"{re.escape(key)}.*larger than {limit} bytes"):
        world.repo("new-state-dir").load()
    assert world.store.writes == writes
    assert not (world.tmp / "new-state-dir" / LOCAL_FILE).exists()


def test_a_timestamp_past_its_limit_is_not_the_store_ahead_of_the_local_copy(
    world: World, synced: TufRepository
) -> None:
    """A newer timestamp, padded: not read, so not imported; the local copy goes on and
    its next timestamp replaces the padded one."""
    before = synced.load().timestamp.signed.version
    newer = stored(world.store, TIMESTAMP)
    newer.signed.version += 1
    world.store.objects[TIMESTAMP] = resign(newer, ONLINE) + b" " * TIMESTAMP_LIMIT
    repo = world.repo()
    assert repo.load().timestamp.signed.version == before
    world.clock.advance(TIMESTAMP_LIFETIME.total_seconds() / 2 + 1)
    assert repo.sync(PUBLISHED)
    assert stored(world.store, TIMESTAMP).signed.version == before + 1


# -- a corrupt local copy ----------------------------------------------------------


def garbage(path: Path) -> None:
    path.write_bytes(b"\x89 not json at all")


def section(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    """A corruption of one section of the local copy (one JSON document)."""

    def corrupt(path: Path) -> None:
        doc = json.loads(path.read_bytes())
        change(doc)
        path.write_text(json.dumps(doc))

    return corrupt


CORRUPTIONS: dict[str, Callable[[Path], object]] = {
    "garbage": garbage,
    "empty": lambda p: p.write_bytes(b""),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "not an object": lambda p: p.write_bytes(b"[]"),
    "a section that is not metadata": section(
        lambda d: d.update(root={"signed": {"_type": "root", "version": "one"}, "signatures": []})
    ),
    "timestamp as root": section(lambda d: d.update(root=d["timestamp"])),
    "snapshot as timestamp": section(lambda d: d.update(timestamp=d["snapshot"])),
    "timestamp as snapshot": section(lambda d: d.update(snapshot=d["timestamp"])),
    "timestamp as a bin": section(lambda d: d["bins"].update({"bins-1": d["timestamp"]})),
    "a bin as targets (it delegates nothing)": section(lambda d: d.update(targets=d["bins"]["bins-0"])),
    "a section missing": section(lambda d: d.pop("snapshot")),
    "a bin missing": section(lambda d: d["bins"].pop("bins-1")),
}


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_a_corrupt_local_copy_is_a_tuf_error(
    world: World, synced: TufRepository, corrupt: Callable[[Path], object]
) -> None:
    path = world.tmp / "daemon" / LOCAL_FILE
    assert path.exists()
    corrupt(path)
    writes = list(world.store.writes)
    with pytest.raises(TufError, match="daemon"):
        world.repo().load()
    assert world.store.writes == writes


def test_a_state_dir_without_a_local_root_imports_from_the_store(world: World, synced: TufRepository) -> None:
    (world.tmp / "daemon" / LOCAL_FILE).unlink()
    writes = len(world.store.writes)
    md = world.repo().load()
    assert tufrepo.hosts_listed(md.bins.values()) == PUBLISHED
    assert world.store.writes[writes:] == []
    assert (world.tmp / "daemon" / LOCAL_FILE).exists()


def test_a_running_repository_reads_its_local_root_again_when_it_changes(
    world: World, synced: TufRepository
) -> None:
    garbage(world.tmp / "daemon" / LOCAL_FILE)
    with pytest.raises(TufError, match=r"metadata\.json"):
        synced.sync(PUBLISHED)


# -- key changes -------------------------------------------------------------------


def by(*signers: Signer) -> dict[str, Signer]:
    return {s.public_key.keyid: s for s in signers}


def add(role: RoleName, signer: Signer) -> Any:
    return partial(tufrepo.add_key, role=role, key=signer.public_key)


def threshold(role: RoleName, k: int) -> Any:
    return partial(tufrepo.set_threshold, role=role, threshold=k)


def revoke(role: RoleName, signer: Signer) -> Any:
    return partial(tufrepo.revoke_key, role=role, keyid=signer.public_key.keyid)


def local_files(world: World, local: str = "daemon") -> dict[str, bytes]:
    d = world.tmp / local
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*"))}


def test_a_root_key_added_then_a_threshold_of_two_needs_both_signatures(
    world: World, synced: TufRepository
) -> None:
    client = world.client()
    client.updater()
    changed = synced.change_keys(RoleName.ROOT, add(RoleName.ROOT, OFFLINE), by(ONLINE))
    assert changed.signed.version == 2
    assert client.root_version() == 2

    writes, files = list(world.store.writes), local_files(world)
    with pytest.raises(TufError) as refused:
        synced.change_keys(RoleName.ROOT, threshold(RoleName.ROOT, 2), by(ONLINE))
    message = str(refused.value)
    assert ONLINE.public_key.keyid in message and OFFLINE.public_key.keyid in message
    assert "needs 2 signature(s)" in message
    assert world.store.writes == writes and local_files(world) == files, "nothing written"
    assert synced.load().root.signed.version == 2

    root = synced.change_keys(RoleName.ROOT, threshold(RoleName.ROOT, 2), by(ONLINE, OFFLINE))
    assert root.signed.version == 3 and len(root.signatures) == 2
    v2 = stored(world.store, tuf_path("root", 2))
    v2.verify_delegate("root", root)
    root.verify_delegate("root", root)

    with pytest.raises(TufError, match="root version 3"):
        synced.change_keys(RoleName.ROOT, threshold(RoleName.ROOT, 1), by(OFFLINE))
    world.publish("web-9", 1)
    assert synced.sync({**PUBLISHED, "web-9": 1})
    assert client.listed("web-9") == 1
    assert client.root_version() == 3


def test_a_key_change_no_one_can_sign_changes_nothing_not_even_in_memory(
    world: World, synced: TufRepository
) -> None:
    """Moving the timestamp role off the daemon's key without the new key's signer: the
    new root could be signed, the new timestamp not."""
    synced.change_keys(RoleName.TIMESTAMP, add(RoleName.TIMESTAMP, OTHER), by(ONLINE))
    writes, files = list(world.store.writes), local_files(world)
    snapshot = synced.load().snapshot.signed.version
    with pytest.raises(TufError, match="timestamp"):
        synced.change_keys(RoleName.TIMESTAMP, revoke(RoleName.TIMESTAMP, ONLINE), by(ONLINE))
    assert world.store.writes == writes and local_files(world) == files
    md = synced.load()
    assert md.root.signed.version == 2 and md.snapshot.signed.version == snapshot

    client = world.client()
    world.publish("web-9", 1)
    assert synced.sync({**PUBLISHED, "web-9": 1})
    assert client.listed("web-9") == 1
    assert synced.change_keys(RoleName.ROOT, add(RoleName.ROOT, OFFLINE), by(ONLINE)).signed.version == 3
    assert client.root_version() == 3


def test_a_bins_key_change_is_a_new_targets_named_by_the_snapshot(
    world: World, synced: TufRepository
) -> None:
    client = world.client()
    client.updater()
    changed = synced.change_keys(RoleName.BINS, add(RoleName.BINS, OTHER), by(ONLINE))
    assert isinstance(changed.signed, Targets) and changed.signed.version == 2
    assert versions_of(world.store, "root") == [1]
    snapshot: Metadata[Snapshot] = stored(
        world.store, tuf_path("snapshot", synced.load().snapshot.signed.version)
    )
    assert snapshot.signed.meta["targets.json"].version == 2
    assert client.listed("web-2") == 4


def test_a_key_change_by_another_process_is_taken_by_the_running_one(
    world: World, synced: TufRepository
) -> None:
    """`reconciler keys` runs in its own process over the daemon's state dir (under the
    pass lock); the daemon's next sync signs over what it wrote."""
    client = world.client()
    client.updater()
    cli = world.repo()
    cli.change_keys(RoleName.BINS, add(RoleName.BINS, OTHER), by(ONLINE))
    cli.change_keys(RoleName.ROOT, add(RoleName.ROOT, OFFLINE), by(ONLINE))
    client.updater()

    world.publish("web-9", 1)
    assert synced.sync({**PUBLISHED, "web-9": 1})
    md = synced.load()
    assert (md.root.signed.version, md.targets.signed.version) == (2, 2)
    assert client.listed("web-9") == 1, "no rollback of targets, snapshot or timestamp"

    # A change the daemon makes next follows the other's root: 2 -> 3, not 1 -> 2 again.
    assert (
        synced.change_keys(RoleName.ROOT, threshold(RoleName.ROOT, 2), by(ONLINE, OFFLINE)).signed.version
        == 3
    )
    assert client.root_version() == 3


def test_a_key_change_by_another_process_in_the_same_clock_tick_is_taken(
    world: World, synced: TufRepository
) -> None:
    """A coarse file clock gives both writes one mtime: the change must still show."""
    path = world.tmp / "daemon" / LOCAL_FILE
    st = path.stat()
    client = world.client()
    client.updater()
    world.repo().change_keys(RoleName.BINS, add(RoleName.BINS, OTHER), by(ONLINE))
    os.utime(path, ns=(st.st_mtime_ns, st.st_mtime_ns))
    world.publish("web-9", 1)
    assert synced.sync({**PUBLISHED, "web-9": 1})
    assert synced.load().targets.signed.version == 2
    assert client.listed("web-9") == 1


def test_a_daemon_whose_key_the_online_roles_do_not_list_fails_to_load(
    world: World, synced: TufRepository
) -> None:
    with pytest.raises(TufError, match=f"does not list the signing key {OTHER.public_key.keyid}"):
        world.repo("new-state-dir", signer=OTHER).load()
    with pytest.raises(TufError, match="reconciler keys add"):
        world.repo(signer=OTHER).sync(PUBLISHED)


def test_a_rotation_of_the_online_key_leaves_the_old_daemon_a_clear_error(
    world: World, synced: TufRepository
) -> None:
    # Each `reconciler keys` is a process of its own; once the new key is in every
    # online role, the operator configures it as the signing key and revokes the old.
    for role in (RoleName.TIMESTAMP, RoleName.SNAPSHOT, RoleName.BINS):
        world.repo().change_keys(role, add(role, OTHER), by(ONLINE))
    for role in (RoleName.TIMESTAMP, RoleName.SNAPSHOT):
        world.repo(signer=OTHER).change_keys(role, revoke(role, ONLINE), by(ONLINE))
    with pytest.raises(TufError, match="timestamp role does not list"):
        synced.sync(PUBLISHED)

    rotated = world.repo(signer=OTHER)
    world.publish("web-9", 1)
    assert rotated.sync({**PUBLISHED, "web-9": 1})
    assert world.client().listed("web-9") == 1


class RefusingSigner(Signer):
    """The daemon's key as gpg refuses it (a wrong passphrase): it signs nothing."""

    def __init__(self, key: Signer) -> None:
        self._key = key

    @property
    def public_key(self) -> Any:
        return self._key.public_key

    @classmethod
    def from_priv_key_uri(cls, priv_key_uri: str, public_key: Any, secrets_handler: Any = None) -> Signer:
        raise NotImplementedError

    def sign(self, payload: bytes) -> Any:
        raise OSError("gpg: signing failed: Bad passphrase")


def test_gpg_refusing_to_sign_is_a_signing_error_and_writes_nothing(
    world: World, synced: TufRepository
) -> None:
    world.publish("web-9", 1)
    writes = list(world.store.writes)
    with pytest.raises(SigningError, match="Bad passphrase"):
        world.repo(signer=RefusingSigner(ONLINE)).sync({**PUBLISHED, "web-9": 1})
    assert world.store.writes == writes
    with pytest.raises(SigningError, match="cannot sign TUF"):
        world.repo("new-state-dir-and-store", signer=RefusingSigner(ONLINE))._create()
    assert world.store.writes == writes


@pytest.mark.parametrize("crash_at", [0, 1, 3, 6, 7, 8])
def test_a_publisher_killed_at_any_write_carries_on_where_the_store_is(world: World, crash_at: int) -> None:
    """A kill before, within or after the store's writes of a creation or an update (the
    local copy is written last): the next process brings the store up to date, and an
    agent that read whatever was there takes what follows."""
    for host, version in PUBLISHED.items():
        world.publish(host, version)
    agent = None
    published = dict(PUBLISHED)
    if crash_at >= 7:  # kill during an update: create first, then one host's new release
        world.repo().sync(PUBLISHED)
        agent = world.client()
        agent.updater()
        world.publish("web-9", 1)
        crash_at -= 7
        published["web-9"] = 1
    world.store.crash_at = len(world.store.writes) + crash_at
    with pytest.raises(CrashError):
        world.repo().sync(published)
    world.store.crash_at = None
    if agent is None and tuf_path("root", 1) in world.store.objects:
        agent = world.client()  # trusts the root of a creation that died
    restarted = world.repo()
    restarted.sync(published)
    assert tufrepo.hosts_listed(restarted.load().bins.values()) == published
    agent = agent or world.client()
    assert agent.listed("web-1") == PUBLISHED["web-1"]
    assert world.client("fresh-agent").listed("web-2") == PUBLISHED["web-2"]
