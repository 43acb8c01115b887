"""The store's layout (SPEC, "The store"): every key, both ways. Pure.

blobs/sha256/<hex>(.asc)                 artifact bytes, content-addressed, and signature
hosts/<host>/releases/<N>.json(.asc)     immutable signed release metadata
hosts/<host>/latest.json(.asc)           newest release, written last
keys/publisher.asc                       the publisher's public key (never trusted by agents)
tuf/<V>.<role>.json, tuf/timestamp.json  TUF metadata (reconciler.core.tufrepo)
log/checkpoint                           the transparency log's signed checkpoint (written last)
log/tile/<L>/<N>[.p/<W>]                 its Merkle tiles, and entry bundles under
                                         log/tile/entries/ (reconciler.core.tlog); append-only
hosts/<host>/releases/<N>.inclusion.json where release N is in the log, and the proof

Garbage collection never deletes a log file: it lists only hosts/ and blobs/. An
inclusion proof goes with its release (reconciler.core.gc).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from reconciler.core.tlog import Bundle, Tile, parse_tile_path

BLOB_PREFIX = "blobs/sha256/"
PUBLISHER_KEY = "keys/publisher.asc"
SIGNATURE = ".asc"

_RELEASE = re.compile(r"^hosts/([^/]+)/releases/([1-9][0-9]{0,17})\.json(\.asc)?$")
_LATEST = re.compile(r"^hosts/([^/]+)/latest\.json(\.asc)?$")
_BLOB = re.compile(r"^blobs/sha256/([0-9a-f]{64})(\.asc)?$")
_TUF = re.compile(r"^tuf/(?:([1-9][0-9]{0,17})\.)?([a-z]+(?:-[0-9a-f]+)?)\.json$")
TUF_PREFIX = "tuf/"
LOG_PREFIX = "log/"
CHECKPOINT = LOG_PREFIX + "checkpoint"
_INCLUSION = re.compile(r"^hosts/([^/]+)/releases/([1-9][0-9]{0,17})\.inclusion\.json$")


def blob_path(sha256: str) -> str:
    return BLOB_PREFIX + sha256


def release_path(host: str, version: int) -> str:
    return f"hosts/{host}/releases/{version}.json"


def latest_path(host: str) -> str:
    return f"hosts/{host}/latest.json"


def tuf_path(role: str, version: int | None) -> str:
    """TUF metadata of ``role``: versioned (consistent snapshots), but for timestamp.json."""
    return f"{TUF_PREFIX}{role}.json" if version is None else f"{TUF_PREFIX}{version}.{role}.json"


def log_path(item: Tile | Bundle) -> str:
    """Where a tile or an entry bundle of the transparency log is."""
    return LOG_PREFIX + item.path


def inclusion_path(host: str, version: int) -> str:
    """Where release ``version`` of ``host``'s inclusion proof is (beside the release)."""
    return f"hosts/{host}/releases/{version}.inclusion.json"


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


@dataclass(frozen=True)
class TufKey:
    role: str
    version: int | None  # None: timestamp.json


@dataclass(frozen=True)
class InclusionKey:
    host: str
    version: int


@dataclass(frozen=True)
class LogKey:
    item: Tile | Bundle | None  # None: the checkpoint


Key = ReleaseKey | LatestKey | BlobKey | TufKey | InclusionKey | LogKey


def parse_key(key: str) -> Key | None:
    """What ``key`` is in the layout; None for a key the layout does not name."""
    if m := _RELEASE.fullmatch(key):
        return ReleaseKey(m.group(1), int(m.group(2)), m.group(3) is not None)
    if m := _LATEST.fullmatch(key):
        return LatestKey(m.group(1), m.group(2) is not None)
    if m := _BLOB.fullmatch(key):
        return BlobKey(m.group(1), m.group(2) is not None)
    if m := _INCLUSION.fullmatch(key):
        return InclusionKey(m.group(1), int(m.group(2)))
    if key == CHECKPOINT:
        return LogKey(None)
    if key.startswith(LOG_PREFIX) and (item := parse_tile_path(key[len(LOG_PREFIX) :])) is not None:
        return LogKey(item)
    if m := _TUF.fullmatch(key):
        version = int(m.group(1)) if m.group(1) else None
        if (version is None) == (m.group(2) == "timestamp"):
            return TufKey(m.group(2), version)
    return None
