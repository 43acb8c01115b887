"""The agent's trust rules: what a host accepts from a store it does not trust. Pure.

Modelled on python-tuf's ``TrustedMetadataSet`` (tuf/ngclient/_internal/
trusted_metadata_set.py), and taking over where it ends: python-tuf's ngclient has
verified the store's TUF metadata (root chain, thresholds, timestamp, snapshot, the
host's bin: no freeze, rollback, mix-and-match or key compromise below threshold) and
hands over the host's entry, ``hosts/<h>/latest.json``. A :class:`TrustedState`
starts from what the host pinned (its name, the artifact format it runs, the version
it runs and the artifacts that failed here) and the time of the poll, then takes, in
order:

    the entry's release number  ->  releases/<N>.json, checked against the entry's
    length and sha256           ->  the artifact's size and sha256 (from the release)

With ``require_provenance`` the release's provenance is taken between the release and
the artifact: the DSSE envelope the release names, signed by a pinned key, whose
statement is SLSA v1 provenance of exactly this release's artifacts, host, commit and
derivation (:func:`check_attestation`, which `reconciler verify --provenance` runs too).

Each step returns the object it now trusts, or raises :class:`RefusalError` naming
the rule broken (``reason`` is the metric label). A refusal leaves the state as it
was. A step taken out of order is a bug of the caller (RuntimeError), not a refusal.

IO is not handled here: fetching and the TUF client are the updater's.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from securesystemslib import dsse
from securesystemslib.signer import Key
from securesystemslib.signer import Signature as KeySignature
from tuf.api import exceptions as tuf_exceptions

from reconciler.core import provenance
from reconciler.core.layout import AttestationKind, release_path
from reconciler.core.release import Artifact, Release, parse_release
from reconciler.core.tufrepo import target_path
from reconciler.errors import ReconcilerError, VerificationError


class Reason(StrEnum):
    """Why a release is refused; the value is the metric label."""

    MALFORMED = "malformed"  # metadata or the release file does not parse
    BAD_SIGNATURE = "bad-signature"  # below its role's threshold of good signatures
    WRONG_HOST = "wrong-host"  # another host's release
    WRONG_VERSION = "wrong-version"  # releases/N.json holds another number's release
    ROLLBACK = "rollback"  # not newer than what runs, or metadata older than trusted
    FAILED_BEFORE = "failed-before"  # its artifact failed its health check here already
    EXPIRED = "expired"  # past its expiry: a freeze on old metadata or an old release
    NO_ARTIFACT = "no-artifact"  # nothing in the format this host runs
    TAMPERED = "tampered"  # bytes differ from what the signed metadata says
    NO_PROVENANCE = "no-provenance"  # required, and the release names none
    BAD_PROVENANCE = "bad-provenance"  # its provenance is not a signed account of this release
    NOT_IN_LOG = "not-in-log"  # no checkable entry in the store's transparency log
    SPLIT_VIEW = "split-view"  # the log's head and one seen before are not one history


class RefusalError(ReconcilerError):
    """A release this agent will not install; ``reason`` is a short metric label."""

    def __init__(self, reason: Reason, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def refusal(exc: tuf_exceptions.RepositoryError) -> RefusalError:
    """What python-tuf's refusal of the store's metadata is, in this module's terms."""
    reason = Reason.MALFORMED
    if isinstance(exc, tuf_exceptions.ExpiredMetadataError):
        reason = Reason.EXPIRED
    elif isinstance(exc, tuf_exceptions.BadVersionNumberError):
        reason = Reason.ROLLBACK
    elif isinstance(exc, tuf_exceptions.UnsignedMetadataError):
        reason = Reason.BAD_SIGNATURE
    elif isinstance(exc, tuf_exceptions.LengthOrHashMismatchError):
        reason = Reason.TAMPERED
    return RefusalError(reason, f"TUF metadata: {exc}")


@dataclass(frozen=True)
class Pinned:
    """What the host holds on its own disk, which the store cannot change."""

    host: str
    format: str
    running: int  # 0 before the first install
    # The sha256 of artifacts that failed their activation or health check here: a
    # release is judged by what it would run, whatever its number.
    failed: frozenset[str] = frozenset()
    # Install only a release with provenance signed by a pinned key.
    require_provenance: bool = False


@dataclass(frozen=True)
class Latest:
    """The release number the host's TUF entry names."""

    version: int
    new: bool  # False: it runs already; nothing to fetch


@dataclass(frozen=True)
class Expected:
    """What the host's TUF entry says the release file is."""

    length: int
    sha256: str


