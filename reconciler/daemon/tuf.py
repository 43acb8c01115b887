"""The publisher's side of the store's TUF repository (reconciler.core.tufrepo).

The daemon holds its copy of the metadata in ``<state_dir>/tuf/metadata.json`` (one
file, replaced whole once the store has everything): that copy is what it signs again,
never what the store serves (a store is not trusted to keep the daemon's word).
Without that copy (a new state directory), or when the store's timestamp is newer than
it (a process killed between the two), it reads the store's metadata and takes it
only if every file verifies: root by root from version 1, then timestamp, snapshot,
targets and every bin, each against the keys its delegator names. With no timestamp
in the store (none, or a creation killed before its end) it starts a repository with
its own key in every role.

After each pass :meth:`TufRepository.sync` makes the bins list each host's newest
release (the ledger's versions), and re-signs whatever has less than half of its
lifetime left, so that the timestamp stays fresh while nothing changes. The order of
writes keeps readers consistent: changed bins and the snapshot under new version
numbers first, ``timestamp.json`` last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from securesystemslib.signer import Signer as MetadataSigner
from tuf.api.exceptions import RepositoryError, UnsignedMetadataError
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from reconciler import log
from reconciler.config import TufConfig
from reconciler.core import tufrepo
from reconciler.core.layout import release_path, tuf_path
from reconciler.core.release import RELEASE_LIMIT
from reconciler.core.tufrepo import SERIALIZER, KeySet, RoleName
from reconciler.core.tufroles import ROOT_LIMIT, SNAPSHOT_LIMIT, TARGETS_LIMIT, TIMESTAMP_LIMIT
from reconciler.errors import ObjectTooLargeError, SigningError, StoreError, TufError
from reconciler.ports import Clock, Store

# A change of keys or thresholds applied to (root, targets): core.tufrepo's add_key,
# revoke_key or set_threshold with their other arguments bound.
KeyChange = Callable[[Root, Targets], None]

# The daemon's copy of the metadata, in its TUF directory.
LOCAL_FILE = "metadata.json"
# A published release whose file the store lacks is looked for again after this long.
MISSING_RETRY = 600.0


def sign(md: Metadata[Any], signer: MetadataSigner, append: bool = False) -> None:
    """Sign ``md``; gpg failing (a wrong passphrase, a missing key, its deadline) is a
    SigningError, as for the release files."""
    try:
        md.sign(signer, append=append)
    except UnsignedMetadataError as exc:
        cause = exc.__cause__ or exc
        raise SigningError(f"cannot sign TUF {md.signed.type} metadata: {cause}") from None


def parse(data: bytes, role: str, where: str) -> Metadata[Any]:
    """``data`` as metadata of the type ``role`` is (a bin's is targets), or TufError:
    python-tuf checks a signature over whatever type it is given."""
    try:
        md: Metadata[Any] = Metadata.from_bytes(data)
    except (RepositoryError, ValueError) as exc:  # DeserializationError is a RepositoryError
        raise TufError(f"{where}: malformed TUF metadata ({exc})") from None
    return typed(md, role, where)


def size_limit(role: str) -> int:
    """The most bytes of ``role``'s metadata read from the store (core.tufroles): a
    bin's is targets metadata."""
    limits = {Root.type: ROOT_LIMIT, Timestamp.type: TIMESTAMP_LIMIT, Snapshot.type: SNAPSHOT_LIMIT}
    return limits.get(role, TARGETS_LIMIT)


def typed(md: Metadata[Any], role: str, where: str) -> Metadata[Any]:
    expected = Targets.type if role.startswith(f"{tufrepo.BINS_PREFIX}-") else role
    if md.signed.type != expected:
        raise TufError(f"{where}: {md.signed.type} metadata where {expected} belongs")
    return md


@dataclass
class Metadatas:
    """One consistent set of the repository's metadata."""

    root: Metadata[Root]
    targets: Metadata[Targets]
    bins: dict[str, Metadata[Targets]]
    snapshot: Metadata[Snapshot]
    timestamp: Metadata[Timestamp]
    # bin -> the version it had before its current one: deleted from the store when it
    # next changes (an agent that read the previous snapshot still finds its bins). A
    # bin's versions are not consecutive (tufrepo.bin_version).
    superseded: dict[str, int] = field(default_factory=dict)


def copy(md: Metadata[Any]) -> Metadata[Any]:
    return Metadata.from_bytes(md.to_bytes(SERIALIZER))


class TufRepository:
    def __init__(
        self,
        store: Store,
        local: Path,
        online: Callable[[], MetadataSigner],
        clock: Clock,
        settings: TufConfig,
    ) -> None:
        """``online`` opens the signer of timestamp, snapshot and bins (the daemon's
        key), on first use."""
        self.store = store
        self.local = local
        self._open_online = online
        self._online: MetadataSigner | None = None
        self.clock = clock
        self.settings = settings
        self.md: Metadatas | None = None
        self._stamp = b""  # the sha256 of the local copy as this process last read or wrote it
        # host -> (a published version not in the store, when to look for it again)
        self._missing: dict[str, tuple[int, float]] = {}

    @property
    def online(self) -> MetadataSigner:
        if self._online is None:
            self._online = self._open_online()
        return self._online

    # -- loading ---------------------------------------------------------------

    @property
    def _local_file(self) -> Path:
        return self.local / LOCAL_FILE

    def _local_stamp(self) -> bytes:
        # By content: a coarse file clock gives two writes in one tick the same mtime.
        try:
            return hashlib.sha256(self._local_file.read_bytes()).digest()
        except OSError:
            return b""

    def forget(self) -> None:
        """Read the metadata again before its next use: another publisher may have
        written the store since (a takeover of the publisher lease)."""
        self.md = None

    def exists(self) -> bool:
        return self.md is not None or self._local_file.exists() or self._in_store()

    def _in_store(self) -> bool:
        """Whether the store holds a repository: its timestamp is written last, so a
        creation killed before it left nothing an agent could have used."""
        return self.store.exists(tuf_path("timestamp", None))

    def load(self) -> Metadatas:
        """The current metadata; read again when another process (a key change, under
        the same pass lock) rewrote the local copy."""
        if self.md is not None and self._stamp != self._local_stamp():
            self.md = None
        if self.md is None:
            if self._local_file.exists():
                self.md = self._read_local()
                if self._store_ahead(self.md):
                    # A process died after writing the store, before its local copy:
                    # carry on from what agents may have seen, never under its numbers.
                    self.md = self._import()
                    self._save_local(self.md)
                    log.event("tuf_imported", root=self.md.root.signed.version, why="store ahead")
            elif self._in_store():
                self.md = self._import()
                self._save_local(self.md)
                log.event("tuf_imported", root=self.md.root.signed.version, why="no local copy")
            else:
                self.md = self._create()
                log.event("tuf_created", bins=len(self.md.bins))
            self._check_online_key(self.md)
        return self.md

    def _check_online_key(self, md: Metadatas) -> None:
        keyid = self.online.public_key.keyid
        for role in (RoleName.TIMESTAMP, RoleName.SNAPSHOT, RoleName.BINS):
            if keyid not in tufrepo.role_keys(md.root.signed, md.targets.signed, role)[0]:
                raise TufError(
                    f"the TUF {role} role does not list the signing key {keyid}: "
                    f"add it with `reconciler keys add {role} {keyid}`, or sign with a key it lists"
                )

    def _read_local(self) -> Metadatas:
        path = self._local_file
        try:
            data = path.read_bytes()
            doc = json.loads(data)
            where = str(path)
            targets: Metadata[Targets] = typed(Metadata.from_dict(doc["targets"]), Targets.type, where)
            names = tufrepo.succinct(targets.signed, where).get_roles()
            bins: dict[str, Metadata[Targets]] = {
                n: typed(Metadata.from_dict(doc["bins"][n]), n, where) for n in names
            }
            md = Metadatas(
                typed(Metadata.from_dict(doc["root"]), Root.type, where),
                targets,
                bins,
                typed(Metadata.from_dict(doc["snapshot"]), Snapshot.type, where),
                typed(Metadata.from_dict(doc["timestamp"]), Timestamp.type, where),
                {str(n): int(v) for n, v in doc.get("superseded", {}).items()},
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError, RepositoryError) as exc:
            raise TufError(f"{path}: unreadable TUF metadata ({exc!r})") from None
        self._stamp = hashlib.sha256(data).digest()
        return md

    def _store_ahead(self, md: Metadatas) -> bool:
        try:
            data = self.store.get_bytes(tuf_path("timestamp", None), TIMESTAMP_LIMIT)
            stored = Metadata.from_bytes(data) if data is not None else None
        except (ValueError, RepositoryError, ObjectTooLargeError):
            return False  # not ours: overwritten by the next timestamp
        return stored is not None and stored.signed.version > md.timestamp.signed.version

    def _create(self) -> Metadatas:
        now, lt = self.clock.now(), self.settings.lifetimes
        key = self.online.public_key
        root, targets, bins = tufrepo.new_repository(
            KeySet((key,)), KeySet((key,)), key, self.settings.bit_length, now, lt
        )
        snapshot = tufrepo.new_snapshot(targets, bins, now, lt)
        md = Metadatas(root, targets, bins, snapshot, tufrepo.new_timestamp(snapshot, now, lt))
        every: list[Metadata[Any]] = [root, targets, *bins.values(), snapshot, md.timestamp]
        for m in every:
            sign(m, self.online)
        self._write(md, root=True, targets=True, bins=bins)
        return md

    def _get(self, role: str, version: int | None) -> Metadata[Any]:
        """``role``'s metadata from the store, of its type and (if given) ``version``."""
        key = tuf_path(role, version)
        data = self.store.get_bytes(key, size_limit(role))
        if data is None:
            raise TufError(f"the store's TUF metadata lacks {key}")
        md = parse(data, role, key)
        if version is not None and md.signed.version != version:
            # A replay of an older version under a newer name.
            raise TufError(f"{key}: holds version {md.signed.version} of {role}")
        return md

    def _import(self) -> Metadatas:
        """The store's metadata, each file verified by the keys its delegator names."""
        try:
            root = self._get("root", 1)
            root.verify_delegate("root", root)
            while self.store.exists(tuf_path("root", root.signed.version + 1)):
                new = self._get("root", root.signed.version + 1)
                root.verify_delegate("root", new)
                new.verify_delegate("root", new)
                root = new
            timestamp = self._get("timestamp", None)
            root.verify_delegate("timestamp", timestamp)
            snapshot = self._get("snapshot", timestamp.signed.snapshot_meta.version)
            root.verify_delegate("snapshot", snapshot)
            targets = self._get("targets", snapshot.signed.meta["targets.json"].version)
            root.verify_delegate("targets", targets)
            bins = {}
            for name in tufrepo.succinct(
                targets.signed, tuf_path("targets", targets.signed.version)
            ).get_roles():
                bins[name] = self._get(name, snapshot.signed.meta[f"{name}.json"].version)
                targets.verify_delegate(name, bins[name])
        except (RepositoryError, KeyError, ValueError) as exc:
            raise TufError(f"the store's TUF metadata does not verify: {exc}") from None
        return Metadatas(root, targets, bins, snapshot, timestamp)

    # -- writing ---------------------------------------------------------------

    def _put(self, key: str, md: Metadata[Any]) -> None:
        self.store.put_bytes(key, md.to_bytes(SERIALIZER))

    def _write(
        self,
        md: Metadatas,
        root: bool = False,
        targets: bool = False,
        bins: Mapping[str, Metadata[Targets]] | None = None,
        snapshot: bool = True,
        gone: Mapping[str, int] | None = None,
    ) -> None:
        """Write what changed under new names, then the snapshot, the timestamp last;
        and the local copy once the store has it. Then delete what is no longer wanted:
        the bins' ``gone`` versions (bin -> version), the snapshot's and targets'
        versions before their previous ones."""
        if root:
            self._put(tuf_path("root", md.root.signed.version), md.root)
        if targets:
            self._put(tuf_path("targets", md.targets.signed.version), md.targets)
        for name, b in (bins or {}).items():
            self._put(tuf_path(name, b.signed.version), b)
        if snapshot:
            self._put(tuf_path("snapshot", md.snapshot.signed.version), md.snapshot)
        self._put(tuf_path("timestamp", None), md.timestamp)
        self._save_local(md)
        self._forget_old(md, snapshot, targets, gone or {})

    def _save_local(self, md: Metadatas) -> None:
        """The local copy, whole or not at all (one file, replaced by rename)."""
        doc = {
            "root": md.root.to_dict(),
            "targets": md.targets.to_dict(),
            "bins": {name: b.to_dict() for name, b in md.bins.items()},
            "snapshot": md.snapshot.to_dict(),
            "timestamp": md.timestamp.to_dict(),
            "superseded": md.superseded,
        }
        self.local.mkdir(parents=True, exist_ok=True)
        data = json.dumps(doc, separators=(",", ":")).encode()
        tmp = self._local_file.with_name(LOCAL_FILE + ".tmp")
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._local_file)
        self._stamp = hashlib.sha256(data).digest()

    def _forget_old(self, md: Metadatas, snapshot: bool, targets: bool, bins: Mapping[str, int]) -> None:
        """Delete the version before the previous one of what was rewritten: an agent
        that read the previous timestamp can still finish; older ones are dead."""
        old = []
        if snapshot:
            old.append(tuf_path("snapshot", md.snapshot.signed.version - 2))
        if targets:
            old.append(tuf_path("targets", md.targets.signed.version - 2))
        old += [tuf_path(name, version) for name, version in bins.items()]
        for key in old:
            try:
                self.store.delete(key)
            except StoreError as exc:
                log.event("tuf_cleanup_failed", logging.WARNING, key=key, error=str(exc))

    # -- the pass --------------------------------------------------------------

    def listed(self) -> dict[str, int]:
        """Each host's release the metadata lists: host -> N; none while there is no
        repository (only read: a repository is created by the first sync)."""
        if not self.exists():
            return {}
        return tufrepo.hosts_listed(self.load().bins.values())

    def sync(self, published: Mapping[str, int]) -> bool:
        """List each host's release ``published`` (host -> N) and no other; re-sign
        what is due. Whether anything was written."""
        with self._undone_on_failure():
            return self._sync(published)

    @contextlib.contextmanager
    def _undone_on_failure(self) -> Iterator[None]:
        """A change that fails half-way (a store or gpg error) leaves the copy in memory
        ahead of what was written: forget it, so the next attempt starts from the local
        copy, which is only written once the store has everything."""
        try:
            yield
        except BaseException:
            self.md = None
            raise

    def _sync(self, published: Mapping[str, int]) -> bool:
        md = self.load()
        now, lt = self.clock.now(), self.settings.lifetimes
        listed = tufrepo.hosts_listed(md.bins.values())
        wanted: dict[str, Any] = {h: None for h in listed.keys() - published.keys()}
        for host, version in published.items():
            if listed.get(host) == version:
                continue
            missing = self._missing.get(host)
            if missing is not None and missing[0] == version and self.clock.monotonic() < missing[1]:
                continue
            data = self.store.get_bytes(release_path(host, version), RELEASE_LIMIT)
            if data is None:
                # A store that lost its files is not read for every host on every pass.
                self._missing[host] = (version, self.clock.monotonic() + MISSING_RETRY)
                log.event("tuf_release_missing", logging.WARNING, host=host, version=version)
                continue
            wanted[host] = tufrepo.entry(host, version, data)
        names = tufrepo.set_entries(md.targets, md.bins, wanted)
        names |= {n for n, b in md.bins.items() if tufrepo.due(b, now, lt.snapshot)}
        changed = {n: md.bins[n] for n in sorted(names)}
        roles = tufrepo.succinct(md.targets.signed)
        next_snapshot = md.snapshot.signed.version + 1
        gone = {}
        for name, b in changed.items():
            previous = b.signed.version
            # Before bin_version, a bin's versions were consecutive.
            gone[name] = md.superseded.get(name, previous - 1)
            md.superseded[name] = previous
            tufrepo.bump(b, now, lt.snapshot, tufrepo.bin_version(roles, name, next_snapshot))
            sign(b, self.online)
        snapshot = bool(changed) or tufrepo.due(md.snapshot, now, lt.snapshot)
        if snapshot:
            tufrepo.record_versions(md.snapshot, changed)
            tufrepo.bump(md.snapshot, now, lt.snapshot)
            md.snapshot.signed.meta["targets.json"].version = md.targets.signed.version
            sign(md.snapshot, self.online)
        elif not tufrepo.due(md.timestamp, now, lt.timestamp):
            return False
        self._new_timestamp(md)
        # The timestamp alone when only it was due: N.snapshot.json is written once.
        self._write(md, bins=changed, snapshot=snapshot, gone=gone)
        if changed:
            log.event("tuf_published", bins=len(changed), snapshot=md.snapshot.signed.version)
        return True

    def _new_timestamp(self, md: Metadatas, signer: MetadataSigner | None = None) -> None:
        tufrepo.bump(md.timestamp, self.clock.now(), self.settings.lifetimes.timestamp)
        md.timestamp.signed.snapshot_meta.version = md.snapshot.signed.version
        sign(md.timestamp, signer or self.online)

    # -- key changes -----------------------------------------------------------

    def change_keys(
        self, role: RoleName, change: KeyChange, signers: Mapping[str, MetadataSigner]
    ) -> Metadata[Any]:
        """Apply ``change(root, targets)`` (core.tufrepo's add_key, revoke_key,
        set_threshold) as a new root, or new targets for the bins, signed by what
        ``signers`` (keyid -> signer) hold; a new snapshot and timestamp follow."""
        old = self.load()
        now, lt = self.clock.now(), self.settings.lifetimes
        # On copies, kept only once all is signed and written: a change refused half
        # way leaves this process signing over the old root, as the store has it.
        md = Metadatas(
            copy(old.root),
            copy(old.targets),
            old.bins,
            copy(old.snapshot),
            copy(old.timestamp),
            old.superseded,
        )
        change(md.root.signed, md.targets.signed)
        changed: Metadata[Any]
        if role is RoleName.BINS:
            tufrepo.bump(md.targets, now, lt.targets)
            self._sign(md.targets, "targets", signers, [old.root])
            changed = md.targets
        else:
            tufrepo.bump(md.root, now, lt.root)
            # A new root is signed by a threshold of the old root's keys and its own.
            self._sign(md.root, "root", signers, [old.root, md.root])
            changed = md.root
        md.snapshot.signed.meta["targets.json"].version = md.targets.signed.version
        tufrepo.bump(md.snapshot, now, lt.snapshot)
        sign(md.snapshot, self._role_signer(md, RoleName.SNAPSHOT, signers))
        self._new_timestamp(md, self._role_signer(md, RoleName.TIMESTAMP, signers))
        self._write(md, root=role is not RoleName.BINS, targets=role is RoleName.BINS)
        self.md = md
        return changed

    def _role_signer(
        self, md: Metadatas, role: RoleName, signers: Mapping[str, MetadataSigner]
    ) -> MetadataSigner:
        """Who signs ``role`` after a key change: the daemon's key if the role still
        lists it, else one of ``signers`` that it lists (a rotation away from it)."""
        keyids = tufrepo.role_keys(md.root.signed, md.targets.signed, role)[0]
        if self.online.public_key.keyid in keyids:
            return self.online
        for keyid in keyids:
            if keyid in signers:
                return signers[keyid]
        raise TufError(f"no key given can sign the {role} role after this change ({', '.join(keyids)})")

    @staticmethod
    def _sign(
        md: Metadata[Any], role: str, signers: Mapping[str, MetadataSigner], delegators: list[Metadata[Root]]
    ) -> None:
        needed: set[str] = set()
        for d in delegators:
            needed |= set(d.signed.roles[role].keyids)
        for keyid in sorted(needed & signers.keys()):
            sign(md, signers[keyid], append=True)
        for d in delegators:
            r = d.signed.roles[role]
            have = [k for k in r.keyids if k in md.signatures]
            if len(have) < r.threshold:
                raise TufError(
                    f"the new {role} needs {r.threshold} signature(s) of the {role} keys of root version "
                    f"{d.signed.version} ({', '.join(r.keyids)}); signed by {len(have)}: give the "
                    "gnupghome(s) holding more of them"
                )
