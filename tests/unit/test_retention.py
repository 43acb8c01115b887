"""Unit and property tests for reconciler.retention (GC planning on plain data)."""

from __future__ import annotations

import builtins
import hashlib
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.core.gc import needed_releases, plan_gc
from reconciler.core.layout import (
    AttestationKind,
    DiscoveryKey,
    ReleaseKey,
    attestation_path,
    blob_path,
    discovery_path,
    latest_path,
    parse_key,
    release_path,
    update_path,
    zsync_path,
)
from reconciler.core.release import RELEASE_LIMIT, Artifact, Release, new_release
from reconciler.daemon.gc import collect
from tests import fakes

NOW = datetime(2026, 1, 1, tzinfo=UTC)
SHAS = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(8)]


def release(host: str, version: int, shas: list[str]) -> Release:
    arts = tuple(
        Artifact(format=fmt, name=f"{host}-{version}.{fmt}", size=1, sha256=sha)
        for fmt, sha in zip(("aci", "appimage"), shas, strict=False)
    )
    return new_release(
        host, version, "a" * 40, f"/nix/store/{host}-{version}.drv", arts, NOW, timedelta(days=1)
    )


@dataclass
class Fixture:
    """A store's state as plain data: listing plus parsed release files."""

    listing: list[str]
    releases: dict[str, Release | None]


def state(hosts: dict[str, dict[int, list[str]]], latest: dict[str, int], blobs: list[str]) -> Fixture:
    listing: list[str] = []
    releases: dict[str, Release | None] = {}
    for host, versions in hosts.items():
        for v, shas in versions.items():
            key = release_path(host, v)
            listing += [key, key + ".asc"]
            releases[key] = release(host, v, shas)
        if host in latest:
            key = latest_path(host)
            listing += [key, key + ".asc"]
            releases[key] = release(host, latest[host], versions[latest[host]])
    for sha in blobs:
        listing += [blob_path(sha), blob_path(sha) + ".asc"]
    return Fixture(listing, releases)


def test_keeps_the_newest_k_per_host_and_blobs_any_kept_release_uses() -> None:
    s = state(
        {
            "a": {1: [SHAS[0]], 2: [SHAS[1]], 3: [SHAS[2]], 4: [SHAS[3]]},
            # b's only release shares a blob with a's oldest: that blob must stay.
            "b": {1: [SHAS[0], SHAS[4]]},
        },
        latest={"a": 4, "b": 1},
        blobs=SHAS[:6],
    )
    plan = plan_gc(s.listing, s.releases, keep=2)
    assert plan == [
        "hosts/a/releases/1.json",
        "hosts/a/releases/1.json.asc",
        "hosts/a/releases/2.json",
        "hosts/a/releases/2.json.asc",
        blob_path(SHAS[1]),
        blob_path(SHAS[1]) + ".asc",
        blob_path(SHAS[5]),
        blob_path(SHAS[5]) + ".asc",
    ]


def test_latest_keeps_its_release_and_blobs_even_beyond_keep() -> None:
    # latest.json points at version 1 (a rollback written by hand): it stays.
    s = state({"a": {1: [SHAS[0]], 2: [SHAS[1]], 3: [SHAS[2]]}}, latest={"a": 1}, blobs=SHAS[:3])
    plan = plan_gc(s.listing, s.releases, keep=1)
    assert plan == ["hosts/a/releases/2.json", "hosts/a/releases/2.json.asc", *blob_keys(SHAS[1])]


def test_blobs_of_latest_stay_even_when_its_release_file_is_gone() -> None:
    s = state({"a": {1: [SHAS[0]], 2: [SHAS[1]]}}, latest={"a": 2}, blobs=SHAS[:2])
    listing = [k for k in s.listing if k != "hosts/a/releases/2.json"]
    assert plan_gc(listing, s.releases, keep=1) == []


def blob_keys(sha: str) -> list[str]:
    return [blob_path(sha), blob_path(sha) + ".asc"]


