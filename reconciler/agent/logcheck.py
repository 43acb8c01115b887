"""Reading the store's transparency log: the agent's check of a release before it
installs it (:class:`LogClient`), and `reconciler log verify` (:func:`audit`).

The agent, for the release its TUF entry names (its file's sha256 is in the entry):

1. reads ``log/checkpoint`` and checks its signatures: one by a key pinned in
   ``keys:``, and one by each key in ``log_witnesses:``;
2. reads ``hosts/<h>/releases/<N>.inclusion.json``: the entry's index and its proof
   in the tree of the append (size p), from which the root of that tree follows;
3. takes the larger of the store's checkpoint and the one it saw last (kept in
   ``state_dir/log-checkpoint``) as the head to prove against, fetches the tiles the
   proofs need (authenticated against that head's root first) and checks that the
   other head and the tree of size p are prefixes of it (consistency proofs);
4. keeps the larger head as the last one seen.

A head of the size of the one seen before with another root, or one that the other
does not extend, is a split view (``split-view``): the store (or the publisher) shows
this host a history other than the one it showed before, and the release is refused.
A release without a checkable entry (no checkpoint, no inclusion proof, a proof or
tiles that do not hash to the signed root, a missing witness) is ``not-in-log``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from reconciler import log
from reconciler.core import tlog
from reconciler.core.layout import (
    CHECKPOINT,
    LOG_PREFIX,
    InclusionKey,
    LogKey,
    ReleaseKey,
    inclusion_path,
    parse_key,
    release_path,
)
from reconciler.core.note import MAX_NOTE, Note, parse_note
from reconciler.core.tlog import (
    TILE_WIDTH,
    Bundle,
    Checkpoint,
    Edge,
    LogFormatError,
    Tile,
)
from reconciler.core.trust import Reason, RefusalError
from reconciler.errors import VerificationError
from reconciler.ports import NoteVerifier

INCLUSION_LIMIT = tlog.INCLUSION_LIMIT
TILE_LIMIT = tlog.TILE_LIMIT
BUNDLE_LIMIT = tlog.BUNDLE_LIMIT

Read = Callable[[str, int], bytes | None]  # a store key, at most so many bytes -> bytes, None if missing


def read_checkpoint(data: bytes, what: str) -> tuple[Note, Checkpoint]:
    note = parse_note(data, what)
    return note, tlog.parse_checkpoint(note.text)


def check_signatures(
    note: Note, cp: Checkpoint, publisher: NoteVerifier, witnesses: NoteVerifier | None, need: frozenset[str]
) -> list[str]:
    """Why the signatures of ``note`` are not enough: none by a publisher key, or none
    by a witness key in ``need``; empty when they are."""
    return _signatures(note, cp, publisher, witnesses, need)[0]


def _signatures(
    note: Note, cp: Checkpoint, publisher: NoteVerifier, witnesses: NoteVerifier | None, need: frozenset[str]
) -> tuple[list[str], bool]:
    """check_signatures' problems, and whether the publisher signed ``note``."""
    problems: list[str] = []
    signed = False
    try:
        signed = bool(publisher.verified(note))
        if not signed:
            problems.append(f"the checkpoint of {cp.origin} (size {cp.size}) is not signed by a pinned key")
        if witnesses is not None:
            missing = need - witnesses.verified(note)
            if missing:
                problems.append(
                    f"the checkpoint of {cp.origin} (size {cp.size}) is not co-signed by witness "
                    + ", ".join(sorted(missing))
                )
    except VerificationError as exc:
        problems.append(str(exc))
        signed = False
    return problems, signed


