"""Which artifacts each image format publishes, and how a built file's name tells its kind."""

from __future__ import annotations

import pytest

from reconciler.core.formats import DEFAULT_FORMATS, PARTS, SUFFIXES, Format, Kind, kind_of, kinds
from reconciler.core.hosts import FORMATS


def test_every_kind_belongs_to_exactly_one_format_and_has_one_suffix() -> None:
    owners = [k for parts in PARTS.values() for k in parts]
    assert sorted(owners) == sorted(Kind) and len(set(owners)) == len(owners)
    assert sorted(SUFFIXES.values()) == sorted(Kind)
    assert set(PARTS) == set(Format) and tuple(f.value for f in Format) == FORMATS
    assert set(DEFAULT_FORMATS) == {Format.ACI, Format.APPIMAGE}


def test_kinds_follow_format_order_whatever_the_order_asked() -> None:
    assert kinds(["oci", "aci-thin"]) == (
        Kind.ACI_THIN,
        Kind.ACI_BASE,
        Kind.OCI,
        Kind.OCI_CONFIG,
        Kind.OCI_LAYER_BASE,
        Kind.OCI_LAYER,
    )
    assert kinds(["appimage", "aci"]) == (Kind.ACI, Kind.APPIMAGE)
    assert kinds([]) == ()


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        # What nix/host.nix, base.nix and oci.nix name them.
        ("web-1-3-linux-amd64.aci", Kind.ACI),
        ("web-1-3-x86_64.AppImage", Kind.APPIMAGE),
        ("web-1-3-linux-amd64.thin.aci", Kind.ACI_THIN),
        ("reconciler-base-c22042242ceacd9b-linux-amd64.base.aci", Kind.ACI_BASE),
        ("web-1-3.oci.json", Kind.OCI),
        ("web-1-3.oci-config.json", Kind.OCI_CONFIG),
        ("reconciler-base-c22042242ceacd9b.base.tar.gz", Kind.OCI_LAYER_BASE),
        ("web-1-3.tar.gz", Kind.OCI_LAYER),
        # Beside the artifacts, not published.
        ("web-1-3.oci.tar", None),
        ("web-1-3.oci-layout", None),
        ("web-1-3-x86_64.AppImage.zsync", None),
        (".aci", None),
        ("aci", None),
    ],
)
def test_a_built_files_kind_is_its_suffix_after_the_first_dot(name: str, kind: Kind | None) -> None:
    assert kind_of(name) == kind
