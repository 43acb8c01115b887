"""How a release was built and what went into it: two in-toto attestations. Pure.

Each release gets two in-toto Statements (https://in-toto.io/Statement/v1) whose
subjects are its artifacts by sha256, each wrapped in a DSSE envelope signed by the
publisher and stored beside the release (reconciler.core.layout):

- provenance: SLSA provenance v1 (https://slsa.dev/provenance/v1): what was built
  from which commit of which repository for which host (external parameters), with
  what (the commit, the Nix library and toolchain by digest, every store path of the
  build's closure by the sha256 of its NAR), by whom (the daemon's and Nix's versions,
  the builder the build ran on) and when;
- sbom: an SPDX 2.3 document (https://spdx.dev/Document/v2.3): the artifacts, the
  closure's store paths, and the Debian packages the toolchain was made from.

The envelope is DSSE v1 as securesystemslib writes and reads it, so in-toto's and
securesystemslib's tooling verifies it: ``payloadType`` is in-toto's, and a gpg
signature is securesystemslib's GPGSigner's (an OpenPGP v4 signature over the
pre-authentication encoding: ``keyid`` the key's fingerprint, ``sig`` the signature
value, ``other_headers`` the hashed part of the signature packet).

This module builds, serialises and parses; the daemon gathers the facts and signs
(reconciler.daemon.attest), the agent and `reconciler verify` check signatures
(reconciler.core.trust). It imports no securesystemslib: the daemon's plan imports it.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from reconciler.core.layout import AttestationKind
from reconciler.core.release import HEX64, Release, format_time, parse_time
from reconciler.errors import VerificationError

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
SLSA_PROVENANCE = "https://slsa.dev/provenance/v1"
SPDX_DOCUMENT = "https://spdx.dev/Document/v2.3"
PREDICATE_TYPES: Mapping[AttestationKind, str] = {
    AttestationKind.PROVENANCE: SLSA_PROVENANCE,
    AttestationKind.SBOM: SPDX_DOCUMENT,
}
# Ours (README, "Provenance"): a host image built by nix/fleet.nix from a host file of
# a config repository, and the daemon that builds, signs and publishes it.
BUILD_TYPE = "urn:reconciler:build-type:nix-host-image:v1"
BUILDER_ID = "urn:reconciler:builder:daemon"
# A store path's digest is the sha256 of its NAR serialisation (as Nix's narHash).
NAR_MEDIA_TYPE = "application/x-nix-nar"

# A host's closure is tens to a few thousand store paths, about 200 bytes each.
ATTESTATION_LIMIT = 16 << 20
MAX_SIGNATURES = 16
_STORE_PATH = re.compile(r"^/[^\0\n]*/[0-9a-z]{32}-([A-Za-z0-9+._?=-]+)$")
_KEYID = re.compile(r"^[0-9a-f]{8,128}$")


class Role(StrEnum):
    """How a Debian package went into the toolchain (nix/toolchain/import-debian.sh)."""

    CONTAINED = "contained"  # a staged file was copied from it
    BUILT_WITH = "built-with"  # the runtime was compiled with it


class ReproStatus(StrEnum):
    """Whether the image was built twice and compared before signing (the gate,
    ``reproducibility: {check: true}``). A release whose second build differs is never
    signed, so no provenance says "mismatch"."""

    NOT_RUN = "not run"
    PASSED = "passed"


@dataclass(frozen=True)
class Reproducibility:
    status: ReproStatus = ReproStatus.NOT_RUN
    where: tuple[str, ...] = ()  # the builders that built it again ("local": the daemon's machine)
    # The derivations of the closure built twice with equal bytes (in this pass, or
    # earlier by the same daemon process: the same output path, reproduced then).
    derivations: int = 0

    def describe(self) -> str:
        if self.status is ReproStatus.NOT_RUN:
            return self.status.value
        return (
            f"{self.status.value}: {self.derivations} derivations built again on "
            f"{', '.join(self.where)} gave the same bytes"
        )


@dataclass(frozen=True)
class DebianPackage:
    name: str
    version: str
    architecture: str
    role: Role

    @property
    def purl(self) -> str:
        version = urllib.parse.quote(self.version, safe="")
        return f"pkg:deb/debian/{self.name}@{version}?arch={self.architecture}"


@dataclass(frozen=True)
class StorePath:
    path: str
    nar_sha256: str  # hex
    nar_size: int

    @property
    def name(self) -> str:
        """The name after the hash: ``site`` of ``/nix/store/<hash>-site``."""
        m = _STORE_PATH.fullmatch(self.path)
        return m.group(1) if m else self.path.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class NixInputs:
    """What went into a build, as Nix and the staged toolchain say (ports.Nix.inputs)."""

    nix_version: str
    library_digest: str  # sha256 over the nix/ library's files
    toolchain: str  # "debian" or "nixpkgs"
    toolchain_digest: str | None  # sha256 over the staged toolchain; None for nixpkgs
    debian_packages: tuple[DebianPackage, ...]
    # Every store path the build used or made (the outputs of the derivation's closure).
    closure: tuple[StorePath, ...]
    # The derivation's own outputs (of the closure): where the artifacts are.
    outputs: tuple[str, ...]


@dataclass(frozen=True)
class BuildRecord:
    """The facts of one host build, gathered by the daemon."""

    repository: str  # the config repository's URL, without credentials (core.urls)
    branch: str
    commit: str
    host: str
    derivation: str
    inputs: NixInputs
    reconciler_version: str
    builder: str | None  # where Nix built the image; None: it was in the store already
    builder_uri: str | None  # a remote builder's URI
    invocation_id: str
    started: datetime
    finished: datetime
    reproducibility: Reproducibility = field(default_factory=Reproducibility)


@dataclass(frozen=True)
class Subject:
    name: str
    sha256: str


@dataclass(frozen=True)
class Statement:
    subjects: tuple[Subject, ...]
    predicate_type: str
    predicate: Mapping[str, Any]

    def to_json(self) -> bytes:
        doc = {
            "_type": STATEMENT_TYPE,
            "subject": [{"name": s.name, "digest": {"sha256": s.sha256}} for s in self.subjects],
            "predicateType": self.predicate_type,
            "predicate": self.predicate,
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Signature:
    keyid: str
    sig: bytes
    # The signature's other fields, kept as they are (a gpg signature's other_headers).
    extra: tuple[tuple[str, str], ...] = ()

    def to_dict(self) -> dict[str, str]:
        return {**dict(self.extra), "keyid": self.keyid, "sig": base64.standard_b64encode(self.sig).decode()}


@dataclass(frozen=True)
class Envelope:
    """A DSSE envelope (https://github.com/secure-systems-lab/dsse, protocol v1)."""

    payload: bytes
    payload_type: str
    signatures: tuple[Signature, ...] = ()

    def pae(self) -> bytes:
        return pae(self.payload_type, self.payload)

    def to_json(self) -> bytes:
        doc = {
            "payload": base64.standard_b64encode(self.payload).decode(),
            "payloadType": self.payload_type,
            "signatures": [s.to_dict() for s in self.signatures],
        }
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding: what is signed, binding the payload to its type."""
    kind = payload_type.encode()
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def envelope(statement: Statement) -> Envelope:
    """``statement`` in an envelope, unsigned."""
    return Envelope(statement.to_json(), PAYLOAD_TYPE)


# -- the two statements ---------------------------------------------------------------------


def _subjects(release: Release) -> tuple[Subject, ...]:
    return tuple(Subject(a.name, a.sha256) for a in release.artifacts)


def _nar(p: StorePath) -> dict[str, Any]:
    return {"name": p.path, "digest": {"sha256": p.nar_sha256}, "mediaType": NAR_MEDIA_TYPE}


def provenance(release: Release, record: BuildRecord) -> Statement:
    """The SLSA v1 provenance of ``release``, built as ``record`` says."""
    inputs = record.inputs
    dependencies: list[dict[str, Any]] = [
        {
            "uri": f"git+{record.repository}@refs/heads/{record.branch}",
            "digest": {"gitCommit": record.commit},
        },
        {"name": "reconciler-nix-library", "digest": {"sha256": inputs.library_digest}},
    ]
    if inputs.toolchain_digest is not None:
        dependencies.append(
            {
                "name": f"reconciler-toolchain-{inputs.toolchain}",
                "digest": {"sha256": inputs.toolchain_digest},
            }
        )
    dependencies += [_nar(p) for p in inputs.closure if p.path not in inputs.outputs]
    builder: dict[str, Any] = {
        "name": record.builder or "none",
        "annotations": {"role": "nix-builder", "built": record.builder is not None},
    }
    if record.builder_uri:
        builder["uri"] = record.builder_uri
    output = [_nar(p) for p in inputs.closure if p.path in inputs.outputs]
    predicate: dict[str, Any] = {
        "buildDefinition": {
            "buildType": BUILD_TYPE,
            "externalParameters": {
                "repository": record.repository,
                "branch": record.branch,
                "commit": record.commit,
                "host": record.host,
            },
            "internalParameters": {
                "derivation": record.derivation,
                "version": release.version,
                "toolchain": inputs.toolchain,
                "reproducibility": {
                    "status": record.reproducibility.status.value,
                    "where": list(record.reproducibility.where),
                    "derivations": record.reproducibility.derivations,
                },
            },
            "resolvedDependencies": dependencies,
        },
        "runDetails": {
            "builder": {
                "id": BUILDER_ID,
                "version": {"reconciler": record.reconciler_version, "nix": inputs.nix_version},
                "builderDependencies": [builder],
            },
            "metadata": {
                "invocationId": record.invocation_id,
                "startedOn": format_time(record.started),
                "finishedOn": format_time(record.finished),
            },
            "byproducts": output,
        },
    }
    return Statement(_subjects(release), SLSA_PROVENANCE, predicate)


def sbom(release: Release, record: BuildRecord) -> Statement:
    """The SPDX 2.3 SBOM of ``release``: its artifacts, generated from the build's
    closure, and the Debian packages in (or used to make) its toolchain."""
    packages: list[dict[str, Any]] = []
    relationships: list[dict[str, str]] = []

    def relate(a: str, kind: str, b: str) -> None:
        relationships.append({"spdxElementId": a, "relationshipType": kind, "relatedSpdxElement": b})

    artifacts = [f"SPDXRef-Artifact-{i}" for i in range(len(release.artifacts))]
    for spdx_id, art in zip(artifacts, release.artifacts, strict=True):
        packages.append(
            {
                "SPDXID": spdx_id,
                "name": art.name,
                "downloadLocation": "NOASSERTION",
                "filesAnalyzed": False,
                "checksums": [{"algorithm": "SHA256", "checksumValue": art.sha256}],
                "comment": f"release artifact of format {art.format}",
            }
        )
        relate("SPDXRef-DOCUMENT", "DESCRIBES", spdx_id)
    toolchain = None
    for i, p in enumerate(record.inputs.closure):
        spdx_id = f"SPDXRef-StorePath-{i}"
        packages.append(
            {
                "SPDXID": spdx_id,
                "name": p.name,
                "downloadLocation": "NOASSERTION",
                "filesAnalyzed": False,
                "checksums": [{"algorithm": "SHA256", "checksumValue": p.nar_sha256}],
                "comment": f"Nix store path {p.path}; the checksum is of its NAR serialisation",
            }
        )
        for artifact in artifacts:
            if p.path in record.inputs.outputs:
                relate(spdx_id, "CONTAINS", artifact)
            else:
                relate(artifact, "GENERATED_FROM", spdx_id)
        if p.name == "reconciler-toolchain":
            toolchain = spdx_id
    for i, deb in enumerate(record.inputs.debian_packages):
        spdx_id = f"SPDXRef-Debian-{i}"
        packages.append(
            {
                "SPDXID": spdx_id,
                "name": deb.name,
                "versionInfo": deb.version,
                "supplier": "Organization: Debian",
                "downloadLocation": "NOASSERTION",
                "filesAnalyzed": False,
                "externalRefs": [
                    {
                        "referenceCategory": "PACKAGE-MANAGER",
                        "referenceType": "purl",
                        "referenceLocator": deb.purl,
                    }
                ],
                "comment": f"Debian package {deb.role.value} the toolchain",
            }
        )
        if toolchain is not None:
            if deb.role is Role.CONTAINED:
                relate(toolchain, "CONTAINS", spdx_id)
            else:
                relate(spdx_id, "BUILD_TOOL_OF", toolchain)
    document = {
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": f"{release.host}-{release.version}",
        "documentNamespace": f"urn:reconciler:sbom:{release.host}:{release.version}:{record.invocation_id}",
        "creationInfo": {
            "created": format_time(record.finished),
            "creators": [f"Tool: reconciler-{record.reconciler_version}"],
        },
        "packages": packages,
        "relationships": relationships,
    }
    return Statement(_subjects(release), SPDX_DOCUMENT, document)


def statements(release: Release, record: BuildRecord) -> dict[AttestationKind, Statement]:
    return {
        AttestationKind.PROVENANCE: provenance(release, record),
        AttestationKind.SBOM: sbom(release, record),
    }


# -- reading ------------------------------------------------------------------------------------


def _json_object(data: bytes, source: str) -> dict[str, Any]:
    def bad(why: str) -> VerificationError:
        return VerificationError(f"{source}: {why}")

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # Two readers of a document with a repeated key may each take a different one.
        obj: dict[str, Any] = {}
        for k, v in pairs:
            if k in obj:
                raise bad(f"key {k!r} appears more than once")
            obj[k] = v
        return obj

    if len(data) > ATTESTATION_LIMIT:
        raise bad(f"larger than {ATTESTATION_LIMIT} bytes")
    try:
        doc = json.loads(data, object_pairs_hook=unique)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad(f"not valid JSON ({exc})") from None
    except RecursionError:
        raise bad("not valid JSON (nested too deeply)") from None
    if not isinstance(doc, dict):
        raise bad("must be a JSON object")
    return doc


def _base64(text: Any, source: str, key: str) -> bytes:
    """Standard or URL-safe base64, as DSSE allows; nothing else."""
    if not isinstance(text, str):
        raise VerificationError(f"{source}: {key}: must be a base64 string")
    try:
        raw = text.encode("ascii")
        alt = b"-_" if b"-" in raw or b"_" in raw else None
        return base64.b64decode(raw, altchars=alt, validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise VerificationError(f"{source}: {key}: must be a base64 string") from None


def parse_envelope(data: bytes, source: str) -> Envelope:
    """A DSSE envelope, checked for shape only (its signatures: reconciler.core.trust)."""
    doc = _json_object(data, source)
    payload = _base64(doc.get("payload"), source, "payload")
    payload_type = doc.get("payloadType")
    if not isinstance(payload_type, str):
        raise VerificationError(f"{source}: payloadType: must be a string")
    raw = doc.get("signatures")
    if not isinstance(raw, list) or not raw:
        raise VerificationError(f"{source}: signatures: must be a non-empty list")
    if len(raw) > MAX_SIGNATURES:
        raise VerificationError(f"{source}: signatures: more than {MAX_SIGNATURES}")
    signatures: list[Signature] = []
    for i, s in enumerate(raw):
        key = f"signatures[{i}]"
        if not isinstance(s, dict):
            raise VerificationError(f"{source}: {key}: must be an object")
        keyid = s.get("keyid")
        if not isinstance(keyid, str) or not _KEYID.fullmatch(keyid):
            raise VerificationError(f"{source}: {key}.keyid: must be a lowercase hex key id")
        sig = _base64(s.get("sig"), source, f"{key}.sig")
        extra = tuple(sorted((k, v) for k, v in s.items() if k not in ("keyid", "sig")))
        for k, v in extra:
            if not isinstance(v, str):
                raise VerificationError(f"{source}: {key}.{k}: must be a string")
        if any(other.keyid == keyid for other in signatures):
            raise VerificationError(f"{source}: {key}.keyid: a second signature by {keyid}")
        signatures.append(Signature(keyid, sig, extra))
    return Envelope(payload, payload_type, tuple(signatures))


def parse_statement(payload: bytes, source: str) -> Statement:
    """An in-toto Statement v1 whose every subject has a sha256."""
    doc = _json_object(payload, source)
    if doc.get("_type") != STATEMENT_TYPE:
        raise VerificationError(f"{source}: _type: expected {STATEMENT_TYPE!r}, got {doc.get('_type')!r}")
    raw = doc.get("subject")
    if not isinstance(raw, list) or not raw:
        raise VerificationError(f"{source}: subject: must be a non-empty list")
    subjects = []
    for i, s in enumerate(raw):
        key = f"subject[{i}]"
        if not isinstance(s, dict) or not isinstance(s.get("name"), str):
            raise VerificationError(f"{source}: {key}: must be an object with a name")
        digest = s.get("digest")
        sha = digest.get("sha256") if isinstance(digest, dict) else None
        if not isinstance(sha, str) or not HEX64.fullmatch(sha):
            raise VerificationError(f"{source}: {key}.digest.sha256: must be 64 lowercase hex digits")
        subjects.append(Subject(s["name"], sha))
    predicate_type = doc.get("predicateType")
    if not isinstance(predicate_type, str):
        raise VerificationError(f"{source}: predicateType: must be a string")
    predicate = doc.get("predicate")
    if not isinstance(predicate, dict):
        raise VerificationError(f"{source}: predicate: must be an object")
    return Statement(tuple(subjects), predicate_type, predicate)


def check_subjects(statement: Statement, release: Release, source: str) -> None:
    """The statement's subjects must be exactly the release's artifacts, by name and sha256."""
    claimed = {s.name: s.sha256 for s in statement.subjects}
    for art in release.artifacts:
        sha = claimed.pop(art.name, None)
        if sha is None:
            raise VerificationError(f"{source}: no subject for artifact {art.name}")
        if sha != art.sha256:
            raise VerificationError(
                f"{source}: subject {art.name} has sha256 {sha}, the release says {art.sha256}"
            )
    if claimed:
        raise VerificationError(f"{source}: subject {min(claimed)} is not an artifact of the release")


@dataclass(frozen=True)
class ProvenanceSummary:
    """What an operator reads of a verified provenance (`reconciler verify --provenance`)."""

    repository: str
    branch: str
    commit: str
    host: str
    derivation: str
    builder: str
    built: bool
    versions: Mapping[str, str]
    invocation_id: str
    started: datetime
    finished: datetime
    dependencies: int
    store_paths: int
    reproducibility: str


def _at(doc: Any, source: str, *path: str) -> Any:
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            raise VerificationError(f"{source}: predicate.{'.'.join(path)}: missing")
        doc = doc[key]
    return doc


def _string(doc: Any, source: str, *path: str) -> str:
    v = _at(doc, source, *path)
    if not isinstance(v, str) or not v.isprintable():
        raise VerificationError(f"{source}: predicate.{'.'.join(path)}: must be a printable string")
    return v


def read_provenance(statement: Statement, release: Release, source: str) -> ProvenanceSummary:
    """The provenance of ``release``: refused unless it is SLSA v1 of our build type and
    names the release's host, commit and derivation."""
    if statement.predicate_type != SLSA_PROVENANCE:
        raise VerificationError(
            f"{source}: predicateType: expected {SLSA_PROVENANCE!r}, got {statement.predicate_type!r}"
        )
    p = statement.predicate
    build_type = _string(p, source, "buildDefinition", "buildType")
    if build_type != BUILD_TYPE:
        raise VerificationError(f"{source}: buildType: expected {BUILD_TYPE!r}, got {build_type!r}")
    ext = ("buildDefinition", "externalParameters")
    said = {
        "host": (_string(p, source, *ext, "host"), release.host),
        "commit": (_string(p, source, *ext, "commit"), release.commit),
        "derivation": (
            _string(p, source, "buildDefinition", "internalParameters", "derivation"),
            release.derivation,
        ),
    }
    for what, (claim, actual) in said.items():
        if claim != actual:
            raise VerificationError(
                f"{source}: it is the provenance of {what} {claim}, the release says {actual}"
            )
    deps = _at(p, source, "buildDefinition", "resolvedDependencies")
    if not isinstance(deps, list):
        raise VerificationError(f"{source}: predicate.buildDefinition.resolvedDependencies: must be a list")
    versions = _at(p, source, "runDetails", "builder", "version")
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        raise VerificationError(f"{source}: predicate.runDetails.builder.version: must map names to strings")
    builders = _at(p, source, "runDetails", "builder", "builderDependencies")
    builder = builders[0] if isinstance(builders, list) and builders else None
    if not isinstance(builder, dict):
        raise VerificationError(
            f"{source}: predicate.runDetails.builder.builderDependencies: must name the builder"
        )
    name = _string(builder, source, "name")
    built = _at(builder, source, "annotations", "built")
    times = {}
    for key in ("startedOn", "finishedOn"):
        try:
            times[key] = parse_time(_string(p, source, "runDetails", "metadata", key))
        except (ValueError, OverflowError) as exc:
            raise VerificationError(f"{source}: predicate.runDetails.metadata.{key}: {exc}") from None
    return ProvenanceSummary(
        repository=_string(p, source, *ext, "repository"),
        branch=_string(p, source, *ext, "branch"),
        commit=said["commit"][0],
        host=said["host"][0],
        derivation=said["derivation"][0],
        builder=name,
        built=built is True,
        versions=dict(versions),
        invocation_id=_string(p, source, "runDetails", "metadata", "invocationId"),
        started=times["startedOn"],
        finished=times["finishedOn"],
        dependencies=len(deps),
        store_paths=sum(1 for d in deps if isinstance(d, dict) and d.get("mediaType") == NAR_MEDIA_TYPE),
        reproducibility=_reproducibility(p, source).describe(),
    )


def _reproducibility(p: Any, source: str) -> Reproducibility:
    """What the provenance says of the reproducibility check (a provenance written
    before the gate has no ``derivations``)."""
    at = ("buildDefinition", "internalParameters", "reproducibility")
    status = _string(p, source, *at, "status")
    if status not in {s.value for s in ReproStatus}:
        raise VerificationError(f"{source}: predicate.{'.'.join(at)}.status: unknown status {status!r}")
    where = _at(p, source, *at).get("where", [])
    count = _at(p, source, *at).get("derivations", 0)
    if not isinstance(where, list) or not all(isinstance(w, str) and w.isprintable() for w in where):
        raise VerificationError(f"{source}: predicate.{'.'.join(at)}.where: must list builder names")
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise VerificationError(f"{source}: predicate.{'.'.join(at)}.derivations: must be a count")
    return Reproducibility(ReproStatus(status), tuple(where), count)


@dataclass(frozen=True)
class SbomSummary:
    packages: int
    store_paths: int
    debian: tuple[str, ...]  # name=version


def read_sbom(statement: Statement, source: str) -> SbomSummary:
    if statement.predicate_type != SPDX_DOCUMENT:
        raise VerificationError(
            f"{source}: predicateType: expected {SPDX_DOCUMENT!r}, got {statement.predicate_type!r}"
        )
    doc = statement.predicate
    if doc.get("spdxVersion") != "SPDX-2.3":
        raise VerificationError(f"{source}: predicate.spdxVersion: expected 'SPDX-2.3'")
    packages = doc.get("packages")
    if not isinstance(packages, list) or not all(isinstance(p, dict) for p in packages):
        raise VerificationError(f"{source}: predicate.packages: must be a list of objects")
    ids = [p.get("SPDXID") for p in packages]
    return SbomSummary(
        packages=len(packages),
        store_paths=sum(1 for i in ids if isinstance(i, str) and i.startswith("SPDXRef-StorePath-")),
        debian=tuple(
            f"{p.get('name')}={p.get('versionInfo')}"
            for p in packages
            if isinstance(p.get("SPDXID"), str) and p["SPDXID"].startswith("SPDXRef-Debian-")
        ),
    )


def parse_registrations(text: str) -> tuple[StorePath, ...]:
    """Store paths with their NAR hash and size, from ``nix-store --dump-db PATHS``
    (Nix's validity registrations: the path, its NAR's sha256 in hex, its NAR size, its
    deriver, the number of references and the references, a line each), sorted by
    path; ValueError if the text is not that."""
    lines = text.splitlines()
    out = []
    i = 0
    while i < len(lines):
        try:
            path, nar, size, refs = lines[i], lines[i + 1], int(lines[i + 2]), int(lines[i + 4])
        except (IndexError, ValueError):
            raise ValueError(f"line {i + 1}: not a validity registration") from None
        if not path.startswith("/") or not HEX64.fullmatch(nar) or size < 0 or refs < 0:
            raise ValueError(f"line {i + 1}: not a validity registration")
        out.append(StorePath(path, nar, size))
        i += 5 + refs
    if i != len(lines):
        raise ValueError("the last registration is cut short")
    return tuple(sorted(out, key=lambda p: p.path))


def parse_debian_packages(text: str) -> tuple[DebianPackage, ...]:
    """debian-packages.tsv as nix/toolchain/import-debian.sh writes it; ValueError
    naming the line that is not name, version, architecture and role."""
    roles = {r.value for r in Role}
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        cols = line.split("\t")
        if len(cols) != 4 or cols[3] not in roles or not all(c and c.isprintable() for c in cols):
            raise ValueError(f"line {n}: expected name, version, architecture and role")
        out.append(DebianPackage(cols[0], cols[1], cols[2], Role(cols[3])))
    return tuple(out)