class LogClient:
    """The agent's check that a release is in the store's log, consistently with what
    this host saw before (see the module's docstring)."""

    def __init__(
        self,
        read: Read,
        publisher: NoteVerifier,
        witnesses: NoteVerifier | None,
        witness_fingerprints: frozenset[str],
        state_file: Path,
        origin: str | None = None,
    ) -> None:
        self._read = read
        self._publisher = publisher
        self._witnesses = witnesses
        self._need = witness_fingerprints
        self.state_file = state_file
        self._origin = origin

    def seen(self) -> Checkpoint | None:
        """The last head this host verified, or None."""
        try:
            return read_checkpoint(self.state_file.read_bytes(), str(self.state_file))[1]
        except FileNotFoundError:
            return None
        except (OSError, LogFormatError):
            # A state file this agent cannot read is no evidence either way: start over.
            log.event("agent_log_state_unreadable", logging.WARNING, file=str(self.state_file))
            return None

    def check(self, host: str, version: int, sha256: str) -> Checkpoint:
        """Refuse (RefusalError) release ``version`` of ``host`` whose file has
        ``sha256`` unless it is in the log the store shows, and that log extends the
        one this host saw before; returns the head it was proved against."""
        data = self._read(CHECKPOINT, MAX_NOTE)
        if data is None:
            raise RefusalError(Reason.NOT_IN_LOG, f"the store has no transparency log ({CHECKPOINT})")
        try:
            note, served = read_checkpoint(data, CHECKPOINT)
        except LogFormatError as exc:
            raise RefusalError(Reason.NOT_IN_LOG, str(exc)) from None
        seen = self.seen()
        origin = self._origin or (seen.origin if seen else served.origin)
        if served.origin != origin:
            raise RefusalError(
                Reason.NOT_IN_LOG, f"the store's log is {served.origin!r}, this host follows {origin!r}"
            )
        problems = check_signatures(note, served, self._publisher, self._witnesses, self._need)
        if problems:
            raise RefusalError(Reason.NOT_IN_LOG, "; ".join(problems))
        key = inclusion_path(host, version)
        got = self._read(key, INCLUSION_LIMIT)
        if got is None:
            raise RefusalError(
                Reason.NOT_IN_LOG, f"{release_path(host, version)} has no inclusion proof ({key})"
            )
        entry = tlog.release_entry(host, version, sha256)
        try:
            inc = tlog.parse_inclusion(got, key)
        except LogFormatError as exc:
            raise RefusalError(Reason.NOT_IN_LOG, str(exc)) from None
        root = inc.root(entry)
        if inc.origin != served.origin or root is None:
            raise RefusalError(Reason.NOT_IN_LOG, f"{key} does not prove the entry of this release")
        head = served if seen is None or served.size >= seen.size else seen
        tiles = self._tiles()
        try:
            if seen is not None:
                older, newer = (seen, served) if head is served else (served, seen)
                if not tlog.consistent(tiles, _tree(older), _tree(newer)):
                    log.event(
                        "agent_split_view",
                        logging.ERROR,
                        host=host,
                        origin=served.origin,
                        seen=f"{seen.size}:{seen.root.hex()}",
                        served=f"{served.size}:{served.root.hex()}",
                    )
                    raise RefusalError(
                        Reason.SPLIT_VIEW,
                        f"split view: the log's head of size {served.size} "
                        f"({served.root.hex()[:16]}) and the one this host saw before, of size "
                        f"{seen.size} ({seen.root.hex()[:16]}), are not one history",
                    )
            if inc.size > head.size or not tlog.consistent(tiles, (inc.size, root), _tree(head)):
                raise RefusalError(
                    Reason.NOT_IN_LOG,
                    f"{key}: the entry at {inc.index} is not in the log's head of size {head.size}",
                )
        except LogFormatError as exc:
            raise RefusalError(
                Reason.NOT_IN_LOG, f"the store's log does not match its checkpoint: {exc}"
            ) from None
        if head is served and served != seen:
            _write(self.state_file, note.to_bytes())
        return head

    def _tiles(self) -> Callable[[str], bytes | None]:
        """Tiles of the log read once each within a check."""
        cache: dict[str, bytes | None] = {}

        def read(path: str) -> bytes | None:
            if path not in cache:
                cache[path] = self._read(LOG_PREFIX + path, TILE_LIMIT)
            return cache[path]

        return read


