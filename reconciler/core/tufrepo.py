"""The store's TUF repository (The Update Framework, python-tuf's Metadata API): what
each role says, and how it changes. Pure: nothing here signs, reads or writes.

Roles and keys:

    root       k of n offline keys (`reconciler keys`); names every other role's keys
    targets    k of n keys; delegates every target to hash-binned roles ``bins-XX``
    bins-XX    the publisher's online key: one entry per host, ``hosts/<h>/latest.json``
    snapshot   the publisher's online key: the version of targets and of every bin
    timestamp  the publisher's online key: the snapshot's version; short-lived, re-signed
               by the daemon even when nothing changes, so a frozen store shows

A host's entry names the newest release of that host: its length and sha256 are those
of ``hosts/<h>/releases/<N>.json`` (the same bytes as its latest.json) and its custom
field ``version`` is N, so an agent reads the immutable release file and checks it
against the entry. Hash-binned delegation (TUF's succinct roles) keeps one agent's
poll small at any fleet size: it reads the timestamp, the snapshot and its one bin.

Store layout (consistent snapshots): ``tuf/<V>.root.json``, ``tuf/timestamp.json``,
``tuf/<V>.snapshot.json``, ``tuf/<V>.targets.json``, ``tuf/<V>.bins-XX.json``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from securesystemslib.signer import Key
from tuf.api.metadata import (
    Delegations,
    Metadata,
    MetaFile,
    Role,
    Root,
    Snapshot,
    SuccinctRoles,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from reconciler.core.tufroles import Lifetimes as Lifetimes
from reconciler.core.tufroles import RoleName as RoleName
from reconciler.errors import ReconcilerError, TufError

BINS_PREFIX = "bins"
# Compact JSON: every agent reads the snapshot and its bin after each publication.
SERIALIZER = JSONSerializer(compact=True)


TOP_ROLES = (RoleName.ROOT, RoleName.TARGETS, RoleName.SNAPSHOT, RoleName.TIMESTAMP)


class KeyChangeError(ReconcilerError):
    """A key or threshold change that would leave a role unusable."""


def target_path(host: str) -> str:
    """The target naming ``host``'s newest release."""
    return f"hosts/{host}/latest.json"


def succinct(targets: Targets, where: str = "targets") -> SuccinctRoles:
    """The hash bins ``targets`` delegates to, or TufError naming ``where``."""
    delegations = targets.delegations
    if delegations is None or delegations.succinct_roles is None:
        raise TufError(f"{where}: targets that delegate to no hash bins")
    return delegations.succinct_roles


def entry(host: str, version: int, release_json: bytes) -> TargetFile:
    """A host's entry in its bin: the release file's length and sha256, and N."""
    info = TargetFile.from_data(target_path(host), release_json, ["sha256"])
    info.unrecognized_fields["custom"] = {"version": version}
    return info


def entry_version(info: TargetFile) -> int | None:
    """The release number an entry names, or None if it names none validly."""
    custom = info.unrecognized_fields.get("custom")
    version = custom.get("version") if isinstance(custom, dict) else None
    if isinstance(version, int) and not isinstance(version, bool) and version >= 1:
        return version
    return None


def _expiry(now: datetime, lifetime: timedelta) -> datetime:
    return now.replace(microsecond=0) + lifetime


def bump(md: Metadata[Any], now: datetime, lifetime: timedelta, version: int = 0) -> None:
    """A new version of ``md`` (``version``, if later than the next): its old signatures
    go, its expiry moves on."""
    md.signed.version = max(md.signed.version + 1, version)
    md.signed.expires = _expiry(now, lifetime)
    md.signatures.clear()


def bin_version(roles: SuccinctRoles, name: str, snapshot_version: int) -> int:
    """The version bin ``name`` is signed at for snapshot ``snapshot_version``: one no
    other bin is ever signed at. A bin's metadata names no role and every bin is signed
    by the same keys, so a bin verifies under any name whose version snapshot lists as
    its own: with versions shared, a store could serve one bin for another and withhold
    that one's hosts (Mercury, USENIX ATC '17, section 5.6). Versions of this form are
    unique without snapshot listing each bin's hash, which would triple the snapshot
    every agent reads when any host publishes. Later than the bin's previous version, as
    a bin changes only with a new snapshot."""
    index = int(name.removeprefix(f"{roles.name_prefix}-"), 16)
    bins: int = roles.number_of_bins
    return snapshot_version * bins + index


def due(md: Metadata[Any], now: datetime, lifetime: timedelta) -> bool:
    """Whether ``md`` has less than half its lifetime left: re-sign it now, so that
    agents never see it expire while the publisher runs."""
    expires: datetime = md.signed.expires
    return expires - now < lifetime / 2


@dataclass(frozen=True)
class KeySet:
    keys: tuple[Key, ...]
    threshold: int = 1

    def __post_init__(self) -> None:
        if not self.keys:
            raise KeyChangeError("a role needs at least one key")
        if not 1 <= self.threshold <= len(self.keys):
            raise KeyChangeError(f"threshold {self.threshold} needs between 1 and {len(self.keys)} keys")


