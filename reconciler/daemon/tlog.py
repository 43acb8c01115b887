"""The publisher's side of the transparency log (reconciler.core.tlog): one entry per
published release, appended in the publish step before ``latest.json`` moves, and a
witness that co-signs the log's checkpoints.

An append writes, in this order:

1. the new tiles and entry bundles (``log/tile/...``): only paths no published
   checkpoint needs (a partial tile's width is in its path), so a reader of the
   current checkpoint never sees one change;
2. ``hosts/<h>/releases/<N>.inclusion.json``: the entry's index and its inclusion
   proof in the tree the append makes (unsigned: a reader checks it against the
   signed checkpoint by a consistency proof);
3. ``log/checkpoint``, the signed tree head, in one atomic write: the commit point;
4. ``state_dir/tlog/checkpoint``, the last head this daemon signed.

A crash before 3 leaves tiles and an inclusion file that no checkpoint covers: the
next append writes over them, and a release adopted after the crash gets a new
entry and inclusion file. After 3 the release is in the log: the next publish of it
(adoption) finds its inclusion file, checks its entry in the tiles and appends
nothing. A checkpoint is signed only just before it is written, so no signed head
ever exists that the log does not continue. The daemon never signs a head that is
not an extension of the last one it signed (c2sp.org/tlog-checkpoint: a log MUST NOT
sign inconsistent checkpoints): at its first append it compares the store's
checkpoint with its own copy, refuses a store whose log went back or forked, and
checks that the store's tiles hash to the store's root before extending them.

A store with releases but no log yet (a store older than the log) gets an entry for
every release in it, in one append, the first time the daemon appends.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from reconciler import log
from reconciler.core import openpgp, tlog
from reconciler.core.layout import CHECKPOINT, ReleaseKey, inclusion_path, log_path, parse_key, release_path
from reconciler.core.note import MAX_NOTE, Note, Signature, add_signature, openpgp_key_id, parse_note
from reconciler.core.release import RELEASE_LIMIT
from reconciler.core.tlog import Bundle, Checkpoint, Edge, Inclusion, LogFormatError, Node, Tile
from reconciler.errors import LogError, VerificationError
from reconciler.ports import NoteSigner, NoteVerifier, Store

# Checks a release file's detached signature (data, signature, what it is): raises
# VerificationError unless it is the publisher key's good signature.
VerifyRelease = Callable[[bytes, bytes, str], object]


def default_origin(fingerprint: str) -> str:
    """The log's origin when the config names none: the publisher key's, so that two
    publishers' logs never share one."""
    return f"reconciler/{fingerprint.upper()}"


def sign(checkpoint: Checkpoint, signer: NoteSigner, name: str) -> Signature:
    text = checkpoint.text()
    return Signature(name, openpgp_key_id(name, signer.fingerprint), signer.sign_note(text))


def read_state(path: Path) -> Note | None:
    """A checkpoint kept on local disk (the daemon's or a witness's), or None."""
    try:
        return parse_note(path.read_bytes(), str(path))
    except FileNotFoundError:
        return None
    except (OSError, LogFormatError) as exc:
        raise LogError(f"{path}: unreadable checkpoint ({exc})") from None


def write_state(path: Path, note: Note) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(note.to_bytes())
    os.replace(tmp, path)


class StoreLog:
    """What every reader of a log in a store needs: its checkpoint and tiles."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def read(self, path: str) -> bytes | None:
        """A path under the log's prefix (a tile or bundle), no larger than the format
        lets it be (StoreError else)."""
        limit = tlog.BUNDLE_LIMIT if isinstance(tlog.parse_tile_path(path), Bundle) else tlog.TILE_LIMIT
        return self.store.get_bytes("log/" + path, limit)

    def checkpoint(self) -> tuple[Note, Checkpoint] | None:
        data = self.store.get_bytes(CHECKPOINT, MAX_NOTE)
        if data is None:
            return None
        try:
            note = parse_note(data, CHECKPOINT)
            return note, tlog.parse_checkpoint(note.text)
        except LogFormatError as exc:
            raise LogError(str(exc)) from None


def consistent(reader: StoreLog, old: Checkpoint, new: Checkpoint) -> bool:
    """Whether ``old`` is a prefix of ``new`` by the store's tiles (LogError when the
    tiles do not hash to ``new``'s root)."""
    try:
        return old.origin == new.origin and tlog.consistent(
            reader.read, (old.size, old.root), (new.size, new.root)
        )
    except LogFormatError as exc:
        raise LogError(f"the store's log tiles: {exc}") from None


