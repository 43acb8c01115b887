"""Release metadata: the signed statement of what a host should run.

Pure functions on frozen dataclasses. The JSON form is canonical (sorted keys, fixed
indentation) so that the same release always serialises to the same bytes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from reconciler.core.formats import Kind
from reconciler.core.hosts import NAME_RE
from reconciler.core.layout import AttestationKind, attestation_path, blob_path
from reconciler.errors import VerificationError

SCHEMA = "reconciler.release/v1"
KINDS = frozenset(k.value for k in Kind)
ATTESTATION_KINDS = frozenset(k.value for k in AttestationKind)
HEX64 = re.compile(r"^[0-9a-f]{64}$")
COMMIT_RE = re.compile(r"^[0-9a-f]{40}([0-9a-f]{24})?$")
# What the agent writes to disk under a signed name: one plain file name, nothing a
# path, a terminal or a C string (NUL) would read differently.
ARTIFACT_NAME_RE = re.compile(r"^(?!\.)[A-Za-z0-9._+-]{1,255}$")
NAME_RULE = (
    "must be a plain file name (1 to 255 letters, digits, '.', '_', '+' or '-', not starting with '.')"
)
# The most bytes of a release file (or latest.json) anyone reads. to_json writes at
# most one artifact per Kind (8) and one attestation per AttestationKind (2), each a
# few hundred bytes even with a 255-character name: under 8 KiB. The rest is room for
# releases of a future schema; an agent reads them with this limit too
# (reconciler.agent.verify), so the daemon must not accept a larger one as its own.
RELEASE_LIMIT = 1 << 20
# A size a file, an S3 object or a TUF target length can have: one past it (10**400,
# written into a tampered release file) would break whoever does arithmetic with it.
MAX_SIZE = (1 << 63) - 1


@dataclass(frozen=True)
class Artifact:
    format: str
    name: str
    size: int
    sha256: str

    @property
    def blob(self) -> str:
        return blob_path(self.sha256)


@dataclass(frozen=True)
class Attestation:
    """An in-toto attestation of the release (reconciler.core.provenance), stored at
    ``path`` beside the release file: the release's signature covers its digest."""

    kind: AttestationKind
    path: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Release:
    host: str
    version: int
    commit: str
    derivation: str
    created: datetime
    expires: datetime
    artifacts: tuple[Artifact, ...]
    # Releases published before provenance have none, and their JSON no such key.
    attestations: tuple[Attestation, ...] = ()

    def to_json(self) -> bytes:
        doc = {
            "schema": SCHEMA,
            "host": self.host,
            "version": self.version,
            "commit": self.commit,
            "derivation": self.derivation,
            "created": format_time(self.created),
            "expires": format_time(self.expires),
            "artifacts": [
                {"format": a.format, "name": a.name, "size": a.size, "sha256": a.sha256, "blob": a.blob}
                for a in self.artifacts
            ],
        }
        if self.attestations:
            doc["attestations"] = [
                {"kind": a.kind.value, "path": a.path, "size": a.size, "sha256": a.sha256}
                for a in self.attestations
            ]
        return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode()

    def artifact(self, fmt: str) -> Artifact | None:
        return next((a for a in self.artifacts if a.format == fmt), None)

    def attestation(self, kind: AttestationKind) -> Attestation | None:
        return next((a for a in self.attestations if a.kind == kind), None)