def test_a_blob_s_zsync_file_goes_with_it_and_the_host_s_stays() -> None:
    s = state({"a": {1: [SHAS[0]], 2: [SHAS[1]]}}, latest={"a": 2}, blobs=SHAS[:2])
    update = update_path("a")
    listing = [*s.listing, zsync_path(blob_path(SHAS[0])), zsync_path(blob_path(SHAS[1])), update]
    plan = plan_gc(listing, s.releases, keep=1)
    assert plan == [
        "hosts/a/releases/1.json",
        "hosts/a/releases/1.json.asc",
        # The blob first, its signature last: nothing is left signed without its blob.
        blob_path(SHAS[0]),
        zsync_path(blob_path(SHAS[0])),
        blob_path(SHAS[0]) + ".asc",
    ]
    # A control file left without its blob (a collection that died half-way) goes too.
    orphan = zsync_path(blob_path(SHAS[4]))
    assert orphan in plan_gc([*listing, orphan], s.releases, keep=1)


def test_a_publish_in_progress_is_left_alone() -> None:
    s = state({"a": {1: [SHAS[0]], 2: [SHAS[1]]}}, latest={"a": 2}, blobs=SHAS[:2])
    # Version 3's signature is written, its release file not yet; a stray old .asc goes.
    listing = [*s.listing, "hosts/a/releases/3.json.asc", "hosts/a/releases/0.json.asc"]
    listing += ["hosts/a/releases/1.json.asc.tmp", "keys/publisher.asc", "hosts/a/notes.txt"]
    plan = plan_gc(listing, s.releases, keep=1)
    assert plan == ["hosts/a/releases/1.json", "hosts/a/releases/1.json.asc", *blob_keys(SHAS[0])]


def test_attestations_go_with_their_release_after_its_file_and_never_count_as_one() -> None:
    s = state({"a": {1: [SHAS[0]], 2: [SHAS[1]]}}, latest={"a": 2}, blobs=SHAS[:2])
    attestations = [attestation_path("a", v, k) for v in (1, 2) for k in AttestationKind]
    # Version 3 has its attestations and signature, not its file yet: a publish in progress.
    in_progress = [attestation_path("a", 3, k) for k in AttestationKind]
    listing = [*s.listing, *attestations, *in_progress, "hosts/a/releases/3.json.asc"]
    plan = plan_gc(sorted(listing), s.releases, keep=1)
    assert plan == [
        "hosts/a/releases/1.json",
        "hosts/a/releases/1.json.asc",
        "hosts/a/releases/1.provenance.json",
        "hosts/a/releases/1.sbom.json",
        *blob_keys(SHAS[0]),
    ]
    # Attestations without their release file publish nothing: version 2 stays the newest.
    assert needed_releases(sorted(listing), s.releases, keep=1) == [
        "hosts/a/latest.json",
        "hosts/a/releases/2.json",
    ]


def test_releases_without_latest_count_and_hosts_without_releases_are_kept() -> None:
    s = state({"a": {1: [SHAS[0]], 2: [SHAS[1]]}}, latest={}, blobs=SHAS[:3])
    plan = plan_gc([*s.listing, "hosts/b/releases/1.json.asc"], s.releases, keep=1)
    assert plan == [
        "hosts/a/releases/1.json",
        "hosts/a/releases/1.json.asc",
        *blob_keys(SHAS[0]),
        *blob_keys(SHAS[2]),
    ]


@pytest.mark.parametrize(
    "unreadable", ["hosts/a/latest.json", "hosts/a/releases/2.json", "hosts/b/latest.json"]
)
def test_an_unreadable_kept_release_or_latest_deletes_no_blob(unreadable: str) -> None:
    s = state(
        {"a": {1: [SHAS[0]], 2: [SHAS[1]]}, "b": {1: [SHAS[2]]}}, latest={"a": 2, "b": 1}, blobs=SHAS[:4]
    )
    s.releases[unreadable] = None
    plan = plan_gc(s.listing, s.releases, keep=1)
    assert not [k for k in plan if k.startswith("blobs/")]
    if unreadable == "hosts/a/latest.json":
        assert plan == []  # nor any release of that host
    else:
        assert plan == ["hosts/a/releases/1.json", "hosts/a/releases/1.json.asc"]
    # A kept release missing from the mapping counts as unreadable too.
    del s.releases[unreadable]
    assert plan_gc(s.listing, s.releases, keep=1) == plan


