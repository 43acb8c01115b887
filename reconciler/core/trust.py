"""The agent's trust rules: what a host accepts from a store it does not trust. Pure.

Modelled on python-tuf's ``TrustedMetadataSet`` (tuf/ngclient/_internal/
trusted_metadata_set.py). A :class:`TrustedState` starts from what the host pinned
(its name, the artifact format it runs, the version it runs and the versions that
failed here) and the time of the poll, then takes what the store served, in order:

    latest.json  ->  releases/<N>.json with gpg's verdict on its signature
                 ->  the artifact's size and sha256  ->  gpg's verdict on its signature

Each step returns the object it now trusts, or raises :class:`RefusalError` naming
the rule broken (``reason`` is the metric label). A refusal leaves the state as it
was. A step taken out of order is a bug of the caller (RuntimeError), not a refusal.

IO is not handled here: fetching is the updater's, and checking a signature is gpg's
(reconciler.adapters.gpg), against the pinned keys only; this module takes its verdict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from enum import Enum, StrEnum

from reconciler.core.layout import latest_path, release_path
from reconciler.core.release import Artifact, Release, parse_release
from reconciler.errors import ReconcilerError, VerificationError


class Reason(StrEnum):
    """Why a release is refused; the value is the metric label."""

    MALFORMED = "malformed"  # latest.json or the release file does not parse
    UNSIGNED = "unsigned"  # the release file has no signature
    BAD_SIGNATURE = "bad-signature"  # not signed by a pinned key, or changed since
    WRONG_HOST = "wrong-host"  # another host's release
    ROLLBACK = "rollback"  # not newer than what runs: a replay or a downgrade
    FAILED_BEFORE = "failed-before"  # failed its health check on this host already
    EXPIRED = "expired"  # past its expiry: a freeze on an old release
    NO_ARTIFACT = "no-artifact"  # nothing in the format this host runs
    TAMPERED = "tampered"  # the artifact differs from what the release says


class RefusalError(ReconcilerError):
    """A release this agent will not install; ``reason`` is a short metric label."""

    def __init__(self, reason: Reason, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class SignatureStatus(Enum):
    GOOD = "good"
    MISSING = "missing"
    BAD = "bad"


@dataclass(frozen=True)
class SignatureVerdict:
    """What gpg said of a detached signature: ``detail`` is the signer's fingerprint
    when good, else why not."""

    status: SignatureStatus
    detail: str

    @classmethod
    def good(cls, fingerprint: str) -> SignatureVerdict:
        return cls(SignatureStatus.GOOD, fingerprint)

    @classmethod
    def missing(cls, why: str) -> SignatureVerdict:
        return cls(SignatureStatus.MISSING, why)

    @classmethod
    def bad(cls, why: str) -> SignatureVerdict:
        return cls(SignatureStatus.BAD, why)


@dataclass(frozen=True)
class Pinned:
    """What the host holds on its own disk, which the store cannot change."""

    host: str
    format: str
    running: int  # 0 before the first install
    failed: frozenset[int] = frozenset()  # versions that failed their health check here


@dataclass(frozen=True)
class Latest:
    """The version an unverified ``latest.json`` claims: only a hint of what to fetch."""

    version: int
    new: bool  # False: it runs already, or it failed here before; nothing to fetch


@dataclass(frozen=True)
class Downloaded:
    """What was actually received for an artifact."""

    source: str  # where it was read from, for messages
    size: int
    sha256: str


def peek_version(data: bytes, source: str) -> int:
    """The version an unverified ``latest.json`` claims."""
    try:
        version = json.loads(data).get("version")
    except (ValueError, AttributeError, RecursionError):
        version = None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise RefusalError(Reason.MALFORMED, f"{source}: no valid version")
    return version


def expired(release: Release, now: datetime) -> bool:
    """A release is dead from its expiry on: the boundary itself is expired."""
    return release.expires <= now


def check_release(release: Release, pinned: Pinned, now: datetime) -> Artifact:
    """The artifact this host would run from ``release``, or :class:`RefusalError`.

    The host is checked first: another host's genuine release is named as such
    whatever its version."""
    if release.host != pinned.host:
        raise RefusalError(
            Reason.WRONG_HOST, f"release is for host {release.host!r}, this is {pinned.host!r}"
        )
    if release.version <= pinned.running:
        raise RefusalError(
            Reason.ROLLBACK, f"version {release.version} is not newer than the running {pinned.running}"
        )
    if release.version in pinned.failed:
        raise RefusalError(
            Reason.FAILED_BEFORE, f"version {release.version} failed its health check here before"
        )
    if expired(release, now):
        raise RefusalError(
            Reason.EXPIRED, f"release {release.version} expired at {release.expires.isoformat()}"
        )
    art = release.artifact(pinned.format)
    if art is None:
        raise RefusalError(Reason.NO_ARTIFACT, f"release {release.version} has no {pinned.format} artifact")
    return art


class TrustedState:
    """What one poll trusts so far; see the module's docstring for the order."""

    def __init__(self, pinned: Pinned, now: datetime) -> None:
        self.pinned = pinned
        self.reference_time = now
        self._latest: Latest | None = None
        self._release: Release | None = None
        self._downloaded: Artifact | None = None  # size and digest match, signature not yet
        self._artifact: Artifact | None = None

    @property
    def latest(self) -> Latest | None:
        return self._latest

    @property
    def release(self) -> Release | None:
        return self._release

    @property
    def artifact(self) -> Artifact | None:
        """The artifact to install, once its bytes and signature were checked."""
        return self._artifact

    def update_latest(self, data: bytes) -> Latest:
        """Take ``latest.json``: which version to look at, if any."""
        if self._release is not None:
            raise RuntimeError("latest.json cannot change once a release is trusted")
        version = peek_version(data, latest_path(self.pinned.host))
        new = version != self.pinned.running and version not in self.pinned.failed
        self._latest = Latest(version, new)
        return self._latest

    def update_release(self, data: bytes, signature: SignatureVerdict) -> Release:
        """Take ``releases/<N>.json`` (N from latest.json) and gpg's verdict on its signature."""
        if self._latest is None:
            raise RuntimeError("a release needs latest.json first")
        if not self._latest.new:
            raise RuntimeError(f"latest.json names version {self._latest.version}, which is not new")
        if self._release is not None:
            raise RuntimeError("a release is trusted already")
        key = release_path(self.pinned.host, self._latest.version)
        if signature.status is SignatureStatus.MISSING:
            raise RefusalError(Reason.UNSIGNED, f"{key}: no signature ({signature.detail})")
        if signature.status is SignatureStatus.BAD:
            raise RefusalError(Reason.BAD_SIGNATURE, signature.detail)
        try:
            release = parse_release(data, key)
        except VerificationError as exc:
            raise RefusalError(Reason.MALFORMED, str(exc)) from None
        check_release(release, self.pinned, self.reference_time)
        self._release = release
        return release

    def update_artifact(self, got: Downloaded) -> Artifact:
        """Take the size and sha256 of the downloaded artifact."""
        if self._release is None:
            raise RuntimeError("an artifact needs a trusted release first")
        if self._downloaded is not None:
            raise RuntimeError("the artifact was taken already")
        art = self._release.artifact(self.pinned.format)
        assert art is not None  # check_release made sure
        if got.size != art.size:
            raise RefusalError(Reason.TAMPERED, f"{got.source}: {got.size} bytes, release says {art.size}")
        if got.sha256 != art.sha256:
            raise RefusalError(
                Reason.TAMPERED, f"{got.source}: sha256 {got.sha256}, release says {art.sha256}"
            )
        self._downloaded = art
        return art

    def update_artifact_signature(self, signature: SignatureVerdict) -> Artifact:
        """Take gpg's verdict on the artifact's signature: the artifact is trusted."""
        if self._downloaded is None:
            raise RuntimeError("an artifact's signature needs its size and digest first")
        if self._artifact is not None:
            raise RuntimeError("the artifact is trusted already")
        if signature.status is SignatureStatus.MISSING:
            raise RefusalError(Reason.UNSIGNED, f"{self._downloaded.blob}: no signature ({signature.detail})")
        if signature.status is SignatureStatus.BAD:
            raise RefusalError(Reason.TAMPERED, signature.detail)
        self._artifact = self._downloaded
        return self._artifact
