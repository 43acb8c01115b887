"""Unit tests of the store's TUF model (reconciler.core.tufrepo): what a new repository
says, how entries land in their hash bins, when metadata is due, and which key changes
are refused. Real ed25519 keys; nothing is signed, read or written."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from securesystemslib.signer import CryptoSigner, Key
from tuf.api.metadata import Metadata, Root, SuccinctRoles, TargetFile, Targets

from reconciler.core import tufrepo
from reconciler.core.layout import tuf_path
from reconciler.core.tufrepo import KeyChangeError, KeySet, Lifetimes, RoleName

NOW = datetime(2026, 11, 24, 12, 0, 0, 500_000, tzinfo=UTC)
LIFETIMES = Lifetimes(
    root=timedelta(days=300),
    targets=timedelta(days=200),
    snapshot=timedelta(days=7),
    timestamp=timedelta(hours=6),
)
BIT_LENGTH = 3  # eight bins: enough that hosts spread over several


def key() -> Key:
    return CryptoSigner.generate_ed25519().public_key


ROOT_1, ROOT_2, TARGETS_1, ONLINE, OTHER = (key() for _ in range(5))


def repository(
    root_keys: KeySet | None = None, targets_keys: KeySet | None = None, bit_length: int = BIT_LENGTH
) -> tuple[Metadata[Root], Metadata[Targets], dict[str, Metadata[Targets]]]:
    return tufrepo.new_repository(
        root_keys or KeySet((ROOT_1, ROOT_2), threshold=2),
        targets_keys or KeySet((TARGETS_1,)),
        ONLINE,
        bit_length,
        NOW,
        LIFETIMES,
    )


def release(host: str, version: int) -> bytes:
    return f'{{"host":"{host}","version":{version}}}'.encode()


# -- a new repository ----------------------------------------------------------------


def test_new_repository_names_each_roles_keys_and_threshold() -> None:
    root, targets, _ = repository()
    r = root.signed
    assert r.version == 1 and targets.signed.version == 1
    assert r.consistent_snapshot is True
    assert set(r.roles) == {"root", "targets", "snapshot", "timestamp"}
    assert (r.roles["root"].keyids, r.roles["root"].threshold) == ([ROOT_1.keyid, ROOT_2.keyid], 2)
    assert (r.roles["targets"].keyids, r.roles["targets"].threshold) == ([TARGETS_1.keyid], 1)
    for online in ("snapshot", "timestamp"):
        assert (r.roles[online].keyids, r.roles[online].threshold) == ([ONLINE.keyid], 1)
    assert set(r.keys) == {k.keyid for k in (ROOT_1, ROOT_2, TARGETS_1, ONLINE)}
    assert r.expires == datetime(2026, 11, 24, 12, 0, tzinfo=UTC) + LIFETIMES.root
    assert targets.signed.expires == datetime(2026, 11, 24, 12, 0, tzinfo=UTC) + LIFETIMES.targets


@pytest.mark.parametrize("bit_length", [1, 2, 3, 8])
def test_new_repository_delegates_to_2_pow_bit_length_empty_bins_under_the_online_key(
    bit_length: int,
) -> None:
    _, targets, bins = repository(bit_length=bit_length)
    roles = tufrepo.succinct(targets.signed)
    assert roles.bit_length == bit_length and roles.name_prefix == tufrepo.BINS_PREFIX
    assert len(bins) == 2**bit_length == roles.number_of_bins
    assert set(bins) == set(roles.get_roles())
    assert (roles.keyids, roles.threshold) == ([ONLINE.keyid], 1)
    assert targets.signed.delegations is not None
    assert targets.signed.delegations.keys == {ONLINE.keyid: ONLINE}
    assert targets.signed.targets == {}
    for b in bins.values():
        assert b.signed.targets == {} and b.signed.version == 1
        assert b.signed.expires == datetime(2026, 11, 24, 12, 0, tzinfo=UTC) + LIFETIMES.snapshot


def test_new_repository_signs_nothing() -> None:
    root, targets, bins = repository()
    metadata: list[Metadata[Any]] = [root, targets, *bins.values()]
    assert [m.signatures for m in metadata] == [{}] * (2 + len(bins))


def test_snapshot_and_timestamp_name_the_versions_they_cover() -> None:
    _, targets, bins = repository()
    snapshot = tufrepo.new_snapshot(targets, bins, NOW, LIFETIMES)
    assert set(snapshot.signed.meta) == {"targets.json"} | {f"{n}.json" for n in bins}
    assert {m.version for m in snapshot.signed.meta.values()} == {1}
    timestamp = tufrepo.new_timestamp(snapshot, NOW, LIFETIMES)
    assert timestamp.signed.snapshot_meta.version == snapshot.signed.version
    assert timestamp.signed.expires == datetime(2026, 11, 24, 12, 0, tzinfo=UTC) + LIFETIMES.timestamp

    name = sorted(bins)[3]
    bins[name].signed.version = 7
    tufrepo.record_versions(snapshot, {name: bins[name]})
    assert snapshot.signed.meta[f"{name}.json"].version == 7
    assert snapshot.signed.meta["targets.json"].version == 1


# -- entries in their bins -----------------------------------------------------------


def bin_of(targets: Metadata[Targets], host: str) -> str:
    return tufrepo.succinct(targets.signed).get_role_for_target(tufrepo.target_path(host))


def test_set_entries_puts_each_entry_in_its_hash_bin_and_reports_the_bins_changed() -> None:
    _, targets, bins = repository()
    hosts = [f"web-{i}" for i in range(20)]
    changed = tufrepo.set_entries(targets, bins, {h: tufrepo.entry(h, 1, release(h, 1)) for h in hosts})
    assert changed == {bin_of(targets, h) for h in hosts}
    assert len(changed) > 1, "twenty hosts in eight bins land in more than one"
    for name, b in bins.items():
        assert set(b.signed.targets) == {tufrepo.target_path(h) for h in hosts if bin_of(targets, h) == name}
    info = bins[bin_of(targets, "web-3")].signed.targets["hosts/web-3/latest.json"]
    assert info.length == len(release("web-3", 1))
    assert info.hashes == {"sha256": hashlib.sha256(release("web-3", 1)).hexdigest()}
    assert tufrepo.entry_version(info) == 1


def test_set_entries_reports_only_the_bins_whose_entries_changed() -> None:
    _, targets, bins = repository()
    hosts = [f"web-{i}" for i in range(20)]
    tufrepo.set_entries(targets, bins, {h: tufrepo.entry(h, 1, release(h, 1)) for h in hosts})
    before = {n: dict(b.signed.targets) for n, b in bins.items()}

    same = {h: tufrepo.entry(h, 1, release(h, 1)) for h in hosts}
    assert tufrepo.set_entries(targets, bins, same) == set()
    assert {n: b.signed.targets for n, b in bins.items()} == before

    assert tufrepo.set_entries(targets, bins, {"web-4": tufrepo.entry("web-4", 2, release("web-4", 2))}) == {
        bin_of(targets, "web-4")
    }
    # Same bytes, another number: a different entry.
    assert tufrepo.set_entries(targets, bins, {"web-5": tufrepo.entry("web-5", 9, release("web-5", 1))}) == {
        bin_of(targets, "web-5")
    }


def test_set_entries_removes_the_entries_given_none_and_ignores_hosts_not_listed() -> None:
    _, targets, bins = repository()
    tufrepo.set_entries(targets, bins, {h: tufrepo.entry(h, 1, release(h, 1)) for h in ("a", "b", "c")})
    assert tufrepo.set_entries(targets, bins, {"b": None, "never-listed": None}) == {bin_of(targets, "b")}
    assert tufrepo.hosts_listed(bins.values()) == {"a": 1, "c": 1}
    assert tufrepo.set_entries(targets, bins, {"b": None}) == set()


def test_hosts_listed_reads_every_bin_and_skips_entries_that_name_no_host_release() -> None:
    _, targets, bins = repository()
    tufrepo.set_entries(
        targets,
        bins,
        {"web-1": tufrepo.entry("web-1", 3, release("web-1", 3)), "db": tufrepo.entry("db", 1, b"x")},
    )
    stray = bins[sorted(bins)[0]].signed.targets
    for path in ("hosts/x/releases/1.json", "hosts/x", "hosts//latest.json/x"):
        stray[path] = TargetFile.from_data(path, b"x")
        stray[path].unrecognized_fields["custom"] = {"version": 1}
    stray["other/y/latest.json"] = tufrepo.entry("y", 1, b"x")
    no_number = TargetFile.from_data("hosts/z/latest.json", b"x")
    stray["hosts/z/latest.json"] = no_number
    assert tufrepo.hosts_listed(bins.values()) == {"web-1": 3, "db": 1}


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=10,
)
CUSTOM = JSON | st.dictionaries(st.just("version"), JSON, min_size=1) | st.builds(object)


@given(CUSTOM)
def test_entry_version_of_any_custom_value_is_none_or_a_release_number(custom: Any) -> None:
    info = TargetFile.from_data("hosts/h/latest.json", b"x")
    info.unrecognized_fields["custom"] = custom
    version = tufrepo.entry_version(info)
    assert version is None or (type(version) is int and version >= 1)
    if isinstance(custom, dict) and type(custom.get("version")) is int and custom["version"] >= 1:
        assert version == custom["version"]


@pytest.mark.parametrize("bad", [0, -1, True, 1.0, "1", None, [1]])
def test_entry_version_refuses_what_is_not_a_positive_int(bad: object) -> None:
    info = TargetFile.from_data("hosts/h/latest.json", b"x")
    info.unrecognized_fields["custom"] = {"version": bad}
    assert tufrepo.entry_version(info) is None
    del info.unrecognized_fields["custom"]
    assert tufrepo.entry_version(info) is None


def test_entry_round_trips_through_json() -> None:
    info = tufrepo.entry("web-1", 12, release("web-1", 12))
    again = TargetFile.from_dict(info.to_dict(), info.path)
    assert again == info and tufrepo.entry_version(again) == 12


# -- lifetimes -----------------------------------------------------------------------


def test_bump_makes_a_new_unsigned_version_expiring_a_lifetime_from_now() -> None:
    _, _, bins = repository()
    md = next(iter(bins.values()))
    md.sign(CryptoSigner.generate_ed25519())
    later = NOW + timedelta(days=2, microseconds=7)
    tufrepo.bump(md, later, timedelta(days=5))
    assert md.signed.version == 2
    assert md.signatures == {}
    assert md.signed.expires == later.replace(microsecond=0) + timedelta(days=5)


def test_due_once_less_than_half_the_lifetime_is_left() -> None:
    lifetime = timedelta(hours=6)
    _, _, bins = repository()
    md = next(iter(bins.values()))
    tufrepo.bump(md, NOW, lifetime)
    signed_at = NOW.replace(microsecond=0)
    assert not tufrepo.due(md, signed_at, lifetime)
    assert not tufrepo.due(md, signed_at + lifetime / 2, lifetime)
    assert tufrepo.due(md, signed_at + lifetime / 2 + timedelta(seconds=1), lifetime)
    assert tufrepo.due(md, signed_at + 2 * lifetime, lifetime)


def test_lifetimes_of_each_role() -> None:
    assert [LIFETIMES.of(r) for r in RoleName] == [
        LIFETIMES.root,
        LIFETIMES.targets,
        LIFETIMES.snapshot,
        LIFETIMES.timestamp,
        LIFETIMES.snapshot,
    ]


# -- key sets and key changes --------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "threshold", "match"),
    [
        ((), 1, "at least one key"),
        ((ROOT_1,), 0, "between 1 and 1"),
        ((ROOT_1,), 2, "between 1 and 1"),
        ((ROOT_1, ROOT_2), -1, "between 1 and 2"),
    ],
)
def test_a_key_set_needs_keys_and_a_threshold_it_can_meet(
    keys: tuple[Key, ...], threshold: int, match: str
) -> None:
    with pytest.raises(KeyChangeError, match=match):
        KeySet(keys, threshold)


def test_a_key_set_of_k_of_n() -> None:
    assert KeySet((ROOT_1, ROOT_2), 2).threshold == 2
    assert KeySet((ROOT_1,)).threshold == 1


def keys_of(root: Metadata[Root], targets: Metadata[Targets], role: RoleName) -> tuple[list[str], int]:
    return tufrepo.role_keys(root.signed, targets.signed, role)


ONE_KEY_ROLES = [RoleName.TARGETS, RoleName.SNAPSHOT, RoleName.TIMESTAMP, RoleName.BINS]


@pytest.mark.parametrize("role", ONE_KEY_ROLES)
def test_add_a_key_raise_the_threshold_revoke_lower(role: RoleName) -> None:
    root, targets, _ = repository()
    (first,), _ = keys_of(root, targets, role)
    tufrepo.add_key(root.signed, targets.signed, role, OTHER)
    assert keys_of(root, targets, role) == ([first, OTHER.keyid], 1)
    tufrepo.set_threshold(root.signed, targets.signed, role, 2)
    assert keys_of(root, targets, role) == ([first, OTHER.keyid], 2)
    tufrepo.set_threshold(root.signed, targets.signed, role, 1)
    tufrepo.revoke_key(root.signed, targets.signed, role, first)
    assert keys_of(root, targets, role) == ([OTHER.keyid], 1)


def test_bins_keys_live_in_targets_and_root_keys_in_root() -> None:
    root, targets, _ = repository()
    before = root.to_bytes()
    tufrepo.add_key(root.signed, targets.signed, RoleName.BINS, OTHER)
    assert root.to_bytes() == before, "a bins key is targets' business"
    assert targets.signed.delegations is not None
    assert OTHER.keyid in targets.signed.delegations.keys

    root, targets, _ = repository()
    before = targets.to_bytes()
    tufrepo.add_key(root.signed, targets.signed, RoleName.ROOT, OTHER)
    assert targets.to_bytes() == before
    assert OTHER.keyid in root.signed.keys


Change = Callable[[Root, Targets], None]


def refused(root: Metadata[Root], targets: Metadata[Targets], change: Change, match: str) -> None:
    """``change`` is refused with a message matching ``match`` and changes nothing."""
    before = (root.to_bytes(), targets.to_bytes())
    with pytest.raises(KeyChangeError, match=match):
        change(root.signed, targets.signed)
    assert (root.to_bytes(), targets.to_bytes()) == before


@pytest.mark.parametrize("role", list(RoleName))
def test_a_key_already_in_the_role_is_refused(role: RoleName) -> None:
    root, targets, _ = repository()
    keyids, _ = keys_of(root, targets, role)
    present = {k.keyid: k for k in (ROOT_1, ROOT_2, TARGETS_1, ONLINE)}[keyids[0]]
    refused(root, targets, lambda r, t: tufrepo.add_key(r, t, role, present), "already a")


@pytest.mark.parametrize("role", list(RoleName))
def test_revoking_a_key_the_role_does_not_list_is_refused(role: RoleName) -> None:
    root, targets, _ = repository()
    refused(root, targets, lambda r, t: tufrepo.revoke_key(r, t, role, OTHER.keyid), "is not a")


@pytest.mark.parametrize("role", list(RoleName))
def test_revoking_below_the_threshold_is_refused(role: RoleName) -> None:
    """Root starts 2 of 2; every other role 1 of 1."""
    root, targets, _ = repository()
    keyids, threshold = keys_of(root, targets, role)
    assert len(keyids) == threshold
    refused(root, targets, lambda r, t: tufrepo.revoke_key(r, t, role, keyids[0]), "add a key first")


def test_revoking_a_root_key_once_the_threshold_is_lowered() -> None:
    root, targets, _ = repository()
    tufrepo.set_threshold(root.signed, targets.signed, RoleName.ROOT, 1)
    tufrepo.revoke_key(root.signed, targets.signed, RoleName.ROOT, ROOT_1.keyid)
    assert keys_of(root, targets, RoleName.ROOT) == ([ROOT_2.keyid], 1)
    assert ROOT_1.keyid not in root.signed.keys, "a key no role lists goes"


@pytest.mark.parametrize("role", list(RoleName))
@pytest.mark.parametrize("offset", ["zero", "negative", "above"])
def test_a_threshold_outside_1_to_n_is_refused(role: RoleName, offset: str) -> None:
    root, targets, _ = repository()
    n = len(keys_of(root, targets, role)[0])
    threshold = {"zero": 0, "negative": -1, "above": n + 1}[offset]
    refused(root, targets, lambda r, t: tufrepo.set_threshold(r, t, role, threshold), f"must be 1 to {n}")


def test_metadata_key_names() -> None:
    assert tuf_path("timestamp", None) == "tuf/timestamp.json"
    assert tuf_path("bins-3", 4) == "tuf/4.bins-3.json"
    assert tufrepo.target_path("web-1") == "hosts/web-1/latest.json"


@given(
    bit_length=st.integers(min_value=1, max_value=16),
    changes=st.lists(st.lists(st.integers(min_value=0, max_value=65535), max_size=8), max_size=30),
)
def test_no_two_bins_are_ever_signed_at_one_version(bit_length: int, changes: list[list[int]]) -> None:
    """Snapshot after snapshot, each changing some bins: every version a bin is signed
    at is its own (no other bin's, ever), and later than the bin's previous one."""
    roles = SuccinctRoles(["k"], 1, bit_length, tufrepo.BINS_PREFIX)
    names = list(roles.get_roles())
    current = dict.fromkeys(names, 1)  # as new_repository makes them
    owner: dict[int, str] = {}
    for snapshot, changed in enumerate(changes, start=2):
        for name in {names[i % len(names)] for i in changed}:
            version = tufrepo.bin_version(roles, name, snapshot)
            assert version > current[name]
            assert owner.setdefault(version, name) == name
            current[name] = version