def copies(host: str, version: int, prefix: str = "example.com/fleet") -> list[str]:
    """The ACI and signature appc discovery reads for release ``version`` of ``host``."""
    key = discovery_path(prefix, f"{host}-{version}-linux-amd64.aci")
    return [key, key + ".asc"]


def test_discovery_copies_go_with_their_release_under_any_prefix() -> None:
    s = state({"web-1": {1: [SHAS[0]], 2: [SHAS[1]], 3: [SHAS[2]]}}, latest={"web-1": 3}, blobs=SHAS[:3])
    # Release 1 was published under an older prefix; 2 and 3 under today's. A copy
    # of version 9 is a publish in progress; one of version 2 of a host named
    # "web" must not be taken for web-1's.
    s.listing += copies("web-1", 1, "old.example/images") + copies("web-1", 2) + copies("web-1", 3)
    s.listing += copies("web-1", 9) + copies("web", 1)
    plan = plan_gc(s.listing, s.releases, keep=1)
    assert plan == [
        "hosts/web-1/releases/1.json",
        "hosts/web-1/releases/1.json.asc",
        "old.example/images/web-1-1-linux-amd64.aci",
        "old.example/images/web-1-1-linux-amd64.aci.asc",
        "hosts/web-1/releases/2.json",
        "hosts/web-1/releases/2.json.asc",
        "example.com/fleet/web-1-2-linux-amd64.aci",
        "example.com/fleet/web-1-2-linux-amd64.aci.asc",
        blob_path(SHAS[0]),
        blob_path(SHAS[0]) + ".asc",
        blob_path(SHAS[1]),
        blob_path(SHAS[1]) + ".asc",
    ]


def test_keep_must_be_positive() -> None:
    with pytest.raises(ValueError):
        plan_gc([], {}, keep=0)


# -- property ------------------------------------------------------------------

hosts_st = st.dictionaries(
    st.sampled_from(["a", "b", "c"]),
    st.dictionaries(
        st.integers(min_value=1, max_value=8),
        st.lists(st.sampled_from(SHAS), min_size=1, max_size=2, unique=True),
        min_size=0,
        max_size=6,
    ),
    max_size=3,
)


@st.composite
def stores(draw: st.DrawFn) -> tuple[Fixture, int]:
    hosts = draw(hosts_st)
    latest = {}
    for h, versions in hosts.items():
        # Usually the newest version, sometimes an older one, sometimes none at all.
        if versions and draw(st.integers(min_value=0, max_value=3)) > 0:
            latest[h] = draw(st.sampled_from(sorted(versions))) if draw(st.booleans()) else max(versions)
    s = state(hosts, latest, draw(st.lists(st.sampled_from(SHAS), unique=True)))
    # Stray signatures: of releases in progress or half-deleted ones.
    for h in hosts:
        for v in draw(st.lists(st.integers(min_value=1, max_value=10), max_size=2)):
            if release_path(h, v) + ".asc" not in s.listing:
                s.listing.append(release_path(h, v) + ".asc")
        # Attestations, of published releases or of ones in progress.
        for v in draw(st.lists(st.integers(min_value=1, max_value=10), max_size=2)):
            key = attestation_path(h, v, draw(st.sampled_from(AttestationKind)))
            if key not in s.listing:
                s.listing.append(key)
    # appc discovery's copies of releases (under two prefixes), and of versions whose
    # release is not (or no longer) there.
    for h, versions in hosts.items():
        for v in versions:
            if draw(st.booleans()):
                s.listing += copies(h, v, draw(st.sampled_from(["example.com/fleet", "old.example"])))
        for v in draw(st.lists(st.integers(min_value=1, max_value=10), max_size=2, unique=True)):
            if v not in versions:
                s.listing += copies(h, v)
    # Release files lost (a half-done deletion): latest.json may then name a missing one.
    lost = draw(st.lists(st.sampled_from(sorted(s.releases)), max_size=2)) if s.releases else []
    s.listing = [k for k in s.listing if k not in lost or k.endswith("latest.json")]
    # Blobs whose .asc is missing, or .asc whose blob is.
    s.listing = [k for k in s.listing if not draw(st.booleans()) or not k.startswith("blobs/")]
    return s, draw(st.integers(min_value=1, max_value=4))


