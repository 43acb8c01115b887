"""Publishing a release in the crash-safe order SPEC fixes.

1. each blob, then its signature (content-addressed, so rewriting is harmless);
2. the release's attestations ``releases/<N>.<kind>.json`` (signed inside; rewritten
   while no release file names them);
3. ``releases/<N>.json.asc`` then ``releases/<N>.json`` (immutable once written);
4. ``latest.json.asc`` then ``latest.json`` last.

A crash between any two steps leaves only objects nothing points at yet, and the
next reconcile repeats the steps, skipping what is already there. The one window a
reader can hit is between the two ``latest`` writes: it then sees a signature that
does not match and must retry; it can never accept an unsigned pointer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from reconciler.core.layout import latest_path, release_path
from reconciler.core.release import Release
from reconciler.errors import StoreError
from reconciler.ports import Store

SignFile = Callable[[Path], bytes]
SignBytes = Callable[[bytes], bytes]


def publish(
    store: Store,
    release: Release,
    files: Mapping[str, Path],
    sign_file: SignFile,
    sign_bytes: SignBytes,
    on_artifact: Callable[[str], None] = lambda fmt: None,
    attestations: Mapping[str, bytes] | None = None,
) -> None:
    """Put ``release``, its artifact ``files`` (format -> path) and ``attestations``
    (store key -> envelope, those the release names) into ``store``. A release written
    before (adopted) keeps the attestations it names, which must be there."""
    for art in release.artifacts:
        if not store.exists(art.blob):
            store.put_file(art.blob, files[art.format])
        if not store.exists(art.blob + ".asc"):
            store.put_bytes(art.blob + ".asc", sign_file(files[art.format]))
        on_artifact(art.format)
    meta = release.to_json()
    key = release_path(release.host, release.version)
    existing = store.get_bytes(key)
    if existing is not None and existing != meta:
        raise StoreError(f"{key} already exists with other content; releases are immutable")
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
    store.put_bytes(latest_path(release.host) + ".asc", signature)
    store.put_bytes(latest_path(release.host), meta)