class TransparencyLog:
    """Appends releases to the store's log (see the module's docstring). One per
    process; appends of concurrent publishes are serialised. ``signer`` opens the
    publisher's note key on first use, ``verifier`` its public key (to check a head
    in the store this daemon has no copy of); ``origin`` None: :func:`default_origin`;
    ``verify_release`` checks that a release file's signature is this key's (without
    it, :meth:`append_unpublished` logs nothing)."""

    def __init__(
        self,
        store: Store,
        signer: Callable[[], NoteSigner],
        verifier: Callable[[], NoteVerifier],
        state_dir: Path,
        origin: str | None = None,
        verify_release: VerifyRelease | None = None,
    ) -> None:
        self.store = store
        self._verify_release = verify_release
        self._reader = StoreLog(store)
        self._open_signer = signer
        self._open_verifier = verifier
        self._signer: NoteSigner | None = None
        self._state = state_dir / "checkpoint"
        self._origin = origin
        self._lock = threading.Lock()
        self._edge: Edge | None = None
        self._checkpoint: Checkpoint | None = None
        self._backfill = False

    @property
    def signer(self) -> NoteSigner:
        if self._signer is None:
            self._signer = self._open_signer()
        return self._signer

    @property
    def origin(self) -> str:
        return self._origin or default_origin(self.signer.fingerprint)

    @property
    def size(self) -> int | None:
        """The size of the tree this process last signed or read; None before."""
        return self._checkpoint.size if self._checkpoint else None

    def append_release(self, host: str, version: int, data: bytes) -> None:
        """Log release ``version`` of ``host`` (its file's bytes ``data``), unless it
        is in the log already; raises LogError, StoreError or SigningError."""
        entry = tlog.release_entry(host, version, hashlib.sha256(data).hexdigest())
        with self._lock:
            if not self._logged(host, version, entry):
                self._append([(host, version, entry)])

    def append_unpublished(self, host: str, version: int) -> None:
        """Log release ``version`` of ``host`` that is in the store but may not be in
        the log: a pass died between writing its file and logging it, and the host
        changed before the release could be published. The log must still name every
        release this key signed, so it is logged if its signature (``.asc``) is this
        key's good signature of it; else it is left out, and said (``tlog_unsigned``)."""
        key = release_path(host, version)
        data = self.store.get_bytes(key, RELEASE_LIMIT)
        if data is None:
            return
        entry = tlog.release_entry(host, version, hashlib.sha256(data).hexdigest())
        with self._lock:
            if self._logged(host, version, entry):
                return
            signature = self.store.get_bytes(key + ".asc", openpgp.ARMORED_LIMIT)
            try:
                if self._verify_release is None:
                    raise VerificationError("there is no key to check its signature with")
                if signature is None:
                    raise VerificationError(f"{key}.asc is missing")
                self._verify_release(data, signature, key)
            except VerificationError as exc:
                log.event("tlog_unsigned", logging.WARNING, host=host, version=version, error=str(exc))
                return
            log.event("tlog_unpublished", host=host, version=version)
            self._append([(host, version, entry)])

    def _logged(self, host: str, version: int, entry: bytes) -> bool:
        """Whether ``entry`` is in the store's log, which a first append of a store
        that had none fills with the releases already there."""
        edge = self._current()
        if self._backfill:
            log.event("tlog_new", origin=self.origin)
            self._append_existing(edge)
            self._backfill = False
        return self._included(host, version, entry)

    def describe(self) -> str:
        """What `reconciler check` finds, reading only: that the store's log is one this
        daemon can extend (its origin, signed by this key, extending the head this state
        directory signed last, tiles that hash to its root), or that there is none yet.
        LogError (or SigningError, StoreError) says why it could not extend it."""
        with self._lock:
            self._edge = None
            self._load()
            cp = self._checkpoint
        if cp is None:
            return "no log in the store yet: the first release published starts it"
        return f"{cp.origin} at size {cp.size}: signed by this key, its tiles hash to its head"

    # -- reading the store's log ---------------------------------------------------

    def _current(self) -> Edge:
        """The edge of the store's log as it is now: read again when another process
        (a `reconciler reconcile` beside the daemon, under the same pass lock) moved
        it since, so that this one never extends a head that is no longer the last."""
        if self._edge is not None:
            found = self._reader.checkpoint()
            if (found[1] if found is not None else None) != self._checkpoint:
                self._edge = None
        return self._load()

    def _load(self) -> Edge:
        if self._edge is not None:
            return self._edge
        local = read_state(self._state)
        ours = tlog.parse_checkpoint(local.text) if local is not None else None
        found = self._reader.checkpoint()
        if found is None:
            if ours is not None:
                raise LogError(
                    f"the store has no {CHECKPOINT}, but this daemon signed one of size {ours.size} "
                    f"({self._state}): restore the store's log/, or remove that file to start a new log"
                )
            self._edge, self._checkpoint, self._backfill = Edge(0), None, True
            return self._edge
        note, cp = found
        if cp.origin != self.origin:
            raise LogError(f"the store's log is {cp.origin!r}, the config's origin is {self.origin!r}")
        if ours is None or cp != ours:
            self._check_signed(note, cp)
        if (
            ours is not None
            and cp != ours
            and (cp.size <= ours.size or not consistent(self._reader, ours, cp))
        ):
            raise LogError(
                f"the store's {CHECKPOINT} (size {cp.size}) does not extend the one this daemon "
                f"signed last (size {ours.size}, {self._state}): the store's log went back or forked"
            )
        try:
            tiles = {t: self._tile(t) for t in tlog.edge_tiles(cp.size)}
            bundle = tlog.edge_bundle(cp.size)
            edge = tlog.edge_from(cp.size, tiles, self._reader.read(bundle.path) if bundle else None)
        except LogFormatError as exc:
            raise LogError(f"the store's log tiles: {exc}") from None
        if edge.root() != cp.root:
            raise LogError(f"the store's log tiles do not hash to the root of its {CHECKPOINT}")
        self._edge, self._checkpoint = edge, cp
        return edge

    def _tile(self, tile: Tile) -> bytes:
        data = self._reader.read(tile.path)
        if data is None:
            raise LogError(f"{log_path(tile)} is missing")
        return data

    def _check_signed(self, note: Note, cp: Checkpoint) -> None:
        """A head this daemon has no copy of must bear its good signature before the
        daemon extends it: else whoever can write the store could have it sign a
        history of their making."""
        try:
            good = self._open_verifier().verified(note)
        except VerificationError as exc:
            raise LogError(str(exc)) from None
        if self.signer.fingerprint not in good:
            raise LogError(
                f"{CHECKPOINT} (size {cp.size}) is not signed by this daemon's key {self.signer.fingerprint}"
            )

    def _included(self, host: str, version: int, entry: bytes) -> bool:
        """Whether release ``version`` of ``host`` is in the log already: its inclusion
        file names an index the log's tiles hold its entry at."""
        cp = self._checkpoint
        data = self.store.get_bytes(inclusion_path(host, version), tlog.INCLUSION_LIMIT)
        if cp is None or data is None:
            return False
        try:
            inc = tlog.parse_inclusion(data, inclusion_path(host, version))
            if inc.origin != cp.origin or inc.index >= cp.size:
                return False
            (leaf,) = tlog.read_tiles(self._reader.read, cp.size, cp.root, [Node(0, inc.index)]).values()
        except LogFormatError:
            return False
        if leaf != tlog.leaf_hash(entry):
            return False
        root = inc.root(entry)
        proved = Checkpoint(cp.origin, inc.size, root) if root is not None and inc.size <= cp.size else None
        if proved is None or not consistent(self._reader, proved, cp):
            # Its entry is in the log but its proof is not (a store that lost it): a new one.
            self._write_inclusion(host, version, inc.index, cp)
        return True

    def _write_inclusion(self, host: str, version: int, index: int, cp: Checkpoint) -> None:
        ranges = tlog.inclusion_ranges(index, cp.size)
        try:
            hashes = tlog.read_tiles(self._reader.read, cp.size, cp.root, tlog.nodes_of(ranges))
        except LogFormatError as exc:
            raise LogError(f"the store's log tiles: {exc}") from None
        inc = Inclusion(cp.origin, index, cp.size, tuple(tlog.proof_hashes(ranges, hashes)))
        self.store.put_bytes(inclusion_path(host, version), inc.to_json())

    # -- appending -------------------------------------------------------------------

    def _append_existing(self, edge: Edge) -> None:
        """Log every release already in a store that had no log."""
        found = []
        for key in self.store.list("hosts/"):
            k = parse_key(key)
            if isinstance(k, ReleaseKey) and not k.signature and k.attestation is None:
                data = self.store.get_bytes(key, RELEASE_LIMIT)
                if data is not None:
                    sha = hashlib.sha256(data).hexdigest()
                    found.append((k.host, k.version, tlog.release_entry(k.host, k.version, sha)))
        found.sort(key=lambda f: (f[0], f[1]))
        if found:
            log.event("tlog_backfill", releases=len(found))
            self._append(found)

    def _append(self, items: list[tuple[str, int, bytes]]) -> None:
        old = self._edge
        assert old is not None
        edge, writes = tlog.append(old, [e for _, _, e in items])
        tiles = {**old.tiles(), **{t: d for t, d in writes.items() if isinstance(t, Tile)}}
        root = edge.root()
        for item, data in sorted(writes.items(), key=lambda w: w[0].path):
            self.store.put_bytes(log_path(item), data)
        for j, (host, version, entry) in enumerate(items):
            index = old.size + j
            ranges = tlog.inclusion_ranges(index, edge.size)
            hashes = tlog.node_hashes(tlog.nodes_of(ranges), edge.size, tiles)
            proof = tuple(tlog.proof_hashes(ranges, hashes))
            if not tlog.verify_inclusion(index, edge.size, tlog.leaf_hash(entry), proof, root):
                raise LogError(f"the inclusion proof of {host} version {version} does not verify")
            inc = Inclusion(self.origin, index, edge.size, proof)
            self.store.put_bytes(inclusion_path(host, version), inc.to_json())
        cp = Checkpoint(self.origin, edge.size, root)
        note = Note(cp.text(), (sign(cp, self.signer, cp.origin),))
        self.store.put_bytes(CHECKPOINT, note.to_bytes())
        write_state(self._state, note)
        self._edge, self._checkpoint = edge, cp
        for host, version, _ in items:
            log.event("tlog_appended", host=host, version=version, size=edge.size)


