"""Whether a release's multi-blob images are whole. Pure.

A thin ACI names its base by image ID (sha512 of the base ACI) and size; an OCI
manifest names its config and layers by sha256 and size. Each blob's own digest
is checked against the release already; this checks that the blobs the release
lists are the ones the images name, so that a reader who follows the image's own
references (rkt resolving a dependency, skopeo reading the store as an OCI layout)
gets what the release signed.
"""

from __future__ import annotations

import json
from typing import Any

from reconciler.core.formats import Kind
from reconciler.core.release import Artifact, Release
from reconciler.errors import VerificationError

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
# An ACI manifest is a few KiB; a longer one is not ours.
MANIFEST_LIMIT = 1 << 20


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise VerificationError(f"{what}: not valid JSON") from None
    if not isinstance(doc, dict):
        raise VerificationError(f"{what}: not a JSON object")
    return doc


def _need(release: Release, kind: Kind, image: Kind) -> Artifact:
    art = release.artifact(kind)
    if art is None:
        raise VerificationError(f"{release.host} release {release.version}: has an {image} but no {kind}")
    return art


def check_oci(release: Release, manifest: bytes) -> None:
    """The OCI manifest (the release's ``oci`` blob) names exactly its ``oci-config``,
    then its ``oci-layer-base`` and ``oci-layer``, with their sizes and media types."""
    what = f"{release.host} release {release.version}: OCI manifest"
    doc = _json(manifest, what)
    if doc.get("schemaVersion") != 2 or doc.get("mediaType") != OCI_MANIFEST:
        raise VerificationError(f"{what}: not an OCI image manifest (schemaVersion 2, {OCI_MANIFEST})")
    config = _need(release, Kind.OCI_CONFIG, Kind.OCI)
    layers = [_need(release, k, Kind.OCI) for k in (Kind.OCI_LAYER_BASE, Kind.OCI_LAYER)]

    def descriptor(art: Artifact, media: str) -> dict[str, Any]:
        return {"mediaType": media, "digest": f"sha256:{art.sha256}", "size": art.size}

    def fields(d: Any) -> Any:
        return {k: d.get(k) for k in ("mediaType", "digest", "size")} if isinstance(d, dict) else d

    if fields(doc.get("config")) != descriptor(config, OCI_CONFIG):
        raise VerificationError(f"{what}: its config is not the release's {Kind.OCI_CONFIG}")
    named = doc.get("layers")
    wanted = [descriptor(a, OCI_LAYER) for a in layers]
    if not isinstance(named, list) or [fields(d) for d in named] != wanted:
        raise VerificationError(
            f"{what}: its layers are not the release's {Kind.OCI_LAYER_BASE} and {Kind.OCI_LAYER}"
        )


def check_thin(release: Release, thin_manifest: bytes, base_sha512: str) -> None:
    """The thin ACI's manifest (its ``manifest`` file) depends on the release's
    ``aci-base``: one dependency with that image ID and size."""
    what = f"{release.host} release {release.version}: thin ACI manifest"
    if len(thin_manifest) > MANIFEST_LIMIT:
        raise VerificationError(f"{what}: longer than {MANIFEST_LIMIT} bytes")
    doc = _json(thin_manifest, what)
    base = _need(release, Kind.ACI_BASE, Kind.ACI_THIN)
    deps = doc.get("dependencies")
    if not isinstance(deps, list) or len(deps) != 1 or not isinstance(deps[0], dict):
        raise VerificationError(f"{what}: must have one dependency, the base ACI")
    dep = deps[0]
    if dep.get("imageID") != f"sha512-{base_sha512}" or dep.get("size") != base.size:
        raise VerificationError(f"{what}: its dependency is not the release's {Kind.ACI_BASE}")
