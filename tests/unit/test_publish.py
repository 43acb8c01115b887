"""Unit tests for reconciler.daemon.publish: SPEC's publication order, on a store in memory.

Readers trust what latest.json names, so everything it points at must be in the
store before it: blobs and their signatures, then the release file's signature and
the release file, then latest.json's signature and latest.json, last.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from reconciler.core.layout import AttestationKind, attestation_path, latest_path, release_path
from reconciler.core.release import Artifact, Attestation, Release, parse_release
from reconciler.daemon.publish import publish
from reconciler.errors import StoreError
from tests.fakes import CrashError, MemoryStore

SHA_ACI = hashlib.sha256(b"ACI").hexdigest()
SHA_APP = hashlib.sha256(b"APP").hexdigest()
RELEASE = Release(
    host="web-1",
    version=3,
    commit="0123456789abcdef0123456789abcdef01234567",
    derivation="/nix/store/0000-host-web-1-image.drv",
    created=datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC),
    expires=datetime(2024, 5, 31, 12, 0, 0, tzinfo=UTC),
    artifacts=(
        Artifact("aci", "web-1-3-linux-amd64.aci", 3, SHA_ACI),
        Artifact("appimage", "web-1-3-x86_64.AppImage", 3, SHA_APP),
    ),
)
RELEASE_KEY = release_path("web-1", 3)
LATEST_KEY = latest_path("web-1")
BLOB_ACI = f"blobs/sha256/{SHA_ACI}"
BLOB_APP = f"blobs/sha256/{SHA_APP}"
# Every write of a publish into an empty store, in SPEC's order.
ORDER = [
    BLOB_ACI,
    BLOB_ACI + ".asc",
    BLOB_APP,
    BLOB_APP + ".asc",
    RELEASE_KEY + ".asc",
    RELEASE_KEY,
    LATEST_KEY + ".asc",
    LATEST_KEY,
]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    aci, app = tmp_path / "web-1.aci", tmp_path / "web-1.AppImage"
    aci.write_bytes(b"ACI")
    app.write_bytes(b"APP")
    return {"aci": aci, "appimage": app}


def sign_file(path: Path) -> bytes:
    return b"sig of file " + path.read_bytes()


def sign_bytes(data: bytes) -> bytes:
    return b"sig of " + data


def run(
    store: MemoryStore,
    files: dict[str, Path],
    release: Release = RELEASE,
    zsync: dict[str, bytes] | None = None,
    update: bytes | None = None,
) -> list[str]:
    published: list[str] = []
    publish(
        store, release, files, sign_file, sign_bytes, on_artifact=published.append, zsync=zsync, update=update
    )
    return published


def test_an_empty_store_gets_every_object_in_spec_order(files: dict[str, Path]) -> None:
    store = MemoryStore()
    assert run(store, files) == ["aci", "appimage"]
    assert store.writes == ORDER
    meta = RELEASE.to_json()
    assert store.objects == {
        BLOB_ACI: b"ACI",
        BLOB_ACI + ".asc": b"sig of file ACI",
        BLOB_APP: b"APP",
        BLOB_APP + ".asc": b"sig of file APP",
        RELEASE_KEY + ".asc": b"sig of " + meta,
        RELEASE_KEY: meta,
        LATEST_KEY + ".asc": b"sig of " + meta,
        LATEST_KEY: meta,
    }


@pytest.mark.parametrize("crash_at", range(len(ORDER)))
def test_a_crash_at_any_write_leaves_only_objects_nothing_points_at_yet(
    files: dict[str, Path], crash_at: int
) -> None:
    store = MemoryStore(crash_at=crash_at)
    with pytest.raises(CrashError):
        run(store, files)
    written = ORDER[:crash_at]
    assert store.writes == written
    if RELEASE_KEY in store.objects:
        assert {BLOB_ACI, BLOB_ACI + ".asc", BLOB_APP, BLOB_APP + ".asc"} <= set(store.objects)
    assert LATEST_KEY not in store.objects
    # The next attempt completes it, writing only what is missing (a release file's
    # signature again while the release file itself is not there).
    store.crash_at = None
    run(store, files)
    again = [k for k in ORDER[:4] if k not in written]
    if RELEASE_KEY not in written:
        again += [RELEASE_KEY + ".asc", RELEASE_KEY]
    assert store.writes[crash_at:] == [*again, LATEST_KEY + ".asc", LATEST_KEY]
    assert store.objects[LATEST_KEY] == store.objects[RELEASE_KEY] == RELEASE.to_json()
    assert store.objects[LATEST_KEY + ".asc"] == store.objects[RELEASE_KEY + ".asc"]


def test_blobs_and_signatures_already_stored_are_not_written_again(files: dict[str, Path]) -> None:
    store = MemoryStore({BLOB_ACI: b"ACI", BLOB_ACI + ".asc": b"old sig", BLOB_APP: b"APP"})
    assert run(store, files) == ["aci", "appimage"]
    assert store.writes == [BLOB_APP + ".asc", *ORDER[4:]]
    assert store.objects[BLOB_ACI + ".asc"] == b"old sig"


def test_a_release_written_before_is_kept_and_latest_written_after_it(files: dict[str, Path]) -> None:
    meta = RELEASE.to_json()
    blobs = {BLOB_ACI: b"ACI", BLOB_ACI + ".asc": b"x", BLOB_APP: b"APP", BLOB_APP + ".asc": b"x"}
    before = blobs | {RELEASE_KEY: meta, RELEASE_KEY + ".asc": b"first sig"}
    store = MemoryStore(before)
    run(store, files)
    assert store.writes == [LATEST_KEY + ".asc", LATEST_KEY]
    assert store.objects[RELEASE_KEY + ".asc"] == b"first sig"
    assert store.objects[LATEST_KEY] == meta


def test_a_blob_of_another_size_is_written_again(files: dict[str, Path]) -> None:
    store = MemoryStore({BLOB_ACI: b"AC", BLOB_APP: b"APP"})
    run(store, files)
    assert store.objects[BLOB_ACI] == b"ACI" and BLOB_ACI in store.writes and BLOB_APP not in store.writes


def test_a_release_number_taken_by_other_content_is_refused_before_latest_moves(
    files: dict[str, Path],
) -> None:
    store = MemoryStore({RELEASE_KEY: b"another release", LATEST_KEY: b"the old latest"})
    with pytest.raises(StoreError, match=f"{RELEASE_KEY} already exists with other content"):
        run(store, files)
    assert store.objects[RELEASE_KEY] == b"another release"
    assert store.objects[LATEST_KEY] == b"the old latest"
    assert not [k for k in store.writes if k.startswith("hosts/")]


def test_a_release_number_taken_by_a_longer_object_is_refused_unread(files: dict[str, Path]) -> None:
    """Only this release's bytes may be there already: a longer object is read no
    further than them, and refused as other content."""
    meta = RELEASE.to_json()
    store = MemoryStore({RELEASE_KEY: meta + b" " * 4096})
    with pytest.raises(
        StoreError, match=f"{RELEASE_KEY} already exists .*larger than this release's {len(meta)} bytes"
    ):
        run(store, files)
    assert not [k for k in store.writes if k.startswith("hosts/")]


# -- appc discovery's copies ---------------------------------------------------------------------

PREFIX = "example.com/fleet"
COPY = f"{PREFIX}/web-1-3-linux-amd64.aci"
# With a name prefix: the ACI's discovery copies right after its blob and signature.
DISCOVERY_ORDER = [*ORDER[:2], COPY, COPY + ".asc", *ORDER[2:]]


def run_named(store: MemoryStore, files: dict[str, Path]) -> None:
    publish(store, RELEASE, files, sign_file, sign_bytes, name_prefix=PREFIX)


def test_the_aci_is_also_where_appc_discovery_looks_before_the_release_names_it(
    files: dict[str, Path],
) -> None:
    store = MemoryStore()
    run_named(store, files)
    assert store.writes == DISCOVERY_ORDER
    # The same bytes and signature as the blob; only the ACI is discoverable.
    assert store.objects[COPY] == store.objects[BLOB_ACI] == b"ACI"
    assert store.objects[COPY + ".asc"] == store.objects[BLOB_ACI + ".asc"] == b"sig of file ACI"
    assert [k for k in store.objects if k.startswith(PREFIX)] == [COPY, COPY + ".asc"]


@pytest.mark.parametrize("crash_at", range(len(DISCOVERY_ORDER)))
def test_a_crash_leaves_copies_of_signed_blobs_only_and_the_next_attempt_completes(
    files: dict[str, Path], crash_at: int
) -> None:
    store = MemoryStore(crash_at=crash_at)
    with pytest.raises(CrashError):
        run_named(store, files)
    if COPY in store.objects:
        assert {BLOB_ACI, BLOB_ACI + ".asc"} <= set(store.objects)
    if RELEASE_KEY in store.objects:
        assert {COPY, COPY + ".asc"} <= set(store.objects)
    store.crash_at = None
    run_named(store, files)
    assert store.objects[COPY] == b"ACI" and store.objects[COPY + ".asc"] == b"sig of file ACI"


def test_a_copy_another_build_left_under_this_version_is_replaced(files: dict[str, Path]) -> None:
    # A pass died after copying its build as release 3 and before writing the release;
    # this pass publishes another build as 3.
    store = MemoryStore({COPY: b"OTHER", COPY + ".asc": b"sig of file OTHER"})
    run_named(store, files)
    assert store.objects[COPY] == b"ACI" and store.objects[COPY + ".asc"] == b"sig of file ACI"


def test_zsync_files_go_beside_their_blob_and_the_hosts_before_latest(files: dict[str, Path]) -> None:
    store = MemoryStore()
    run(store, files, zsync={"appimage": b"control"}, update=b"control with URL")
    update_key = "hosts/web-1/web-1-latest-x86_64.AppImage.zsync"
    assert store.writes == [*ORDER[:4], BLOB_APP + ".zsync", *ORDER[4:6], update_key, *ORDER[6:]]
    assert store.objects[BLOB_APP + ".zsync"] == b"control"
    assert store.objects[update_key] == b"control with URL"
    # Written again: the blob's control file stays, the host's follows the newest release.
    run(store, files, zsync={"appimage": b"other"}, update=b"newer")
    assert store.objects[BLOB_APP + ".zsync"] == b"control"
    assert store.objects[update_key] == b"newer"


def test_a_file_that_is_not_the_missing_blob_is_not_stored_under_its_name(
    files: dict[str, Path],
) -> None:
    files["appimage"].write_bytes(b"APP sealed again, another signature")
    store = MemoryStore()
    with pytest.raises(StoreError, match=f"{BLOB_APP} is missing and web-1.AppImage is not it"):
        run(store, files)
    assert BLOB_APP not in store.objects
    assert not [k for k in store.writes if k.startswith("hosts/")]


# -- attestations ----------------------------------------------------------------------------

PROVENANCE_KEY = attestation_path("web-1", 3, AttestationKind.PROVENANCE)
SBOM_KEY = attestation_path("web-1", 3, AttestationKind.SBOM)
ENVELOPES = {PROVENANCE_KEY: b"provenance envelope", SBOM_KEY: b"sbom envelope"}
ATTESTED = replace(
    RELEASE,
    attestations=tuple(
        Attestation(kind, key, len(ENVELOPES[key]), hashlib.sha256(ENVELOPES[key]).hexdigest())
        for kind, key in ((AttestationKind.PROVENANCE, PROVENANCE_KEY), (AttestationKind.SBOM, SBOM_KEY))
    ),
)
ATTESTED_ORDER = [*ORDER[:4], PROVENANCE_KEY, SBOM_KEY, *ORDER[4:]]


def attest_run(store: MemoryStore, files: dict[str, Path], envelopes: dict[str, bytes] = ENVELOPES) -> None:
    publish(store, ATTESTED, files, sign_file, sign_bytes, attestations=envelopes)


def test_attestations_are_written_after_the_blobs_and_before_the_release_naming_them(
    files: dict[str, Path],
) -> None:
    store = MemoryStore()
    attest_run(store, files)
    assert store.writes == ATTESTED_ORDER
    assert {k: store.objects[k] for k in ENVELOPES} == ENVELOPES
    assert store.objects[RELEASE_KEY] == ATTESTED.to_json()


@pytest.mark.parametrize("crash_at", range(len(ATTESTED_ORDER)))
def test_a_crash_at_any_write_leaves_no_release_naming_a_missing_attestation(
    files: dict[str, Path], crash_at: int
) -> None:
    store = MemoryStore(crash_at=crash_at)
    with pytest.raises(CrashError):
        attest_run(store, files)
    if RELEASE_KEY in store.objects:
        assert set(ENVELOPES) <= set(store.objects)
    # The next attempt signs anew (other envelopes): what nothing names yet is replaced.
    store.crash_at = None
    again = {k: v + b" again" for k, v in ENVELOPES.items()}
    attested = replace(
        ATTESTED,
        attestations=tuple(
            replace(a, size=len(again[a.path]), sha256=hashlib.sha256(again[a.path]).hexdigest())
            for a in ATTESTED.attestations
        ),
    )
    if RELEASE_KEY in store.objects:
        attested, again = ATTESTED, {}  # published already: adopted as it is
    publish(store, attested, files, sign_file, sign_bytes, attestations=again)
    published = parse_release(store.objects[LATEST_KEY], LATEST_KEY)
    for a in published.attestations:
        assert hashlib.sha256(store.objects[a.path]).hexdigest() == a.sha256


def test_an_adopted_release_keeps_its_attestations_and_needs_them(files: dict[str, Path]) -> None:
    store = MemoryStore()
    attest_run(store, files)
    writes = len(store.writes)
    # Adopted: the release file is there, nothing new to attest.
    publish(store, ATTESTED, files, sign_file, sign_bytes)
    assert store.writes[writes:] == [LATEST_KEY + ".asc", LATEST_KEY]
    del store.objects[SBOM_KEY]
    del store.objects[LATEST_KEY]
    with pytest.raises(StoreError, match=f"{SBOM_KEY} is missing; the published {RELEASE_KEY} names it"):
        publish(store, ATTESTED, files, sign_file, sign_bytes)
    assert LATEST_KEY not in store.objects


def test_a_new_release_naming_an_attestation_it_was_not_given_is_refused(files: dict[str, Path]) -> None:
    store = MemoryStore()
    with pytest.raises(StoreError, match=f"{SBOM_KEY}: the release names it, and there is nothing"):
        attest_run(store, files, {PROVENANCE_KEY: ENVELOPES[PROVENANCE_KEY]})
    assert RELEASE_KEY not in store.objects
