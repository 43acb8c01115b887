"""The records the pass is made of: what the ledger holds per host, what Nix answers,
and the kinds of plan action and host status. Pure data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path


class Action(StrEnum):
    """What a pass does with a host (``reconciler plan`` prints these)."""

    REBUILD = "rebuild"
    UNCHANGED = "unchanged"
    INVALID = "invalid"
    REMOVED = "removed"
    # Would rebuild, but the same build failed recently and its retry time has not come.
    BACKOFF = "backoff"


class Status(StrEnum):
    """A host's last outcome, as the ledger records it (``reconciler status``)."""

    PUBLISHED = "published"
    FAILED = "failed"
    INVALID = "invalid"
    REMOVED = "removed"


@dataclass(frozen=True)
class HostState:
    name: str
    version: int  # 0: never published
    image: str | None  # image derivation of the published version
    commit: str | None
    status: Status
    error: str | None
    updated: float
    failures: int = 0  # consecutive failed builds of failed_image
    failed_image: str | None = None
    retry_at: float | None = None  # unix time before which failed_image is not retried


@dataclass(frozen=True)
class Evaluation:
    images: Mapping[str, str]  # host -> image derivation path
    errors: Mapping[str, str]  # host -> why it could not be evaluated


@dataclass(frozen=True)
class BuildOutput:
    derivation: str
    out: Path
    files: Mapping[str, Path]  # format -> artifact, named as it is published
