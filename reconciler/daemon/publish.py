"""Publishing a release in the crash-safe order SPEC fixes.

1. each blob, then its signature (content-addressed, so rewriting is harmless);
2. ``releases/<N>.json.asc`` then ``releases/<N>.json`` (immutable once written);
3. the release's entry in the transparency log (reconciler.daemon.tlog: tiles, its
   inclusion proof, the signed checkpoint), when the daemon keeps one;
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
    log: Callable[[Release, bytes], None] | None = None,
) -> None:
    """Put ``release`` and its artifact ``files`` (format -> path) into ``store``;
    ``log`` appends the release file's bytes to the transparency log."""
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
    signature = sign_bytes(meta)
    if existing is None:
        store.put_bytes(key + ".asc", signature)
        store.put_bytes(key, meta)
    if log is not None:
        log(release, meta)
    store.put_bytes(latest_path(release.host) + ".asc", signature)
    store.put_bytes(latest_path(release.host), meta)
