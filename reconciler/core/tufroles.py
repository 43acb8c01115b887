"""The TUF roles' names and lifetimes, apart from reconciler.core.tufrepo so that the
configuration and the command line name them without importing python-tuf (and,
through securesystemslib, boto3), which costs a command like `reconciler plan` more
than the plan itself."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum


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
