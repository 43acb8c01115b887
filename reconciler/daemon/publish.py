"""Publishing a release in the crash-safe order SPEC fixes.

1. each blob, then its signature (content-addressed, so rewriting is harmless), then
   for an ACI the copies appc discovery reads, ``<prefix>/<name>`` and its ``.asc``
   (hard links or copies inside the store; release N's bytes until N is published);
2. ``releases/<N>.json.asc`` then ``releases/<N>.json`` (immutable once written);
3. ``latest.json.asc`` then ``latest.json`` last.

A crash between any two steps leaves only objects nothing points at yet, and the
next reconcile repeats the steps, skipping what is already there. The one window a
reader can hit is between the two ``latest`` writes: it then sees a signature that
does not match and must retry; it can never accept an unsigned pointer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

from reconciler.core.layout import discovery_path, latest_path, release_path
from reconciler.core.release import Release
from reconciler.errors import StoreError
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
) -> None:
    """Put ``release`` and its artifact ``files`` (format -> path) into ``store``; with
    ``name_prefix``, also where appc discovery finds its ACI under that prefix."""
    for art in release.artifacts:
        if not store.exists(art.blob):
            store.put_file(art.blob, files[art.format])
        if not store.exists(art.blob + ".asc"):
            store.put_bytes(art.blob + ".asc", sign_file(files[art.format]))
        if name_prefix is not None and art.format in DISCOVERABLE:
            # Always (re)made: a pass that died before the release file may have left
            # another build's bytes under this version's name.
            copy = discovery_path(name_prefix, art.name)
            store.copy(art.blob, copy)
            store.copy(art.blob + ".asc", copy + ".asc")
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
    store.put_bytes(latest_path(release.host) + ".asc", signature)
    store.put_bytes(latest_path(release.host), meta)
