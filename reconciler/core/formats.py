"""Image formats a host asks for, and the artifacts a release lists for each. Pure.

A host's ``formats`` name :class:`Format` values. Most formats are one file; a thin
ACI needs the shared base ACI it depends on, and an OCI image is its manifest, its
config and its two layers (the shared base and the host's own), each published as a
blob of its own so that what hosts share is stored once. Each file is one artifact
of the release, its ``format`` field a :class:`Kind`.

nix/host.nix names every artifact ``<stem>.<suffix>``, where the stem (a host or
image name, a version, os and arch) has no dot: the suffix tells the kind.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class Format(StrEnum):
    """What a host file's ``formats`` may list."""

    ACI = "aci"
    ACI_THIN = "aci-thin"
    APPIMAGE = "appimage"
    OCI = "oci"


# What a host without ``formats`` gets: what every release had before thin ACIs and
# OCI images, so that no existing fleet's releases change shape on upgrade.
DEFAULT_FORMATS = (Format.ACI, Format.APPIMAGE)


class Kind(StrEnum):
    """One artifact of a release (its ``format`` field)."""

    ACI = "aci"
    ACI_THIN = "aci-thin"
    ACI_BASE = "aci-base"  # the shared base ACI the thin one depends on
    APPIMAGE = "appimage"
    OCI = "oci"  # the OCI image manifest
    OCI_CONFIG = "oci-config"
    OCI_LAYER_BASE = "oci-layer-base"  # the shared base layer
    OCI_LAYER = "oci-layer"  # the host's own layer


PARTS: dict[Format, tuple[Kind, ...]] = {
    Format.ACI: (Kind.ACI,),
    Format.ACI_THIN: (Kind.ACI_THIN, Kind.ACI_BASE),
    Format.APPIMAGE: (Kind.APPIMAGE,),
    Format.OCI: (Kind.OCI, Kind.OCI_CONFIG, Kind.OCI_LAYER_BASE, Kind.OCI_LAYER),
}

SUFFIXES: dict[str, Kind] = {
    "aci": Kind.ACI,
    "thin.aci": Kind.ACI_THIN,
    "base.aci": Kind.ACI_BASE,
    "AppImage": Kind.APPIMAGE,
    "oci.json": Kind.OCI,
    "oci-config.json": Kind.OCI_CONFIG,
    "base.tar.gz": Kind.OCI_LAYER_BASE,
    "tar.gz": Kind.OCI_LAYER,
}


def kinds(formats: Iterable[str]) -> tuple[Kind, ...]:
    """The artifacts a build for ``formats`` must give, in Format order."""
    wanted = set(formats)
    return tuple(k for f in Format if f in wanted for k in PARTS[f])


def kind_of(file_name: str) -> Kind | None:
    """The kind of a built artifact by its name; None for a file that is not one."""
    stem, dot, suffix = file_name.partition(".")
    return SUFFIXES.get(suffix) if dot and stem else None