def cosign(
    store: Store,
    publisher: NoteVerifier,
    witness: NoteSigner,
    name: str,
    state: Path,
) -> tuple[Checkpoint, bool]:
    """Co-sign the store's checkpoint as a witness: only once the publisher's signature
    and the store's tiles check out and the head extends the last one this witness
    co-signed (kept in ``state``). Returns the head and whether it was new to it."""
    reader = StoreLog(store)
    found = reader.checkpoint()
    if found is None:
        raise LogError(f"the store has no {CHECKPOINT} to co-sign")
    note, cp = found
    try:
        if not publisher.verified(note):
            raise LogError(f"{CHECKPOINT} is not signed by the publisher's key")
    except VerificationError as exc:
        raise LogError(str(exc)) from None
    last_note = read_state(state)
    last = tlog.parse_checkpoint(last_note.text) if last_note is not None else None
    try:
        tlog.read_tiles(reader.read, cp.size, cp.root, [])
    except LogFormatError as exc:
        raise LogError(f"the store's log tiles: {exc}") from None
    if last is not None:
        if last.origin != cp.origin:
            raise LogError(f"{state} follows log {last.origin!r}, the store's is {cp.origin!r}")
        if last.size > cp.size:
            raise LogError(
                f"the store's head (size {cp.size}) is older than one co-signed before ({last.size})"
            )
        if not consistent(reader, last, cp):
            log.event("tlog_split_view", logging.ERROR, origin=cp.origin, seen=last.size, served=cp.size)
            raise LogError(
                f"split view: the store's head of size {cp.size} does not extend the one co-signed "
                f"before (size {last.size}); not co-signing"
            )
    cosigned = add_signature(note, sign(cp, witness, name))
    store.put_bytes(CHECKPOINT, cosigned.to_bytes())
    write_state(state, cosigned)
    log.event("tlog_cosigned", origin=cp.origin, size=cp.size, witness=name)
    return cp, last != cp