@dataclass(frozen=True)
class Downloaded:
    """What was actually received for an artifact."""

    source: str  # where it was read from, for messages
    size: int
    sha256: str


def expired(release: Release, now: datetime) -> bool:
    """A release is dead from its expiry on: the boundary itself is expired."""
    return release.expires <= now


def check_release(release: Release, pinned: Pinned, now: datetime, *, number: int) -> Artifact:
    """The artifact this host would run from ``release``, read as its release
    ``number``, or :class:`RefusalError`.

    The host is checked first: another host's genuine release is named as such
    whatever its version."""
    if release.host != pinned.host:
        raise RefusalError(
            Reason.WRONG_HOST, f"release is for host {release.host!r}, this is {pinned.host!r}"
        )
    if release.version != number:
        raise RefusalError(
            Reason.WRONG_VERSION,
            f"{release_path(pinned.host, number)} holds release {release.version}, not {number}",
        )
    if release.version <= pinned.running:
        raise RefusalError(
            Reason.ROLLBACK, f"version {release.version} is not newer than the running {pinned.running}"
        )
    if expired(release, now):
        raise RefusalError(
            Reason.EXPIRED, f"release {release.version} expired at {release.expires.isoformat()}"
        )
    art = release.artifact(pinned.format)
    if art is None:
        raise RefusalError(Reason.NO_ARTIFACT, f"release {release.version} has no {pinned.format} artifact")
    if art.sha256 in pinned.failed:
        raise RefusalError(
            Reason.FAILED_BEFORE,
            f"release {release.version} runs {art.sha256[:12]}, which failed its health check here before",
        )
    return art


@dataclass(frozen=True)
class Attested:
    """An attestation that checked out: its statement, who signed it, what it says."""

    statement: provenance.Statement
    keyid: str
    summary: provenance.ProvenanceSummary | provenance.SbomSummary


def verify_envelope(envelope: provenance.Envelope, keys: Sequence[Key], source: str) -> str:
    """The keyid of the key of ``keys`` whose signature over the envelope's
    pre-authentication encoding holds (securesystemslib verifies), or VerificationError."""
    signatures = {s.keyid: KeySignature(s.keyid, s.sig.hex(), dict(s.extra)) for s in envelope.signatures}
    checked = dsse.Envelope(envelope.payload, envelope.payload_type, signatures)
    try:
        accepted = checked.verify(list(keys), 1)
    except Exception as exc:
        # The signature and its headers are the store's bytes: whatever a key type's
        # parser makes of them, they are not a good signature by a pinned key.
        known = {k.keyid for k in keys} & set(signatures)
        why = "no signature by a pinned key" if not known else f"bad signature ({type(exc).__name__})"
        raise VerificationError(f"{source}: {why}") from None
    return next(iter(accepted))


def check_attestation(
    kind: AttestationKind, data: bytes, release: Release, keys: Sequence[Key], source: str
) -> Attested:
    """Check the attestation ``kind`` of ``release``, whose bytes are ``data``: a DSSE
    envelope of an in-toto statement, signed by one of ``keys``, of the predicate type
    of ``kind``, about exactly the release's artifacts (and, for provenance, its host,
    commit and derivation), the very bytes the release names. RefusalError:
    NO_PROVENANCE when the release names none, TAMPERED when ``data`` are not the bytes
    it names (saying the first thing found wrong), else BAD_PROVENANCE."""
    ref = release.attestation(kind)
    if ref is None:
        raise RefusalError(Reason.NO_PROVENANCE, f"release {release.version} names no {kind} attestation")
    digest = hashlib.sha256(data).hexdigest()
    # Bytes other than those the trusted release names are the store's fault (or the
    # network's), not the release's, and another read may bring the right ones: such a
    # refusal is TAMPERED, whatever is found wrong with them first.
    tampered = len(data) != ref.size or digest != ref.sha256
    try:
        envelope = provenance.parse_envelope(data, source)
        if envelope.payload_type != provenance.PAYLOAD_TYPE:
            raise VerificationError(
                f"{source}: payloadType is {envelope.payload_type!r}, not {provenance.PAYLOAD_TYPE!r}"
            )
        keyid = verify_envelope(envelope, keys, source)
        statement = provenance.parse_statement(envelope.payload, source)
        want = provenance.PREDICATE_TYPES[kind]
        if statement.predicate_type != want:
            raise VerificationError(f"{source}: predicateType is {statement.predicate_type!r}, not {want!r}")
        provenance.check_subjects(statement, release, source)
        summary: provenance.ProvenanceSummary | provenance.SbomSummary = (
            provenance.read_provenance(statement, release, source)
            if kind is AttestationKind.PROVENANCE
            else provenance.read_sbom(statement, source)
        )
        # Signed by the publisher and about these artifacts, yet maybe of another build
        # of them (a reproducible build gives the same bytes from another commit): it
        # must be the one the release names.
        if tampered:
            raise VerificationError(
                f"{source}: {len(data)} bytes, sha256 {digest}; "
                f"the release says {ref.size} bytes, sha256 {ref.sha256}"
            )
    except VerificationError as exc:
        raise RefusalError(Reason.TAMPERED if tampered else Reason.BAD_PROVENANCE, str(exc)) from None
    return Attested(statement, keyid, summary)


