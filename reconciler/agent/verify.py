"""Verifying what the publisher put in a store, from a file path or URL (`reconciler verify`).

A release file (``*.json``) is checked against its signature, its expiry, and then
every artifact it lists is fetched from the same store and checked for size,
sha256 and signature; a thin ACI and an OCI image must name the blobs the release
lists beside them (reconciler.core.imagecheck). Any other file is checked against
its ``.asc``. An AppImage is also checked as the AppImage spec has it: the signature
embedded in ``.sha256_sig`` (over the hex SHA-256 of the file with that section and
``.sig_key`` zeroed) against the same keys, and ``.digest_md5`` against libappimage's
digest.

With ``provenance``, the release's attestations are checked too, by the agent's rule
(reconciler.core.trust.check_attestation): its SLSA provenance and its SBOM, each the
DSSE envelope the release names, signed by one of the keys, about exactly its
artifacts; what the provenance says is printed (where the bytes came from).
"""

from __future__ import annotations

import hashlib
import tarfile
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from reconciler.adapters import appimage, fetch
from reconciler.adapters.gpg import Verifier, read_keys
from reconciler.core import imagecheck, openpgp, trust
from reconciler.core.formats import Kind
from reconciler.core.layout import AttestationKind
from reconciler.core.provenance import ATTESTATION_LIMIT, ProvenanceSummary, SbomSummary
from reconciler.core.release import RELEASE_LIMIT, Release, format_time, parse_release
from reconciler.errors import VerificationError

# Release metadata and signatures are small; anything larger is not ours. A longer
# signature would be refused unread anyway (reconciler.core.openpgp): stop fetching there.
METADATA_LIMIT = RELEASE_LIMIT
SIGNATURE_LIMIT = openpgp.ARMORED_LIMIT
# A plain artifact checked on its own has no release to bound its size.
ARTIFACT_LIMIT = 1 << 40


def _release_path(target: str) -> tuple[str, str, int | None]:
    """The store root of a release file at .../hosts/<host>/(latest|releases/N).json,
    the host its path names, and N (None for latest.json)."""
    marker = "/hosts/"
    i = target.rfind(marker)
    if i < 0:
        raise VerificationError(f"{target}: not inside a store's hosts/ directory")
    host, _, rest = target[i + len(marker) :].partition("/")
    version = rest.removeprefix("releases/").removesuffix(".json")
    if rest == "latest.json":
        return target[:i], host, None
    if rest.startswith("releases/") and version.isascii() and version.isdigit():
        return target[:i], host, int(version)
    raise VerificationError(
        f"{target}: not a release file (hosts/HOST/latest.json or hosts/HOST/releases/N.json)"
    )


def verify(
    key_files: list[Path], target: str, now: datetime | None = None, provenance: bool = False
) -> list[str]:
    """Check ``target`` (with ``provenance``, a release's attestations too); return one
    line per verified object (and what the provenance says) or raise."""
    with Verifier(read_keys(key_files)) as verifier, tempfile.TemporaryDirectory(prefix="reconciler-") as tmp:
        if not target.endswith(".json"):
            if provenance:
                raise VerificationError(f"{target}: --provenance checks a release file, not an artifact")
            # The signature first: an artifact without one (or a server that serves one
            # endlessly) is refused before a byte of it is written out.
            sig = _get(target + ".asc", SIGNATURE_LIMIT)
            openpgp.detached_signature(sig, target + ".asc")
            data = Path(tmp) / "target"
            fetch.download(target, data, ARTIFACT_LIMIT, exact=False)
            fpr = verifier.verify(data, sig, target)
            lines = [f"OK {target} signed by {fpr}"]
            if appimage.is_appimage(data):
                lines.append(verify_embedded(verifier, data, target))
            return lines
        meta = _get(target, METADATA_LIMIT)
        fpr = verifier.verify_bytes(meta, _get(target + ".asc", SIGNATURE_LIMIT), target)
        lines = [f"OK {target} signed by {fpr}"]
        release = parse_release(meta, target)
        check_fresh(release, target, now or datetime.now(UTC))
        root, host, version = _release_path(target)
        # Signed, and yet another host's release, or another number's, moved here: what
        # its path says is what is claimed of it.
        if release.host != host:
            raise VerificationError(f"{target}: holds a release of host {release.host!r}, not {host!r}")
        if version is not None and release.version != version:
            raise VerificationError(f"{target}: holds release {release.version}, not {version}")
        lines[0] += f": {release.host} release {release.version}, commit {release.commit}"
        # What the image checks need of a blob, taken while it is here.
        oci_manifest = thin_manifest = base_sha512 = None
        for art in release.artifacts:
            where = fetch.join(root, art.blob)
            blob = Path(tmp) / art.sha256
            verify_blob(verifier, where, blob, art.size, art.sha256)
            lines.append(f"OK {art.name} ({art.format}, {art.size} bytes, sha256 {art.sha256})")
            if art.format == Kind.OCI:
                oci_manifest = blob.read_bytes()
            elif art.format == Kind.ACI_THIN:
                thin_manifest = _aci_manifest(blob, where)
            elif art.format == Kind.ACI_BASE:
                base_sha512 = _sha512(blob)
            if art.format == Kind.APPIMAGE and appimage.is_appimage(blob):
                lines.append(verify_embedded(verifier, blob, art.name))
            blob.unlink()
        if oci_manifest is not None:
            imagecheck.check_oci(release, oci_manifest)
            lines.append(f"OK {release.host} release {release.version}: the OCI manifest names its blobs")
        if thin_manifest is not None:
            imagecheck.check_thin(release, thin_manifest, base_sha512 or "")
            lines.append(f"OK {release.host} release {release.version}: the thin ACI depends on its base")
        if provenance:
            lines += verify_attestations(key_files, release, root, target)
        return lines