def format_time(t: datetime) -> str:
    # Not strftime: its %Y leaves years before 1000 unpadded, which parse_time refuses.
    return t.astimezone(UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def parse_time(s: str) -> datetime:
    t = datetime.fromisoformat(s.replace("Z", "+00:00"))
    if t.tzinfo is None:
        raise ValueError(f"{s!r} has no time zone")
    if t.microsecond:
        # The canonical form has whole seconds: a fraction would not survive it.
        raise ValueError(f"{s!r} has a fraction of a second")
    return t.astimezone(UTC)


def new_release(
    host: str,
    version: int,
    commit: str,
    derivation: str,
    artifacts: tuple[Artifact, ...],
    now: datetime,
    lifetime: timedelta,
) -> Release:
    now = now.astimezone(UTC).replace(microsecond=0)
    return Release(
        host=host,
        version=version,
        commit=commit,
        derivation=derivation,
        created=now,
        expires=now + lifetime,
        artifacts=tuple(sorted(artifacts, key=lambda a: a.format)),
    )


def parse_release(data: bytes, source: str) -> Release:
    """Parse and validate release JSON; errors name ``source`` and the key."""

    def bad(key: str, why: str) -> VerificationError:
        return VerificationError(f"{source}: {key}: {why}" if key else f"{source}: {why}")

    def unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        # Two readers of a document with a repeated key may each take a different one.
        obj: dict[str, Any] = {}
        for k, v in pairs:
            if k in obj:
                raise bad("", f"key {k!r} appears more than once")
            obj[k] = v
        return obj

    try:
        doc = json.loads(data, object_pairs_hook=unique)
    except (ValueError, UnicodeDecodeError) as exc:
        raise bad("", f"not valid JSON ({exc})") from None
    except RecursionError:
        raise bad("", "not valid JSON (nested too deeply)") from None
    if not isinstance(doc, dict):
        raise bad("", "must be a JSON object")
    if doc.get("schema") != SCHEMA:
        raise bad("schema", f"expected {SCHEMA!r}, got {doc.get('schema')!r}")

    def field(key: str, kind: type) -> Any:
        v = doc.get(key)
        if not isinstance(v, kind) or isinstance(v, bool):
            raise bad(key, f"must be a {kind.__name__}")
        return v

    host = field("host", str)
    if not NAME_RE.fullmatch(host):
        raise bad("host", f"must be a host name ({NAME_RE.pattern})")
    version = field("version", int)
    if version < 1:
        raise bad("version", "must be >= 1")
    commit = field("commit", str)
    if not COMMIT_RE.fullmatch(commit):
        raise bad("commit", "must be a full git commit id")
    derivation = field("derivation", str)
    if not derivation.isprintable():
        raise bad("derivation", "must not contain control or unprintable characters")
    times = {}
    for key in ("created", "expires"):
        try:
            times[key] = parse_time(field(key, str))
        except (ValueError, OverflowError) as exc:
            raise bad(key, str(exc)) from None
    arts: list[Artifact] = []
    for i, a in enumerate(field("artifacts", list)):
        key = f"artifacts[{i}]"
        if not isinstance(a, dict):
            raise bad(key, "must be an object")
        fmt, name, size, sha = a.get("format"), a.get("name"), a.get("size"), a.get("sha256")
        if not isinstance(fmt, str) or fmt not in KINDS:
            raise bad(f"{key}.format", f"unknown format {fmt!r}")
        if any(other.format == fmt for other in arts):
            raise bad(f"{key}.format", f"a second {fmt!r} artifact")
        if not isinstance(name, str) or not ARTIFACT_NAME_RE.fullmatch(name):
            raise bad(f"{key}.name", NAME_RULE)
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_SIZE:
            raise bad(f"{key}.size", "must be a non-negative integer below 2**63")
        if not isinstance(sha, str) or not HEX64.fullmatch(sha):
            raise bad(f"{key}.sha256", "must be 64 lowercase hex digits")
        if a.get("blob") != blob_path(sha):
            raise bad(f"{key}.blob", f"must be {blob_path(sha)!r}")
        arts.append(Artifact(format=fmt, name=name, size=size, sha256=sha))
    atts: list[Attestation] = []
    raw = doc.get("attestations", [])
    if not isinstance(raw, list):
        raise bad("attestations", "must be a list")
    for i, a in enumerate(raw):
        key = f"attestations[{i}]"
        if not isinstance(a, dict):
            raise bad(key, "must be an object")
        kind, path, size, sha = a.get("kind"), a.get("path"), a.get("size"), a.get("sha256")
        if not isinstance(kind, str) or kind not in ATTESTATION_KINDS:
            raise bad(f"{key}.kind", f"unknown attestation {kind!r}")
        if any(other.kind == kind for other in atts):
            raise bad(f"{key}.kind", f"a second {kind!r} attestation")
        where = attestation_path(host, version, AttestationKind(kind))
        if path != where:
            raise bad(f"{key}.path", f"must be {where!r}")
        if not isinstance(size, int) or isinstance(size, bool) or not 0 <= size <= MAX_SIZE:
            raise bad(f"{key}.size", "must be a non-negative integer below 2**63")
        if not isinstance(sha, str) or not HEX64.fullmatch(sha):
            raise bad(f"{key}.sha256", "must be 64 lowercase hex digits")
        atts.append(Attestation(AttestationKind(kind), where, size, sha))
    return Release(
        host=host,
        version=version,
        commit=commit,
        derivation=derivation,
        created=times["created"],
        expires=times["expires"],
        artifacts=tuple(arts),
        attestations=tuple(atts),
    )
