"""The store layout (reconciler.core.layout): every key, both ways."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from reconciler.core.layout import (
    PUBLISHER_KEY,
    BlobKey,
    LatestKey,
    ReleaseKey,
    TufKey,
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
