"""The store layout (reconciler.core.layout): every key, both ways."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from reconciler.core.layout import (
    PUBLISHER_KEY,
    BlobKey,
    LatestKey,
    ReleaseKey,
    blob_path,
    latest_path,
    parse_key,
    release_path,
    signature_path,
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
    ):
        assert parse_key(key) is None, key