def release_file(key: str, host: str) -> int | None:
    """The version of ``key`` if it is a release file of ``host`` (not a signature or
    an attestation)."""
    match parse_key(key):
        case ReleaseKey(host=h, version=v, signature=False, attestation=None) if h == host:
            return v
    return None


def live_references(listing: builtins.list[str], releases: dict[str, Release | None]) -> set[str]:
    refs = set()
    for key in listing:
        rel = releases.get(key)
        if rel is not None:
            refs |= {a.sha256 for a in rel.artifacts}
    return refs


@settings(max_examples=300, deadline=None)
@given(stores())
def test_no_kept_release_or_latest_ever_references_a_deleted_blob(case: tuple[Fixture, int]) -> None:
    s, keep = case
    plan = plan_gc(s.listing, s.releases, keep)
    assert len(plan) == len(set(plan)) and set(plan) <= set(s.listing)
    remaining = [k for k in s.listing if k not in plan]
    refs = live_references(remaining, s.releases)
    # Safety: nothing that stays points at a deleted blob or its signature.
    assert not {blob_path(sha) for sha in refs} & set(plan)
    assert not {blob_path(sha) + ".asc" for sha in refs} & set(plan)
    # Every latest.json stays, and per host the newest `keep` releases and latest's.
    for key in s.listing:
        assert not key.endswith("latest.json") or key in remaining
    hosts = {k.split("/")[1] for k in s.listing if k.startswith("hosts/")}
    for h in hosts:
        published = sorted(v for k in s.listing if (v := release_file(k, h)) is not None)
        expect = set(published[-keep:])
        lat = s.releases.get(latest_path(h))
        if lat is not None and lat.version in published:
            expect.add(lat.version)
        kept = {v for k in remaining if (v := release_file(k, h)) is not None}
        assert kept == expect
        # Deleted release files are older than the newest; signatures go with them.
        for k in plan:
            if k.startswith(f"hosts/{h}/"):
                assert int(k.split("/")[3].split(".")[0]) < max(published)
    # Completeness: every blob nothing references is gone, releases go before blobs.
    for k in remaining:
        if k.startswith("blobs/sha256/"):
            assert k.split("/")[2].removesuffix(".asc") in refs
    kinds = [k.startswith("blobs/") for k in plan]
    assert kinds == sorted(kinds)
    # A discovery copy goes exactly when its release file does; one without a release
    # file only below the host's newest release (never a publish in progress).
    for k in s.listing:
        match parse_key(k):
            case DiscoveryKey(host=h, version=v):
                release_key = release_path(h, v)
                if release_key in s.listing:
                    assert (k in plan) == (release_key in plan), k
                elif k in plan:
                    assert any(
                        key.startswith(f"hosts/{h}/releases/")
                        and key.endswith(".json")
                        and int(key.split("/")[3][:-5]) > v
                        for key in s.listing
                    ), k
    for k in plan:
        if k.endswith(".asc") and k[:-4] in plan:
            assert plan.index(k[:-4]) < plan.index(k)
        # What a release names goes after the release file.
        match parse_key(k):
            case ReleaseKey(host=h, version=v, attestation=AttestationKind()) if release_path(h, v) in plan:
                assert plan.index(release_path(h, v)) < plan.index(k)


@settings(max_examples=100, deadline=None)
@given(stores())
def test_needed_releases_are_all_plan_gc_reads(case: tuple[Fixture, int]) -> None:
    s, keep = case
    known: dict[str, Release | None] = {}
    for _ in range(2):
        for key in needed_releases(s.listing, known, keep):
            known[key] = s.releases.get(key)
    assert plan_gc(s.listing, known, keep) == plan_gc(s.listing, s.releases, keep)


# -- collect on an in-memory store ------------------------------------------------


