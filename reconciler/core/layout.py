"""The store's layout (SPEC, "The store"): every key, both ways. Pure.

blobs/sha256/<hex>(.asc)                 artifact bytes, content-addressed, and signature
hosts/<host>/releases/<N>.json(.asc)     immutable signed release metadata
hosts/<host>/latest.json(.asc)           newest release, written last
keys/publisher.asc                       the publisher's public key (never trusted by agents)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

BLOB_PREFIX = "blobs/sha256/"
PUBLISHER_KEY = "keys/publisher.asc"
SIGNATURE = ".asc"

_RELEASE = re.compile(r"^hosts/([^/]+)/releases/([1-9][0-9]{0,17})\.json(\.asc)?$")
_LATEST = re.compile(r"^hosts/([^/]+)/latest\.json(\.asc)?$")
_BLOB = re.compile(r"^blobs/sha256/([0-9a-f]{64})(\.asc)?$")


def blob_path(sha256: str) -> str:
    return BLOB_PREFIX + sha256


def release_path(host: str, version: int) -> str:
    return f"hosts/{host}/releases/{version}.json"


def latest_path(host: str) -> str:
    return f"hosts/{host}/latest.json"


def signature_path(key: str) -> str:
    """Where the detached signature of the object at ``key`` is."""
    return key + SIGNATURE


@dataclass(frozen=True)
class ReleaseKey:
    host: str
    version: int
    signature: bool


@dataclass(frozen=True)
class LatestKey:
    host: str
    signature: bool


@dataclass(frozen=True)
class BlobKey:
    sha256: str
    signature: bool


Key = ReleaseKey | LatestKey | BlobKey


def parse_key(key: str) -> Key | None:
    """What ``key`` is in the layout; None for a key the layout does not name."""
    if m := _RELEASE.fullmatch(key):
        return ReleaseKey(m.group(1), int(m.group(2)), m.group(3) is not None)
    if m := _LATEST.fullmatch(key):
        return LatestKey(m.group(1), m.group(2) is not None)
    if m := _BLOB.fullmatch(key):
        return BlobKey(m.group(1), m.group(2) is not None)
    return None
