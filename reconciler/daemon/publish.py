"""Publishing a release in the crash-safe order SPEC fixes.

1. each blob, then its signature, then its zsync control file (an AppImage's)
   (keyed by the blob's content, so rewriting them is harmless), then for an ACI the
   copies appc discovery reads, ``<prefix>/<name>`` and its ``.asc`` (hard links or
   copies inside the store; release N's bytes until N is published);
2. the release's attestations ``releases/<N>.<kind>.json`` (signed inside; rewritten
   while no release file names them);
3. ``releases/<N>.json.asc`` then ``releases/<N>.json`` (immutable once written);
   then, when the daemon keeps one, the release's entry in the transparency log
   (reconciler.daemon.tlog: tiles, its inclusion proof, the signed checkpoint);
   then the host's stable zsync control file (what an AppImage's update information
   names: it points at a blob already there);
4. ``latest.json.asc`` then ``latest.json`` last.

A crash between any two steps leaves only objects nothing points at yet, and the
next reconcile repeats the steps, skipping what is already there. The one window a
reader can hit is between the two ``latest`` writes: it then sees a signature that
does not match and must retry; it can never accept an unsigned pointer.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from reconciler.core.layout import discovery_path, latest_path, release_path, update_path, zsync_path
from reconciler.core.release import Release
from reconciler.errors import IncompleteReleaseError, ObjectTooLargeError, StoreError
from reconciler.log import event as log_event  # `log` is the transparency log's here
from reconciler.ports import Store

SignFile = Callable[[Path], bytes]
SignBytes = Callable[[bytes], bytes]
# The formats appc discovery serves (an image name, a version, os and arch).
DISCOVERABLE = frozenset({"aci"})


def publish(
    store: Store,
    release: Release,
    files: Mapping[str, Path],
    sign_file: SignFile,
    sign_bytes: SignBytes,
    on_artifact: Callable[[str], None] = lambda fmt: None,
    name_prefix: str | None = None,
    zsync: Mapping[str, bytes] | None = None,
    update: bytes | None = None,
    attestations: Mapping[str, bytes] | None = None,
    log: Callable[[Release, bytes], None] | None = None,
) -> None:
    """Put ``release``, its artifact ``files`` (format -> path) and ``attestations``
    (store key -> envelope, those the release names) into ``store``, with the ``zsync``
    control files (format -> bytes) beside their blobs and ``update``, the newest
    AppImage's control file, at the host's stable key; with ``name_prefix``, also where
    appc discovery finds its ACI under that prefix. A release written before (adopted)
    keeps the attestations it names, which must be there. ``log`` appends the release
    file's bytes to the transparency log before any pointer to the release moves."""
    for art in release.artifacts:
        # A blob of another size than its release says is not it (a write cut short, a
        # disk's damage): written again like a missing one, not taken as published.
        if (stored := store.size(art.blob)) != art.size:
            # Content-addressed: a file that is not the blob (an AppImage sealed again,
            # with a new signature, for a release adopted after a crash) must not
            # land under its name.
            with files[art.format].open("rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            what = "missing" if stored is None else f"{stored} bytes, not {art.size}"
            if digest != art.sha256:
                raise IncompleteReleaseError(
                    f"{art.blob} is {what} and {files[art.format].name} is not it (sha256 {digest}); "
                    "the release cannot be completed"
                )
            if stored is not None:
                log_event("blob_replaced", logging.WARNING, blob=art.blob, stored=stored, size=art.size)
            store.put_file(art.blob, files[art.format])
        if not store.exists(art.blob + ".asc"):
            store.put_bytes(art.blob + ".asc", sign_file(files[art.format]))
        control = (zsync or {}).get(art.format)
        if control is not None and not store.exists(zsync_path(art.blob)):
            store.put_bytes(zsync_path(art.blob), control)
        if name_prefix is not None and art.format in DISCOVERABLE:
            # Always (re)made: a pass that died before the release file may have left
            # another build's bytes under this version's name.
            copy = discovery_path(name_prefix, art.name)
            store.copy(art.blob, copy)
            store.copy(art.blob + ".asc", copy + ".asc")
        on_artifact(art.format)
    meta = release.to_json()
    key = release_path(release.host, release.version)
    immutable = f"{key} already exists with other content; releases are immutable"
    try:
        # Only these bytes may be there already: a longer object is not this release.
        existing = store.get_bytes(key, len(meta))
    except ObjectTooLargeError:
        raise StoreError(f"{immutable} (it is larger than this release's {len(meta)} bytes)") from None
    if existing is not None and existing != meta:
        raise StoreError(immutable)
    for att in release.attestations:
        if existing is None:
            # Nothing names what an interrupted publish left here: replace it.
            data = (attestations or {}).get(att.path)
            if data is None:
                raise StoreError(f"{att.path}: the release names it, and there is nothing to publish there")
            store.put_bytes(att.path, data)
        elif not store.exists(att.path):
            raise StoreError(f"{att.path} is missing; the published {key} names it")
    signature = sign_bytes(meta)
    if existing is None:
        store.put_bytes(key + ".asc", signature)
        store.put_bytes(key, meta)
    if log is not None:
        log(release, meta)
    if update is not None:
        store.put_bytes(update_path(release.host), update)
    store.put_bytes(latest_path(release.host) + ".asc", signature)
    store.put_bytes(latest_path(release.host), meta)