def _tree(cp: Checkpoint) -> tuple[int, bytes]:
    return cp.size, cp.root


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- `reconciler log verify` ------------------------------------------------------


@dataclass
class Audit:
    """What `reconciler log verify` found: ``problems`` empty means the log checks out."""

    checkpoint: Checkpoint | None = None
    entries: int = 0
    releases: int = 0  # release files in the store checked against the log
    collected: int = 0  # entries whose release file is gone (garbage collection)
    tiles: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def audit(
    read: Read,
    listing: list[str] | None,
    publisher: NoteVerifier,
    witnesses: NoteVerifier | None = None,
    witness_fingerprints: frozenset[str] = frozenset(),
    seen: Iterable[tuple[str, bytes]] = (),
) -> Audit:
    """Recompute the whole log from its entries and compare: every tile, the root,
    each release file against its entry, each inclusion proof, and each head seen
    elsewhere (``seen``: where, the note) for consistency. ``listing`` (every key of
    the store, when it can be listed) adds: every release file is in the log."""
    out = Audit()
    data = read(CHECKPOINT, MAX_NOTE)
    if data is None:
        out.problems.append(f"the store has no {CHECKPOINT}")
        return out
    try:
        note, cp = read_checkpoint(data, CHECKPOINT)
    except LogFormatError as exc:
        out.problems.append(str(exc))
        return out
    out.checkpoint = cp
    problems, signed = _signatures(note, cp, publisher, witnesses, witness_fingerprints)
    out.problems += problems
    if not signed:
        # Its size and root are nobody's word: a checkpoint anyone wrote could name a
        # tree of 2**48 entries and have this read bundles from a mirror without end.
        return out

    # Every entry, from the bundles; the whole tree from them.
    entries: list[bytes] = []
    for b in range((cp.size + TILE_WIDTH - 1) // TILE_WIDTH):
        bundle = Bundle(b, min(TILE_WIDTH, cp.size - b * TILE_WIDTH))
        raw = read(LOG_PREFIX + bundle.path, BUNDLE_LIMIT)
        if raw is None and bundle.width < TILE_WIDTH:
            raw = read(LOG_PREFIX + Bundle(b, TILE_WIDTH).path, BUNDLE_LIMIT)
        if raw is None:
            out.problems.append(
                f"{LOG_PREFIX}{bundle.path} is missing: entries {b * TILE_WIDTH} on are unknown"
            )
            return out
        try:
            entries += tlog.decode_bundle(bundle, raw)
        except LogFormatError as exc:
            out.problems.append(str(exc))
            return out
    out.entries = len(entries)
    edge, rebuilt = tlog.append(Edge(0), entries)
    if edge.root() != cp.root:
        out.problems.append(
            f"the log's {len(entries)} entries do not hash to the root of its checkpoint: "
            "an entry was rewritten"
        )
    levels = _levels(entries)
    tile_keys = (
        [k for k in listing if isinstance(parse_key(k), LogKey) and k != CHECKPOINT]
        if listing is not None
        else [LOG_PREFIX + item.path for item in rebuilt]
    )
    for key in tile_keys:
        item = parse_key(key)
        assert isinstance(item, LogKey) and item.item is not None
        what = item.item
        stored = read(key, BUNDLE_LIMIT if isinstance(what, Bundle) else TILE_LIMIT)
        if isinstance(what, Tile):
            hashes = levels[what.level] if what.level < len(levels) else []
            first = what.index * TILE_WIDTH
            expected = b"".join(hashes[first : first + what.width])
            if first + what.width > len(hashes):
                out.notes.append(f"{key} lies beyond the checkpoint (left by an append that did not finish)")
                continue
        else:
            first = what.index * TILE_WIDTH
            if first + what.width > len(entries):
                out.notes.append(f"{key} lies beyond the checkpoint (left by an append that did not finish)")
                continue
            expected = tlog.encode_bundle(entries[first : first + what.width])
        out.tiles += 1
        if stored is None:
            out.problems.append(f"{key} is missing")
        elif stored != expected:
            out.problems.append(f"{key} does not match the log's entries: a hash in it was rewritten")

    # The entries as releases.
    logged: dict[tuple[str, int], set[str]] = {}
    for i, raw in enumerate(entries):
        try:
            e = tlog.parse_entry(raw)
        except LogFormatError as exc:
            out.problems.append(f"entry {i}: {exc}")
            continue
        logged.setdefault((e.host, e.version), set()).add(e.sha256)
    for (host, version), shas in sorted(logged.items()):
        if len(shas) > 1:
            out.problems.append(f"{host} version {version} is logged as {len(shas)} different releases")
    tree = {item.path: d for item, d in rebuilt.items() if isinstance(item, Tile)}
    if listing is not None:
        keys = [(k, parse_key(k)) for k in listing]
        releases = [
            (k, p) for k, p in keys if isinstance(p, ReleaseKey) and not p.signature and p.attestation is None
        ]
        inclusions = [p for _, p in keys if isinstance(p, InclusionKey)]
    else:
        releases = [(release_path(h, v), ReleaseKey(h, v, False)) for h, v in sorted(logged)]
        inclusions = [InclusionKey(h, v) for h, v in sorted(logged)]
    for key, r in releases:
        data = read(key, 1 << 20)
        if data is None:
            out.collected += 1
            continue
        out.releases += 1
        sha = _sha256(data)
        if sha not in logged.get((r.host, r.version), set()):
            out.problems.append(f"{key} (sha256 {sha[:16]}...) is not in the log")
    for inc_key in inclusions:
        _check_inclusion(read, inc_key, entries, cp, tree, out)

    # Heads seen elsewhere must be prefixes of this one (or this one of them).
    for where, seen_note in seen:
        try:
            _, other = read_checkpoint(seen_note, where)
        except LogFormatError as exc:
            out.problems.append(str(exc))
            continue
        if other.origin != cp.origin:
            out.notes.append(f"{where}: a head of another log ({other.origin})")
        elif other.size > cp.size:
            out.problems.append(
                f"{where}: a head of size {other.size} was seen; the store's is older ({cp.size})"
            )
        elif tlog.merkle_root(levels[0][: other.size]) != other.root:
            out.problems.append(
                f"split view: {where} holds a head of size {other.size} that the store's log does not extend"
            )
    return out


def _check_inclusion(
    read: Read, key: InclusionKey, entries: list[bytes], cp: Checkpoint, tree: dict[str, bytes], out: Audit
) -> None:
    path = inclusion_path(key.host, key.version)
    data = read(path, INCLUSION_LIMIT)
    if data is None:
        return
    try:
        inc = tlog.parse_inclusion(data, path)
    except LogFormatError as exc:
        out.problems.append(str(exc))
        return
    if inc.index >= len(entries):
        out.notes.append(f"{path} names entry {inc.index}, beyond the checkpoint")
        return
    try:
        e = tlog.parse_entry(entries[inc.index])
    except LogFormatError:
        return  # reported with the entries
    root = inc.root(entries[inc.index])
    if (e.host, e.version) != (key.host, key.version):
        out.problems.append(f"{path} names entry {inc.index}, which is {e.host} version {e.version}")
    elif (
        root is None
        or inc.size > cp.size
        or not tlog.consistent(tree.get, (inc.size, root), (cp.size, cp.root))
    ):
        out.problems.append(f"{path}: its proof does not prove entry {inc.index} in the log")


def _levels(entries: list[bytes]) -> list[list[bytes]]:
    """Every tile level's hashes of the tree of ``entries``."""
    levels = [[tlog.leaf_hash(e) for e in entries]]
    while len(levels[-1]) >= TILE_WIDTH:
        below = levels[-1]
        levels.append(
            [
                tlog.merkle_root(below[i : i + TILE_WIDTH])
                for i in range(0, len(below) // TILE_WIDTH * TILE_WIDTH, TILE_WIDTH)
            ]
        )
    return levels


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
