"""A release's thin ACI and OCI image must name the blobs the release lists beside them."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from reconciler.core.imagecheck import MANIFEST_LIMIT, check_oci, check_thin
from reconciler.core.release import Artifact, Release, new_release
from reconciler.errors import VerificationError


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


ARTS = {
    kind: Artifact(kind, f"web-1-3.{kind}", size, sha(kind))
    for kind, size in (
        ("oci", 655),
        ("oci-config", 533),
        ("oci-layer-base", 2340568),
        ("oci-layer", 969),
        ("aci-thin", 20480),
        ("aci-base", 4915200),
    )
}
BASE_SHA512 = "ab" * 64


def release(*kinds: str) -> Release:
    arts = tuple(ARTS[k] for k in kinds or ARTS)
    return new_release("web-1", 3, "c" * 40, "/nix/store/x.drv", arts, datetime.now(UTC), timedelta(days=1))


def descriptor(kind: str, media: str) -> dict[str, Any]:
    return {"mediaType": media, "digest": f"sha256:{ARTS[kind].sha256}", "size": ARTS[kind].size}


LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def manifest() -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": descriptor("oci-config", "application/vnd.oci.image.config.v1+json"),
        "layers": [descriptor("oci-layer-base", LAYER), descriptor("oci-layer", LAYER)],
        "annotations": {"org.opencontainers.image.title": "web-1"},
    }


def thin() -> dict[str, Any]:
    dep = {"imageName": "reconciler-base", "imageID": f"sha512-{BASE_SHA512}", "size": ARTS["aci-base"].size}
    return {"acKind": "ImageManifest", "name": "web-1-thin", "dependencies": [dep]}


def test_a_whole_image_passes() -> None:
    check_oci(release(), json.dumps(manifest()).encode())
    check_thin(release(), json.dumps(thin()).encode(), BASE_SHA512)


def swapped_layers(m: dict[str, Any]) -> None:
    m["layers"].reverse()


def other_layer(m: dict[str, Any]) -> None:
    m["layers"][1]["digest"] = f"sha256:{sha('elsewhere')}"


def extra_layer(m: dict[str, Any]) -> None:
    m["layers"].append(descriptor("oci-layer", LAYER))


def wrong_size(m: dict[str, Any]) -> None:
    m["config"]["size"] += 1


def docker_type(m: dict[str, Any]) -> None:
    m["mediaType"] = "application/vnd.docker.distribution.manifest.v2+json"


def layers_not_a_list(m: dict[str, Any]) -> None:
    m["layers"] = {"0": m["layers"][0]}


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (swapped_layers, "its layers are not the release's oci-layer-base and oci-layer"),
        (other_layer, "its layers are not the release's oci-layer-base and oci-layer"),
        (extra_layer, "its layers are not the release's oci-layer-base and oci-layer"),
        (layers_not_a_list, "its layers are not the release's oci-layer-base and oci-layer"),
        (wrong_size, "its config is not the release's oci-config"),
        (docker_type, "not an OCI image manifest"),
    ],
)
def test_an_oci_manifest_naming_other_blobs_is_refused(mutate: Any, why: str) -> None:
    doc = manifest()
    mutate(doc)
    with pytest.raises(VerificationError) as err:
        check_oci(release(), json.dumps(doc).encode())
    assert str(err.value).startswith("web-1 release 3: OCI manifest: ") and why in str(err.value)


def test_an_oci_image_without_its_layer_in_the_release_is_refused() -> None:
    with pytest.raises(VerificationError) as err:
        check_oci(release("oci", "oci-config", "oci-layer-base"), json.dumps(manifest()).encode())
    assert str(err.value) == "web-1 release 3: has an oci but no oci-layer"
    with pytest.raises(VerificationError) as err:
        check_oci(release(), b"[1]")
    assert str(err.value) == "web-1 release 3: OCI manifest: not a JSON object"


@pytest.mark.parametrize(
    ("doc", "base", "why"),
    [
        (thin(), "cd" * 64, "its dependency is not the release's aci-base"),
        ({**thin(), "dependencies": []}, BASE_SHA512, "must have one dependency, the base ACI"),
        (
            {**thin(), "dependencies": [thin()["dependencies"][0]] * 2},
            BASE_SHA512,
            "must have one dependency",
        ),
        (
            {**thin(), "dependencies": [{**thin()["dependencies"][0], "size": 1}]},
            BASE_SHA512,
            "its dependency is not the release's aci-base",
        ),
    ],
)
def test_a_thin_aci_depending_on_another_base_is_refused(doc: dict[str, Any], base: str, why: str) -> None:
    with pytest.raises(VerificationError) as err:
        check_thin(release(), json.dumps(doc).encode(), base)
    assert str(err.value).startswith("web-1 release 3: thin ACI manifest: ") and why in str(err.value)


def test_a_thin_aci_without_its_base_or_with_a_huge_manifest_is_refused() -> None:
    with pytest.raises(VerificationError) as err:
        check_thin(release("aci-thin"), json.dumps(thin()).encode(), BASE_SHA512)
    assert str(err.value) == "web-1 release 3: has an aci-thin but no aci-base"
    with pytest.raises(VerificationError) as err:
        check_thin(release(), b" " * (MANIFEST_LIMIT + 1), BASE_SHA512)
    assert "longer than" in str(err.value)
