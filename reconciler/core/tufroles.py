"""The TUF roles' names and lifetimes, apart from reconciler.core.tufrepo so that the
configuration and the command line name them without importing python-tuf (and,
through securesystemslib, boto3), which costs a command like `reconciler plan` more
than the plan itself."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

# The most bytes of each role's metadata anyone reads, the publisher importing the
# store's metadata as much as an agent (reconciler.agent.tufclient's UpdaterConfig).
# Root and timestamp are python-tuf's defaults (tuf.ngclient.UpdaterConfig in
# python-tuf 7.0: root_max_length 512000, timestamp_max_length 16384; a timestamp is
# a few hundred bytes). Snapshot and targets are raised from its 2000000 and 5000000
# (measured with core.tufrepo, compact JSON, one ed25519 signature): the snapshot
# names every hash bin in about 36 bytes, 2.4 MB at tuf.bins' maximum of 65536; a bin
# (targets metadata, as the top-level targets) takes about 180 bytes per host (a
# 27-character name), 0.9 MB each for 10,000 hosts in the minimum of 2 bins, so
# 8 MiB leaves room for a fleet several times that size.
ROOT_LIMIT = 512_000
TIMESTAMP_LIMIT = 16 * 1024
SNAPSHOT_LIMIT = 4 << 20
TARGETS_LIMIT = 8 << 20


class RoleName(StrEnum):
    ROOT = "root"
    TARGETS = "targets"
    SNAPSHOT = "snapshot"
    TIMESTAMP = "timestamp"
    BINS = "bins"  # the delegated hash bins, all under one key set


@dataclass(frozen=True)
class Lifetimes:
    """How long each role's metadata is valid after it is signed."""

    root: timedelta = timedelta(days=365)
    targets: timedelta = timedelta(days=365)
    snapshot: timedelta = timedelta(days=7)  # also the bins': both are online
    timestamp: timedelta = timedelta(days=1)  # the window in which a freeze shows

    def of(self, role: RoleName) -> timedelta:
        return {
            RoleName.ROOT: self.root,
            RoleName.TARGETS: self.targets,
            RoleName.SNAPSHOT: self.snapshot,
            RoleName.BINS: self.snapshot,
            RoleName.TIMESTAMP: self.timestamp,
        }[role]