class MemoryStore(fakes.MemoryStore):
    """The tests' in-memory store (tests.fakes), recording what is read and deleted."""

    def __init__(self, objects: dict[str, bytes]) -> None:
        super().__init__(objects)
        self.reads: builtins.list[str] = []
        self.deleted: builtins.list[str] = []

    def get_bytes(self, key: str, limit: int) -> bytes | None:
        self.reads.append(key)
        return super().get_bytes(key, limit)

    def delete(self, key: str) -> None:
        self.deleted.append(key)
        super().delete(key)


def memory_store(s: Fixture) -> MemoryStore:
    objects = {k: b"sig" if k.endswith(".asc") else b"blob" for k in s.listing}
    for key, rel in s.releases.items():
        if key in objects and rel is not None:
            objects[key] = rel.to_json()
    objects["keys/publisher.asc"] = b"key"
    return MemoryStore(objects)


@settings(max_examples=100, deadline=None)
@given(stores())
def test_collect_deletes_the_plan_and_reads_only_what_it_needs(case: tuple[Fixture, int]) -> None:
    s, keep = case
    store = memory_store(s)
    dry = collect(store, keep, dry_run=True)
    assert store.deleted == []
    seen: builtins.list[str] = []
    assert collect(store, keep, on_delete=seen.append) == dry == seen == store.deleted
    assert dry == plan_gc(s.listing, s.releases, keep)
    # Old releases that go are never downloaded.
    assert not set(store.reads) & {k for k in dry if k.startswith("hosts/")}
    assert "keys/publisher.asc" in store.objects
    # A second pass finds nothing more to delete.
    assert collect(store, keep) == []


def test_collect_treats_a_corrupt_latest_as_unknown() -> None:
    s = state({"a": {1: [SHAS[0]], 2: [SHAS[1]]}}, latest={"a": 2}, blobs=SHAS[:3])
    store = memory_store(s)
    store.objects["hosts/a/latest.json"] = b"{not json"
    assert collect(store, 1) == []
    store.objects["hosts/a/latest.json"] = store.objects["hosts/a/releases/2.json"]
    store.objects["hosts/a/releases/2.json"] = b"garbage"
    assert collect(store, 1) == ["hosts/a/releases/1.json", "hosts/a/releases/1.json.asc"]


def test_collect_reads_no_release_past_its_limit_and_treats_it_as_unknown(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """latest.json padded by someone else (still the release, as JSON): refused unread,
    so its host loses no blob, and the warning says which file and why."""
    s = state({"a": {1: [SHAS[0]], 2: [SHAS[1]]}}, latest={"a": 2}, blobs=SHAS[:3])
    store = memory_store(s)
    store.objects["hosts/a/latest.json"] += b" " * RELEASE_LIMIT
    caplog.set_level(logging.WARNING, logger="reconciler")
    assert collect(store, 1) == []
    (warning,) = [r for r in caplog.records if r.getMessage() == "gc_release_unreadable"]
    error = getattr(warning, "fields", {})["error"]
    assert "hosts/a/latest.json" in error and f"larger than {RELEASE_LIMIT} bytes" in error


def test_collect_deletes_an_old_release_s_inclusion_proof_and_nothing_of_the_log() -> None:
    s = state({"a": {1: [SHAS[0]], 2: [SHAS[1]], 3: [SHAS[2]]}}, latest={"a": 3}, blobs=SHAS[:3])
    store = memory_store(s)
    log_keys = ["log/checkpoint", "log/tile/0/000.p/3", "log/tile/entries/000.p/3", "log/tile/0/000.p/2"]
    for key in [*log_keys, "hosts/a/releases/1.inclusion.json", "hosts/a/releases/3.inclusion.json"]:
        store.objects[key] = b"x"
    deleted = collect(store, 1)
    assert deleted[:3] == [
        "hosts/a/releases/1.json",
        "hosts/a/releases/1.inclusion.json",
        "hosts/a/releases/1.json.asc",
    ]
    assert "hosts/a/releases/3.inclusion.json" in store.objects
    assert all(key in store.objects for key in log_keys)
