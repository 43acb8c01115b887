"""Retention planning: which releases and blobs garbage collection deletes. Pure.

Per host the newest ``keep`` published releases (``hosts/<h>/releases/<N>.json``
with their ``.asc``, attestations ``<N>.<kind>.json`` and inclusion proof
``<N>.inclusion.json``) stay, and so does the one ``latest.json`` names; older ones
go, the release file before what it names. Nothing of the transparency log (``log/``)
is ever deleted: its entries outlive the releases.
Blobs (``blobs/sha256/<hex>`` and ``.asc``) are shared between hosts: one goes only
when no kept release of any host and no ``latest.json`` references it. The copies
appc discovery reads (``<prefix>/<host>-<N>-<os>-<arch>.aci`` and ``.asc``, under any
prefix) belong to release N of their host: they go with it.

:func:`plan_gc` decides on plain data; reconciler.daemon.gc lists the store, reads
what the plan depends on and deletes, releases first, then blobs.

When in doubt it keeps: a ``latest.json`` or kept release that cannot be read or
parsed means no blob is deleted at all (its references are unknown), and a host
whose ``latest.json`` is unreadable loses no release. A release number above the
newest published one (a ``.asc`` whose ``.json`` is not written yet) is a publish in
progress and is never touched.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from reconciler.core.layout import (
    BlobKey,
    DiscoveryKey,
    InclusionKey,
    LatestKey,
    ReleaseKey,
    parse_key,
    release_path,
)
from reconciler.core.release import Release

DEFAULT_KEEP = 10


@dataclass
class _Host:
    versions: dict[int, list[str]] = field(default_factory=dict)  # N -> its keys present
    files: set[int] = field(default_factory=set)  # N whose release file is present
    latest: str | None = None

    def published(self) -> list[int]:
        """Versions whose release file (not only its signature or attestations) exists,
        ascending: what a publish writes last of a release."""
        return sorted(self.files)


@dataclass
class _Layout:
    hosts: dict[str, _Host] = field(default_factory=dict)
    blobs: dict[str, list[str]] = field(default_factory=dict)  # sha256 -> its keys present


def _layout(listing: Iterable[str]) -> _Layout:
    out = _Layout()
    for key in listing:
        match parse_key(key):
            case ReleaseKey(host=name, version=version, signature=signature, attestation=attestation):
                host = out.hosts.setdefault(name, _Host())
                host.versions.setdefault(version, []).append(key)
                if not signature and attestation is None:
                    host.files.add(version)
            case DiscoveryKey(host=name, version=version) | InclusionKey(host=name, version=version):
                out.hosts.setdefault(name, _Host()).versions.setdefault(version, []).append(key)
            case LatestKey(host=name, signature=False):
                out.hosts.setdefault(name, _Host()).latest = key
            case BlobKey(sha256=sha):
                out.blobs.setdefault(sha, []).append(key)
    return out


def _kept(host: _Host, releases: Mapping[str, Release | None], keep: int) -> set[int] | None:
    """The versions of ``host`` to keep; None when its latest.json is not known."""
    kept = set(host.published()[-keep:])
    if host.latest is not None:
        latest = releases.get(host.latest)
        if latest is None:
            return None
        if latest.version in host.versions:
            kept.add(latest.version)
    return kept


def needed_releases(listing: Iterable[str], releases: Mapping[str, Release | None], keep: int) -> list[str]:
    """The keys whose parsed content :func:`plan_gc` needs: every ``latest.json`` and
    every kept release file. Which releases are kept depends on the versions the
    ``latest.json`` files name, so call it again once those are in ``releases``."""
    layout = _layout(listing)
    needed = []
    for name, host in sorted(layout.hosts.items()):
        if host.latest is not None:
            needed.append(host.latest)
        published = host.published()
        kept = _kept(host, releases, keep)
        needed += [release_path(name, v) for v in sorted(kept or published[-keep:]) if v in published]
    return needed


def plan_gc(
    listing: Iterable[str], releases: Mapping[str, Release | None], keep: int = DEFAULT_KEEP
) -> list[str]:
    """The keys to delete, in the order to delete them (releases, then blobs).

    ``listing`` is every key of the store (at least those under ``hosts/``, ``blobs/``
    and the discovery prefixes); ``releases`` maps
    release and ``latest.json`` keys to their parsed content, None for one that
    could not be read. It must hold every key :func:`needed_releases` names;
    without one, or with None for one, no blob is deleted.
    """
    if keep < 1:
        raise ValueError("keep must be at least 1")
    keys = list(listing)
    layout = _layout(keys)
    doomed: list[str] = []
    referenced: set[str] = set()
    blobs_known = True
    for name, host in sorted(layout.hosts.items()):
        kept = _kept(host, releases, keep)
        if kept is None:
            blobs_known = False
            continue
        published = host.published()
        newest = published[-1] if published else 0
        for v in sorted(host.versions):
            if v not in kept and v < newest:
                # The release file first (then nothing names what is left of it), the
                # rest of the release's files, then the discovery copies.
                doomed += sorted(
                    host.versions[v],
                    key=lambda k: (k != release_path(name, v), not k.startswith("hosts/"), k),
                )
        # What stays referenced: the kept releases and latest.json.
        live = [release_path(name, v) for v in sorted(kept) if v in published]
        for key in [*live, host.latest] if host.latest else live:
            release = releases.get(key)
            if release is None:
                blobs_known = False
            else:
                referenced.update(a.sha256 for a in release.artifacts)
    if blobs_known:
        for sha, blob_keys in sorted(layout.blobs.items()):
            if sha not in referenced:
                doomed += sorted(blob_keys, key=lambda k: k.endswith(".asc"))
    return doomed
