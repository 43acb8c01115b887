"""The store's layout (SPEC, "The store"): every key, both ways. Pure.

blobs/sha256/<hex>(.asc)                 artifact bytes, content-addressed, and signature
blobs/sha256/<hex>.zsync                 zsync control file of an AppImage blob
hosts/<host>/releases/<N>.json(.asc)     immutable signed release metadata
hosts/<host>/releases/<N>.<kind>.json    its attestations (DSSE envelopes, signed inside):
                                         provenance (SLSA v1) and sbom (SPDX 2.3)
hosts/<host>/latest.json(.asc)           newest release, written last
hosts/<host>/<host>-latest-x86_64.AppImage.zsync
                                         the newest AppImage's zsync control file, at the
                                         URL its update information names (AppImage spec)
keys/publisher.asc                       the publisher's public key (never trusted by agents)
tuf/<V>.<role>.json, tuf/timestamp.json  TUF metadata (reconciler.core.tufrepo)
<prefix>/<host>-<N>-<os>-<arch>.aci(.asc)  appc discovery's name of release N's ACI: the
                                         blob's bytes and signature again (core.appc)
<path of prefix>/index.html              the page answering appc discovery for the prefix
lease/<T>.json                           the publisher lease, one record per term
                                         (reconciler.core.lease); never garbage
log/checkpoint                           the transparency log's signed checkpoint (written last)
log/tile/<L>/<N>[.p/<W>]                 its Merkle tiles, and entry bundles under
                                         log/tile/entries/ (reconciler.core.tlog); append-only
hosts/<host>/releases/<N>.inclusion.json where release N is in the log, and the proof

Garbage collection never deletes a log file (it does not list log/), nor a lease
record; an inclusion proof goes with its release (reconciler.core.gc).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from reconciler.core.tlog import Bundle, Tile, parse_tile_path

BLOB_PREFIX = "blobs/sha256/"
PUBLISHER_KEY = "keys/publisher.asc"
SIGNATURE = ".asc"
ZSYNC = ".zsync"

_RELEASE = re.compile(r"^hosts/([^/]+)/releases/([1-9][0-9]{0,17})(?:\.([a-z]+))?\.json(\.asc)?$")
_LATEST = re.compile(r"^hosts/([^/]+)/latest\.json(\.asc)?$")
_BLOB = re.compile(r"^blobs/sha256/([0-9a-f]{64})(\.asc|\.zsync)?$")
_UPDATE = re.compile(r"^hosts/([^/]+)/([^/]+)-latest-x86_64\.AppImage\.zsync$")
# The prefix is an AC Name (at least its domain); the host and N are the artifact's.
_DISCOVERY = re.compile(
    r"^((?:[a-z0-9]+(?:[-._~][a-z0-9]+)*/)+)"
    r"([a-z0-9][a-z0-9-]{0,62})-([1-9][0-9]{0,17})-([a-z0-9]+)-([a-z0-9_]+)\.aci(\.asc)?$"
)
_TUF = re.compile(r"^tuf/(?:([1-9][0-9]{0,17})\.)?([a-z]+(?:-[0-9a-f]+)?)\.json$")
TUF_PREFIX = "tuf/"
LEASE_PREFIX = "lease/"
_LEASE = re.compile(r"^lease/([1-9][0-9]{0,17})\.json$")


class AttestationKind(StrEnum):
    """An in-toto attestation published beside a release (reconciler.core.provenance)."""

    PROVENANCE = "provenance"
    SBOM = "sbom"


_KINDS = frozenset(k.value for k in AttestationKind)
LOG_PREFIX = "log/"
CHECKPOINT = LOG_PREFIX + "checkpoint"
_INCLUSION = re.compile(r"^hosts/([^/]+)/releases/([1-9][0-9]{0,17})\.inclusion\.json$")


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


def discovery_path(prefix: str, file_name: str) -> str:
    """Where appc discovery finds the ACI ``file_name`` (``web-1-3-linux-amd64.aci``)
    named under ``prefix``: the template's ``{name}-{version}-{os}-{arch}.{ext}`` with
    the image name ``<prefix>/<host>``."""
    return f"{prefix}/{file_name}"


def discovery_page_path(prefix: str) -> str:
    """The page answering discovery for ``prefix`` when the store is served at the root
    of the prefix's domain: ``https://example.com/fleet?ac-discovery=1`` is answered
    by ``fleet/index.html`` (a server's directory index), ``https://example.com`` by
    ``index.html``."""
    path = prefix.partition("/")[2]
    return f"{path}/index.html" if path else "index.html"


def lease_path(term: int) -> str:
    """The record of the publisher lease's ``term`` (core.lease)."""
    return f"{LEASE_PREFIX}{term}.json"


def log_path(item: Tile | Bundle) -> str:
    """Where a tile or an entry bundle of the transparency log is."""
    return LOG_PREFIX + item.path


def inclusion_path(host: str, version: int) -> str:
    """Where release ``version`` of ``host``'s inclusion proof is (beside the release)."""
    return f"hosts/{host}/releases/{version}.inclusion.json"


def signature_path(key: str) -> str:
    """Where the detached signature of the object at ``key`` is."""
    return key + SIGNATURE


def zsync_path(blob: str) -> str:
    """Where the zsync control file of the blob at ``blob`` is."""
    return blob + ZSYNC


def update_path(host: str) -> str:
    """The stable key of ``host``'s newest AppImage's zsync control file: the spec wants
    the URL in an AppImage's update information to stay the same across versions."""
    return f"hosts/{host}/{host}-latest-x86_64.AppImage.zsync"


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
    zsync: bool = False  # the blob's zsync control file


@dataclass(frozen=True)
class UpdateKey:
    host: str


@dataclass(frozen=True)
class TufKey:
    role: str
    version: int | None  # None: timestamp.json


@dataclass(frozen=True)
class DiscoveryKey:
    """A copy of release ``version``'s ACI (or its signature) under an image name prefix."""

    prefix: str
    host: str
    version: int
    signature: bool


@dataclass(frozen=True)
class LeaseKey:
    term: int


@dataclass(frozen=True)
class InclusionKey:
    host: str
    version: int


@dataclass(frozen=True)
class LogKey:
    item: Tile | Bundle | None  # None: the checkpoint


Key = ReleaseKey | LatestKey | BlobKey | UpdateKey | TufKey | DiscoveryKey | LeaseKey | InclusionKey | LogKey


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
        return BlobKey(m.group(1), m.group(2) == SIGNATURE, m.group(2) == ZSYNC)
    if (m := _UPDATE.fullmatch(key)) and m.group(1) == m.group(2):
        return UpdateKey(m.group(1))
    if m := _DISCOVERY.fullmatch(key):
        return DiscoveryKey(m.group(1)[:-1], m.group(2), int(m.group(3)), m.group(6) is not None)
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
    if m := _LEASE.fullmatch(key):
        return LeaseKey(int(m.group(1)))
    return None