def verify_attestations(key_files: list[Path], release: Release, root: str, target: str) -> list[str]:
    """Check ``release``'s provenance and SBOM against the keys in ``key_files``."""
    # securesystemslib (which reads the pinned keys as its GPGKeys) is imported only here.
    from reconciler.adapters.tufkeys import metadata_keys

    keys = metadata_keys(read_keys(key_files))
    lines = []
    for kind in AttestationKind:
        ref = release.attestation(kind)
        if ref is None:
            raise VerificationError(f"{target}: names no {kind} attestation (published before provenance?)")
        where = fetch.join(root, ref.path)
        # Read past the size the release names (up to the limit of any attestation):
        # what is wrong with a tampered one is said more precisely than "too long".
        data = _get(where, ATTESTATION_LIMIT)
        try:
            got = trust.check_attestation(kind, data, release, keys, where)
        except trust.RefusalError as exc:
            raise VerificationError(str(exc)) from None
        count = len(release.artifacts)
        if isinstance(got.summary, ProvenanceSummary):
            p = got.summary
            versions = ", ".join(f"{k} {v}" for k, v in sorted(p.versions.items()))
            on = p.builder if p.built else "none, the output was in the Nix store already"
            lines += [
                f"OK {where}: SLSA provenance v1 signed by {got.keyid}, of the release's {count} artifacts",
                f"  source: {p.repository} branch {p.branch} commit {p.commit}, host {p.host}",
                f"  derivation: {p.derivation}",
                f"  built by: {versions}; on builder {on}",
                f"  built: {format_time(p.started)} to {format_time(p.finished)}, run {p.invocation_id}",
                f"  resolved dependencies: {p.dependencies}, {p.store_paths} store paths by NAR sha256",
                f"  reproducibility check: {p.reproducibility}",
            ]
        elif isinstance(got.summary, SbomSummary):
            b = got.summary
            lines.append(
                f"OK {where}: SPDX 2.3 SBOM signed by {got.keyid}, of the release's {count} artifacts: "
                f"{b.store_paths} store paths, {len(b.debian)} Debian packages"
            )
    return lines


def _aci_manifest(path: Path, where: str) -> bytes:
    """The ``manifest`` file of an ACI (a tar, verified already)."""
    try:
        with tarfile.open(path) as tar:
            member = tar.extractfile("manifest")
            if member is None:
                raise KeyError("manifest")
            return member.read(imagecheck.MANIFEST_LIMIT + 1)
    except (tarfile.TarError, KeyError, OSError) as exc:
        raise VerificationError(f"{where}: not an ACI with a manifest ({exc})") from None


def _sha512(path: Path) -> str:
    h = hashlib.sha512()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_blob(verifier: Verifier, where: str, dest: Path, size: int, sha256: str) -> None:
    """Download the blob at ``where`` into ``dest`` and check size, digest and signature."""
    digest = fetch.download(where, dest, size)
    if digest != sha256:
        raise VerificationError(f"{where}: sha256 {digest}, release says {sha256}")
    verifier.verify(dest, _get(where + ".asc", SIGNATURE_LIMIT), where)


def verify_embedded(verifier: Verifier, path: Path, what: str) -> str:
    """Check the signature and digest the AppImage at ``path`` carries; one line. One
    published before they were embedded has neither (the spec makes both optional):
    said, not refused, as its detached signature and the release cover it."""
    embedded = appimage.read_embedded(path, what)
    digest = embedded.digest_md5
    if not embedded.signature and (digest is None or digest == bytes(16)):
        return f"NOTE {what} carries no embedded signature or digest (published before they were)"
    if not embedded.signature:
        raise VerificationError(f"{what}: no signature embedded (.sha256_sig is empty)")
    fpr = verifier.verify_bytes(embedded.signed_text, embedded.signature, f"{what} (.sha256_sig)")
    if digest is None or embedded.computed_md5 is None:
        return f"OK {what} embedded signature (.sha256_sig) by {fpr}, no .digest_md5 section"
    if digest != embedded.computed_md5:
        raise VerificationError(
            f"{what}: .digest_md5 holds {digest.hex()}, the file's digest is {embedded.computed_md5.hex()}"
        )
    return f"OK {what} embedded signature (.sha256_sig) by {fpr}, .digest_md5 {digest.hex()}"


def _get(target: str, limit: int) -> bytes:
    got = fetch.get(target, limit)
    assert got is not None  # an unconditional read always answers
    return got.data


def check_fresh(release: Release, target: str, now: datetime) -> None:
    """Refuse an expired release, by the agent's own rule."""
    if trust.expired(release, now):
        raise VerificationError(f"{target}: expired at {release.expires.isoformat()}")
