"""The store layout (reconciler.core.layout): every key, both ways."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from reconciler.core.layout import (
    PUBLISHER_KEY,
    AttestationKind,
    BlobKey,
    DiscoveryKey,
    LatestKey,
    LeaseKey,
    ReleaseKey,
    TufKey,
    UpdateKey,
    attestation_path,
    blob_path,
    discovery_page_path,
    discovery_path,
    latest_path,
    lease_path,
    parse_key,
    release_path,
    signature_path,
    tuf_path,
    update_path,
    zsync_path,
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


@given(st.from_regex(r"[0-9a-f]{64}", fullmatch=True))
def test_a_blob_s_zsync_key_reads_back(sha: str) -> None:
    assert parse_key(zsync_path(blob_path(sha))) == BlobKey(sha, signature=False, zsync=True)


@given(HOSTS)
def test_a_host_s_update_key_reads_back(host: str) -> None:
    assert parse_key(update_path(host)) == UpdateKey(host)


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
        # Discovery copies: a prefix (at least a domain), the host, N, os and arch.
        "web-1-3-linux-amd64.aci",
        "example.com/web-1-0-linux-amd64.aci",
        "example.com/web-3.aci",
        "example.com/Web-1-3-linux-amd64.aci",
        "Example.com/web-1-3-linux-amd64.aci",
        "example.com//web-1-3-linux-amd64.aci",
        "example.com/-web-3-linux-amd64.aci",
        "example.com/web-1-3-linux-amd64.aci.sig",
        "example.com/fleet/index.html",
        "blobs/sha256/" + "a" * 64 + ".zsync.asc",
        "hosts/web-1/web-2-latest-x86_64.AppImage.zsync",
        "hosts/web-1/latest-x86_64.AppImage.zsync",
        "lease/0.json",
        "lease/01.json",
        "lease/3.json.probe-0123abcd",
        "lease/.tmp-3",
    ):
        assert parse_key(key) is None, key


@given(
    st.sampled_from(["root", "targets", "snapshot"]) | st.from_regex(r"bins-[0-9a-f]{1,4}", fullmatch=True),
    st.integers(1, 10**17),
)
def test_a_tuf_key_reads_back(role: str, version: int) -> None:
    assert parse_key(tuf_path(role, version)) == TufKey(role, version)
    assert parse_key(tuf_path("timestamp", None)) == TufKey("timestamp", None)


PREFIXES = st.from_regex(
    r"[a-z0-9]{1,8}(\.[a-z0-9]{1,8}){0,2}(/[a-z0-9]{1,6}([-._~][a-z0-9]{1,4})?){0,3}", fullmatch=True
)


@given(PREFIXES, HOSTS, st.integers(1, 10**17), st.booleans())
def test_a_discovery_key_reads_back(prefix: str, host: str, version: int, signed: bool) -> None:
    key = discovery_path(prefix, f"{host}-{version}-linux-amd64.aci")
    assert key == f"{prefix}/{host}-{version}-linux-amd64.aci"
    assert parse_key(signature_path(key) if signed else key) == DiscoveryKey(prefix, host, version, signed)


def test_the_discovery_page_is_the_index_of_the_prefix_path() -> None:
    assert discovery_page_path("example.com/fleet") == "fleet/index.html"
    assert discovery_page_path("example.com/a/b") == "a/b/index.html"
    assert discovery_page_path("example.com") == "index.html"


@given(st.integers(1, 10**17))
def test_a_lease_key_reads_back(term: int) -> None:
    assert parse_key(lease_path(term)) == LeaseKey(term)


def test_log_keys_and_inclusion_proofs_read_back() -> None:
    from reconciler.core.layout import CHECKPOINT, InclusionKey, LogKey, inclusion_path, log_path
    from reconciler.core.tlog import Bundle, Tile

    assert parse_key(CHECKPOINT) == LogKey(None)
    for item in (Tile(0, 1_234_067, 256), Tile(3, 2, 17), Bundle(0, 1)):
        assert parse_key(log_path(item)) == LogKey(item)
    assert parse_key(inclusion_path("web-1", 7)) == InclusionKey("web-1", 7)
    for key in (
        "log/checkpoint.asc",
        "log/tile/0/1",
        "log/tile/0/000.p/256",
        "hosts/web-1/releases/0.inclusion.json",
    ):
        assert parse_key(key) is None, key
