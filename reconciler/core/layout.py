"""The store's layout (SPEC, "The store"): every key, both ways. Pure.

blobs/sha256/<hex>(.asc)                 artifact bytes, content-addressed, and signature
hosts/<host>/releases/<N>.json(.asc)     immutable signed release metadata
hosts/<host>/releases/<N>.<kind>.json    its attestations (DSSE envelopes, signed inside):
                                         provenance (SLSA v1) and sbom (SPDX 2.3)
hosts/<host>/latest.json(.asc)           newest release, written last
keys/publisher.asc                       the publisher's public key (never trusted by agents)
tuf/<V>.<role>.json, tuf/timestamp.json  TUF metadata (reconciler.core.tufrepo)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

BLOB_PREFIX = "blobs/sha256/"
PUBLISHER_KEY = "keys/publisher.asc"
SIGNATURE = ".asc"

_RELEASE = re.compile(r"^hosts/([^/]+)/releases/([1-9][0-9]{0,17})(?:\.([a-z]+))?\.json(\.asc)?$")
_LATEST = re.compile(r"^hosts/([^/]+)/latest\.json(\.asc)?$")
_BLOB = re.compile(r"^blobs/sha256/([0-9a-f]{64})(\.asc)?$")
_TUF = re.compile(r"^tuf/(?:([1-9][0-9]{0,17})\.)?([a-z]+(?:-[0-9a-f]+)?)\.json$")
TUF_PREFIX = "tuf/"


class AttestationKind(StrEnum):
    """An in-toto attestation published beside a release (reconciler.core.provenance)."""

    PROVENANCE = "provenance"
    SBOM = "sbom"


_KINDS = frozenset(k.value for k in AttestationKind)


def blob_path(sha256: str) -> str:
    return BLOB_PREFIX + sha256


def release_path(host: str, version: int) -> str:
    return f"hosts/{host}/releases/{version}.json"


def attestation_path(host: str, version: int, kind: AttestationKind) -> str:
    return f"hosts/{host}/releases/{version}.{kind}.json"


def latest_path(host: str) -> str:
    return f"hosts/{host}/latest.json"


def tuf_path(role: str, version: int | None) -> str:
    """TUF metadata of ``role``: versioned (consistent snapshots), but for timestamp.json."""
    return f"{TUF_PREFIX}{role}.json" if version is None else f"{TUF_PREFIX}{version}.{role}.json"


def signature_path(key: str) -> str:
    """Where the detached signature of the object at ``key`` is."""
    return key + SIGNATURE


@dataclass(frozen=True)
class ReleaseKey:
    host: str
    version: int
    signature: bool
    attestation: AttestationKind | None = None  # None: the release file (or its signature)


@dataclass(frozen=True)
class LatestKey:
    host: str
    signature: bool


@dataclass(frozen=True)
class BlobKey:
    sha256: str
    signature: bool


@dataclass(frozen=True)
class TufKey:
    role: str
    version: int | None  # None: timestamp.json


Key = ReleaseKey | LatestKey | BlobKey | TufKey


def parse_key(key: str) -> Key | None:
    """What ``key`` is in the layout; None for a key the layout does not name."""
    if m := _RELEASE.fullmatch(key):
        kind = m.group(3)
        if kind is None:
            return ReleaseKey(m.group(1), int(m.group(2)), m.group(4) is not None)
        if kind in _KINDS and m.group(4) is None:
            return ReleaseKey(m.group(1), int(m.group(2)), False, AttestationKind(kind))
    if m := _LATEST.fullmatch(key):
        return LatestKey(m.group(1), m.group(2) is not None)
    if m := _BLOB.fullmatch(key):
        return BlobKey(m.group(1), m.group(2) is not None)
    if m := _TUF.fullmatch(key):
        version = int(m.group(1)) if m.group(1) else None
        if (version is None) == (m.group(2) == "timestamp"):
            return TufKey(m.group(2), version)
    return None
