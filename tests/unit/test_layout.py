"""The store layout (reconciler.core.layout): every key, both ways."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from reconciler.core.layout import (
    PUBLISHER_KEY,
    AttestationKind,
    BlobKey,
    LatestKey,
    ReleaseKey,
    TufKey,
    attestation_path,
    blob_path,
    latest_path,
    parse_key,
    release_path,
    signature_path,
    tuf_path,
)

HOSTS = st.from_regex(r"[a-z0-9][a-z0-9-]{0,62}", fullmatch=True)


@given(HOSTS, st.integers(1, 10**17), st.booleans())
def test_a_release_key_reads_back(host: str, version: int, signed: bool) -> None:
    key = release_path(host, version)
    assert parse_key(signature_path(key) if signed else key) == ReleaseKey(host, version, signed)


@given(HOSTS, st.integers(1, 10**17), st.sampled_from(AttestationKind))
def test_an_attestation_key_reads_back(host: str, version: int, kind: AttestationKind) -> None:
    key = attestation_path(host, version, kind)
    assert key == f"hosts/{host}/releases/{version}.{kind}.json"
    assert parse_key(key) == ReleaseKey(host, version, False, kind)


@given(HOSTS, st.booleans())
def test_a_latest_key_reads_back(host: str, signed: bool) -> None:
    key = latest_path(host)
    assert parse_key(signature_path(key) if signed else key) == LatestKey(host, signed)


@given(st.from_regex(r"[0-9a-f]{64}", fullmatch=True), st.booleans())
def test_a_blob_key_reads_back(sha: str, signed: bool) -> None:
    key = blob_path(sha)
    assert parse_key(signature_path(key) if signed else key) == BlobKey(sha, signed)


def test_keys_outside_the_layout_are_nothing() -> None:
    for key in (
        PUBLISHER_KEY,
        "hosts/web-1/releases/0.json",
        "hosts/web-1/releases/01.json",
        "hosts/web-1/releases/1.other.json",  # no such attestation
        "hosts/web-1/releases/1.provenance.json.asc",  # attestations are signed inside
        "hosts/web-1/releases/1.Provenance.json",
        "hosts/web-1/latest.json.tmp",
        "blobs/sha256/" + "A" * 64,
        "blobs/sha256/" + "a" * 63,
        ".tmp-x",
        "tuf/snapshot.json",  # only the timestamp is unversioned
        "tuf/3.timestamp.json",
        "tuf/0.root.json",
        "tuf/1.Root.json",
        "tuf/1.root.json.tmp",
    ):
        assert parse_key(key) is None, key


@given(
    st.sampled_from(["root", "targets", "snapshot"]) | st.from_regex(r"bins-[0-9a-f]{1,4}", fullmatch=True),
    st.integers(1, 10**17),
)
def test_a_tuf_key_reads_back(role: str, version: int) -> None:
    assert parse_key(tuf_path(role, version)) == TufKey(role, version)
    assert parse_key(tuf_path("timestamp", None)) == TufKey("timestamp", None)