def new_repository(
    root_keys: KeySet,
    targets_keys: KeySet,
    online: Key,
    bit_length: int,
    now: datetime,
    lifetimes: Lifetimes,
) -> tuple[Metadata[Root], Metadata[Targets], dict[str, Metadata[Targets]]]:
    """Version 1 of root and targets, and every bin empty (all unsigned)."""
    root = Root(expires=_expiry(now, lifetimes.root), consistent_snapshot=True)
    for role, keyset in (
        (RoleName.ROOT, root_keys),
        (RoleName.TARGETS, targets_keys),
        (RoleName.SNAPSHOT, KeySet((online,))),
        (RoleName.TIMESTAMP, KeySet((online,))),
    ):
        for key in keyset.keys:
            root.add_key(key, role)
        root.roles[role].threshold = keyset.threshold
    targets = Targets(expires=_expiry(now, lifetimes.targets))
    bins = SuccinctRoles([online.keyid], 1, bit_length, BINS_PREFIX)
    targets.delegations = Delegations(keys={online.keyid: online}, succinct_roles=bins)
    empty = {name: Metadata(Targets(expires=_expiry(now, lifetimes.snapshot))) for name in bins.get_roles()}
    return Metadata(root), Metadata(targets), empty


def new_snapshot(
    targets: Metadata[Targets], bins: Mapping[str, Metadata[Targets]], now: datetime, lifetimes: Lifetimes
) -> Metadata[Snapshot]:
    meta = {"targets.json": MetaFile(targets.signed.version)}
    meta.update({f"{name}.json": MetaFile(md.signed.version) for name, md in sorted(bins.items())})
    return Metadata(Snapshot(expires=_expiry(now, lifetimes.snapshot), meta=meta))


def new_timestamp(snapshot: Metadata[Snapshot], now: datetime, lifetimes: Lifetimes) -> Metadata[Timestamp]:
    return Metadata(
        Timestamp(expires=_expiry(now, lifetimes.timestamp), snapshot_meta=MetaFile(snapshot.signed.version))
    )


def set_entries(
    targets: Metadata[Targets],
    bins: Mapping[str, Metadata[Targets]],
    wanted: Mapping[str, TargetFile | None],
) -> set[str]:
    """Put each host's entry (None: remove it) in its bin; the bins that changed."""
    roles = succinct(targets.signed)
    changed = set()
    for host, info in wanted.items():
        path = target_path(host)
        name = roles.get_role_for_target(path)
        listed = bins[name].signed.targets
        if info is None:
            if listed.pop(path, None) is not None:
                changed.add(name)
        elif listed.get(path) != info:
            listed[path] = info
            changed.add(name)
    return changed


def record_versions(snapshot: Metadata[Snapshot], roles: Mapping[str, Metadata[Targets]]) -> None:
    for name, md in roles.items():
        snapshot.signed.meta[f"{name}.json"] = MetaFile(md.signed.version)


def hosts_listed(bins: Iterable[Metadata[Targets]]) -> dict[str, int]:
    """Every host the bins name, with the release number its entry names."""
    listed = {}
    for md in bins:
        for path, info in md.signed.targets.items():
            parts = path.split("/")
            version = entry_version(info)
            if len(parts) == 3 and parts[0] == "hosts" and version is not None:
                listed[parts[1]] = version
    return listed


# -- key changes (each one new version of root, or of targets for the bins) ----------


def role_keys(root: Root, targets: Targets, role: RoleName) -> tuple[list[str], int]:
    """The keyids and threshold of ``role``."""
    if role is RoleName.BINS:
        roles = succinct(targets)
        return list(roles.keyids), roles.threshold
    r: Role = root.roles[role]
    return list(r.keyids), r.threshold


def add_key(root: Root, targets: Targets, role: RoleName, key: Key) -> None:
    if key.keyid in role_keys(root, targets, role)[0]:
        raise KeyChangeError(f"key {key.keyid} is already a {role} key")
    if role is RoleName.BINS:
        assert targets.delegations is not None
        targets.add_key(key, None)
    else:
        root.add_key(key, role)


def revoke_key(root: Root, targets: Targets, role: RoleName, keyid: str) -> None:
    keyids, threshold = role_keys(root, targets, role)
    if keyid not in keyids:
        raise KeyChangeError(f"{keyid} is not a {role} key")
    if len(keyids) - 1 < threshold:
        raise KeyChangeError(
            f"revoking {keyid} would leave {role} {len(keyids) - 1} key(s) for a threshold of "
            f"{threshold}: add a key first or lower the threshold"
        )
    if role is RoleName.BINS:
        targets.revoke_key(keyid, None)
    else:
        root.revoke_key(keyid, role)


def set_threshold(root: Root, targets: Targets, role: RoleName, threshold: int) -> None:
    keyids, _ = role_keys(root, targets, role)
    if not 1 <= threshold <= len(keyids):
        raise KeyChangeError(f"{role} has {len(keyids)} key(s): its threshold must be 1 to {len(keyids)}")
    if role is RoleName.BINS:
        succinct(targets).threshold = threshold
    else:
        root.roles[role].threshold = threshold
