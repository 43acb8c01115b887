"""Garbage collection of a store: lists it, reads the release files core.gc's plan
depends on, and deletes what the plan says, releases first, then blobs, so a crash
half-way leaves only objects nothing points at.

It must not run concurrently with publishing to the same store: a blob uploaded by a
publish whose release file is not written yet looks unreferenced (the pass lock).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from reconciler import log
from reconciler.core.gc import DEFAULT_KEEP, needed_releases, plan_gc
from reconciler.core.release import RELEASE_LIMIT, Release, parse_release
from reconciler.errors import ObjectTooLargeError, VerificationError
from reconciler.ports import Store


def collect(
    store: Store,
    keep: int = DEFAULT_KEEP,
    dry_run: bool = False,
    on_delete: Callable[[str], None] = lambda key: None,
) -> list[str]:
    """Delete what :func:`plan_gc` plans for ``store``; returns the keys (deleted, or
    that would be with ``dry_run``). ``on_delete`` is called after each deletion."""
    # The whole store: the ACI copies appc discovery reads sit under the image name
    # prefixes, which may have changed since they were written.
    listing = store.list()
    releases: dict[str, Release | None] = {}
    # First the latest.json files, then the releases they and `keep` retain.
    for _ in range(2):
        for key in needed_releases(listing, releases, keep):
            if key not in releases:
                releases[key] = _read(store, key)
    plan = plan_gc(listing, releases, keep)
    for key in plan:
        if not dry_run:
            store.delete(key)
            log.event("gc_deleted", key=key)
        on_delete(key)
    return plan


def _read(store: Store, key: str) -> Release | None:
    """The release at ``key``; None, logged, for one missing or not a release (larger
    than any is, too): a host with such a release loses no blob (core.gc)."""
    try:
        data = store.get_bytes(key, RELEASE_LIMIT)
    except ObjectTooLargeError as exc:
        log.event("gc_release_unreadable", logging.WARNING, key=key, error=str(exc))
        return None
    if data is None:
        log.event("gc_release_missing", logging.WARNING, key=key)
        return None
    try:
        return parse_release(data, key)
    except VerificationError as exc:
        log.event("gc_release_unreadable", logging.WARNING, key=key, error=str(exc))
        return None
