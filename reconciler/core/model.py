"""The records the pass is made of: what the ledger holds per host, what Nix answers,
and the kinds of plan action and host status. Pure data."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

# Keys of the ledger's meta table.
# The last reconciled commit.
COMMIT_KEY = "commit"
# Why the newest commit was not built (refused by the commit gate), or empty.
SOURCE_ERROR_KEY = "source_error"
# Whether builds run in Nix's sandbox, as the last probe found: "on" or "off".
SANDBOX_KEY = "sandbox"
# The packages' ids (Nix.package_ids) and what they were evaluated from, as JSON.
PACKAGES_KEY = "package_ids"
# Unix time at which the last pass that succeeded (ReconcileResult.succeeded) ended.
LAST_SUCCESS_KEY = "last_success"
# The last pass: when it ended and how (PassRecord, as JSON).
LAST_PASS_KEY = "last_pass"
# The config repository's fetch failing since when, how often (FetchFailure, as JSON), or
# empty since a fetch worked.
FETCH_ERROR_KEY = "fetch_error"


class Action(StrEnum):
    """What a pass does with a host (``reconciler plan`` prints these)."""

    REBUILD = "rebuild"
    UNCHANGED = "unchanged"
    INVALID = "invalid"
    REMOVED = "removed"
    # Would rebuild, but the same build failed recently and its retry time has not come.
    BACKOFF = "backoff"
    # An operator suspended the host or the whole fleet (`reconciler suspend`): the pass
    # leaves it as it is, and what it published stays served.
    SUSPENDED = "suspended"


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
    updated: float  # unix time since which it has had this status (and, published, this version)
    failures: int = 0  # consecutive failed builds of failed_image
    failed_image: str | None = None
    retry_at: float | None = None  # unix time before which failed_image is not retried
    # The version the failed build was to publish (None: failed before a version was
    # decided, or recorded by an older daemon).
    attempt_version: int | None = None

    @property
    def serving(self) -> bool:
        """Whether hosts are offered its published release (metrics, TUF metadata): it
        has one and was not removed from the repository."""
        return bool(self.version) and self.status != Status.REMOVED


@dataclass(frozen=True)
class Suspensions:
    """What operators suspended (`reconciler suspend [HOST]`), each with the unix time
    it was suspended at: the whole fleet, or single hosts."""

    fleet: float | None = None
    hosts: Mapping[str, float] = field(default_factory=dict)

    def since(self, host: str) -> float | None:
        """When ``host`` was suspended, by itself or with the fleet (the earlier); None
        if it is not."""
        times = [t for t in (self.fleet, self.hosts.get(host)) if t is not None]
        return min(times) if times else None

    def covers(self, host: str) -> bool:
        return self.fleet is not None or host in self.hosts


@dataclass(frozen=True)
class Evaluation:
    images: Mapping[str, str]  # host -> image derivation path
    errors: Mapping[str, str]  # host -> why it could not be evaluated


@dataclass(frozen=True)
class PackageIds:
    """What each package gives an image (Nix.package_ids), or why it gives none."""

    ids: Mapping[str, str]  # package -> id: equal ids, equal images of the hosts using it
    failed: Mapping[str, str]  # package -> why it does not evaluate
    # Of ``failed``, those stopped at a limit (the deadline, the memory): a busier or
    # a freer machine may find otherwise, so their failure is not kept.
    limited: frozenset[str] = frozenset()


# What a running build reports now and then (Nix.realise): the seconds it has run, and
# the last line of its output that may be shown (None before the first).
BuildProgress = Callable[[float, str | None], None]


@dataclass(frozen=True)
class BuildOutput:
    derivation: str
    out: Path
    files: Mapping[str, Path]  # format -> artifact, named as it is published
    # The builder that built the host's image (core.builders.LOCAL for this machine);
    # None when Nix built nothing (the output was in the store already).
    builder: str | None = None
    # Builders Nix could not use for this build, and why (the build went elsewhere).
    refused: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BuilderState:
    """What the ledger holds per builder (``reconciler status``)."""

    name: str
    builds: int  # host builds that succeeded there
    failures: int  # host builds that failed there
    unreachable: int  # host builds Nix could not hand to it
    last_build: float | None  # unix time the last successful build there ended
    last_seconds: float | None  # how long it took
    last_error: str | None  # the last failure or refusal
    last_error_at: float | None
    sandbox: str | None = None  # what its last sandbox probe found (core.builders.Sandbox)


class PassResult(StrEnum):
    """How a pass ended, as ``reconciler status`` says it."""

    SUCCESS = "success"  # everything it tried worked (ReconcileResult.succeeded)
    FAILURE = "failure"  # a build, publication or the metadata failed, or nothing could be observed
    STANDBY = "standby"  # another daemon holds the publisher lease: planned only
    SUSPENDED = "suspended"  # the whole fleet is suspended: fetched and built nothing


@dataclass(frozen=True)
class PassRecord:
    """The last pass, in the ledger's meta table (LAST_PASS_KEY)."""

    at: float  # unix time it ended
    result: PassResult
    seconds: float
    commit: str | None = None
    error: str | None = None  # one line: why it failed

    def to_json(self) -> str:
        return json.dumps(
            {
                "at": self.at,
                "result": self.result.value,
                "seconds": self.seconds,
                "commit": self.commit,
                "error": self.error,
            }
        )

    @classmethod
    def from_json(cls, text: str | None) -> PassRecord | None:
        """None for nothing recorded, or for what this version cannot read (a record is
        informational: an unreadable one must not stop ``status``)."""
        try:
            d = json.loads(text or "")
            return cls(
                float(d["at"]),
                PassResult(d["result"]),
                float(d["seconds"]),
                d.get("commit"),
                d.get("error"),
            )
        except (ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True)
class FetchFailure:
    """Fetches of the config repository failing in a row (FETCH_ERROR_KEY): newer
    commits are not seen, and what the ledger says of the hosts is as of the last
    commit fetched."""

    since: float  # unix time of the first failure in a row
    at: float  # of the last one
    passes: int  # failures in a row
    error: str

    def after(self, at: float, error: str) -> FetchFailure:
        """This failure, failed once more at ``at``."""
        return FetchFailure(self.since, at, self.passes + 1, error)

    def to_json(self) -> str:
        return json.dumps({"since": self.since, "at": self.at, "passes": self.passes, "error": self.error})

    @classmethod
    def from_json(cls, text: str | None) -> FetchFailure | None:
        try:
            d = json.loads(text or "")
            return cls(float(d["since"]), float(d["at"]), int(d["passes"]), str(d["error"]))
        except (ValueError, KeyError, TypeError):
            return None


def next_retry(hs: HostState, now: float, max_wait: float) -> float | None:
    """When the daemon next tries ``hs``'s failed build: its retry time, or None if that
    has come (retried at the next pass). A retry time further than ``max_wait`` (retry.max)
    away was recorded under a clock that ran ahead, and the plan ignores it: so does this."""
    if hs.status != Status.FAILED or hs.retry_at is None:
        return None
    return hs.retry_at if now < hs.retry_at <= now + max_wait else None