class TrustedState:
    """What one poll trusts so far; see the module's docstring for the order."""

    def __init__(self, pinned: Pinned, now: datetime) -> None:
        self.pinned = pinned
        self.reference_time = now
        self._latest: Latest | None = None
        self._release: Release | None = None
        self._artifact: Artifact | None = None
        self._provenance: Attested | None = None

    @property
    def latest(self) -> Latest | None:
        return self._latest

    @property
    def release(self) -> Release | None:
        return self._release

    @property
    def artifact(self) -> Artifact | None:
        """The artifact to install, once its bytes were checked."""
        return self._artifact

    def update_target(self, version: int | None) -> Latest:
        """Take the release number of the host's verified TUF entry."""
        if self._release is not None:
            raise RuntimeError("the entry cannot change once a release is trusted")
        if version is None:
            raise RefusalError(Reason.MALFORMED, f"{target_path(self.pinned.host)}: no valid release number")
        self._latest = Latest(version, version != self.pinned.running)
        return self._latest

    def update_release(self, data: bytes, expected: Expected) -> Release:
        """Take ``releases/<N>.json`` (N from the entry), which must be the bytes the
        entry describes and the release it numbers."""
        if self._latest is None:
            raise RuntimeError("a release needs the host's entry first")
        if not self._latest.new:
            raise RuntimeError(f"the entry names version {self._latest.version}, which runs already")
        if self._release is not None:
            raise RuntimeError("a release is trusted already")
        key = release_path(self.pinned.host, self._latest.version)
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != expected.length or digest != expected.sha256:
            raise RefusalError(
                Reason.TAMPERED,
                f"{key}: {len(data)} bytes, sha256 {digest}; the signed entry says "
                f"{expected.length} bytes, sha256 {expected.sha256}",
            )
        try:
            release = parse_release(data, key)
        except VerificationError as exc:
            raise RefusalError(Reason.MALFORMED, str(exc)) from None
        check_release(release, self.pinned, self.reference_time, number=self._latest.version)
        self._release = release
        return release

    @property
    def provenance(self) -> Attested | None:
        return self._provenance

    def update_provenance(self, data: bytes | None, keys: Sequence[Key], source: str) -> Attested:
        """Take the release's provenance: ``data``, read from where the release says,
        or None when it names none."""
        if self._release is None:
            raise RuntimeError("provenance needs a trusted release first")
        if self._provenance is not None:
            raise RuntimeError("the provenance was taken already")
        if (data is None) != (self._release.attestation(AttestationKind.PROVENANCE) is None):
            raise RuntimeError("provenance read where the release names none, or not read where it does")
        if data is None:
            raise RefusalError(
                Reason.NO_PROVENANCE,
                f"release {self._release.version} names no provenance, and this host requires it",
            )
        self._provenance = check_attestation(AttestationKind.PROVENANCE, data, self._release, keys, source)
        return self._provenance

    def update_artifact(self, got: Downloaded) -> Artifact:
        """Take the size and sha256 of the downloaded artifact."""
        if self._release is None:
            raise RuntimeError("an artifact needs a trusted release first")
        if self.pinned.require_provenance and self._provenance is None:
            raise RuntimeError("an artifact needs the release's provenance first")
        if self._artifact is not None:
            raise RuntimeError("the artifact was taken already")
        art = self._release.artifact(self.pinned.format)
        assert art is not None  # check_release made sure
        if got.size != art.size:
            raise RefusalError(Reason.TAMPERED, f"{got.source}: {got.size} bytes, release says {art.size}")
        if got.sha256 != art.sha256:
            raise RefusalError(
                Reason.TAMPERED, f"{got.source}: sha256 {got.sha256}, release says {art.sha256}"
            )
        self._artifact = art
        return art
