"""In-toto attestations of a release (reconciler.core.provenance) and their check
(reconciler.core.trust.check_attestation), read and verified by the in-toto tooling
too: in-toto-attestation's Statement and SLSA provenance schemas, spdx-tools'
validator, securesystemslib's and in-toto's DSSE envelopes. Real ed25519 keys; gpg
signatures are tests/integration/test_provenance.py's."""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from google.protobuf import json_format
from hypothesis import given
from hypothesis import strategies as st
from in_toto.models.metadata import Envelope as InTotoEnvelope
from in_toto.models.metadata import Metadata
from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
from in_toto_attestation.v1 import statement_pb2
from in_toto_attestation.v1.statement import Statement as AttestationStatement
from securesystemslib.dsse import Envelope as SslibEnvelope
from securesystemslib.signer import CryptoSigner
from spdx_tools.spdx.parser.jsonlikedict.json_like_dict_parser import JsonLikeDictParser
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

from reconciler.core import provenance as prov
from reconciler.core.layout import AttestationKind, attestation_path
from reconciler.core.release import Artifact, Attestation, Release, new_release
from reconciler.core.trust import (
    Downloaded,
    Expected,
    Latest,
    Pinned,
    Reason,
    RefusalError,
    TrustedState,
    check_attestation,
    verify_envelope,
)
from reconciler.errors import VerificationError

PUBLISHER = CryptoSigner.generate_ed25519()
ATTACKER = CryptoSigner.generate_ed25519()
NOW = datetime(2026, 3, 1, 12, 0, 0, tzinfo=UTC)
COMMIT = "0123456789abcdef0123456789abcdef01234567"
DRV = "/nix/store/3c2b3vd8z5zvxlrf544nsnlickj4lc3q-host-web-1-3.drv"
OUTPUT = "/nix/store/00gw3g1rxpi235f523nddifjnhj4pzaj-host-web-1-3"
TOOLCHAIN = "/nix/store/hhdsyxyxkwskydp20058jg264wqm8y9m-reconciler-toolchain"


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


ARTIFACTS = (
    Artifact("aci", "web-1-3-linux-amd64.aci", 10, sha(b"aci")),
    Artifact("appimage", "web-1-3-x86_64.AppImage", 20, sha(b"appimage")),
)
RELEASE = new_release("web-1", 3, COMMIT, DRV, ARTIFACTS, NOW, timedelta(days=30))
CLOSURE = (
    prov.StorePath(OUTPUT, sha(b"out"), 100),
    prov.StorePath("/nix/store/cpcjpcxhh8dqrlnx3lnnhb71l5mjw63i-host-web-1-image", sha(b"image"), 50),
    prov.StorePath(TOOLCHAIN, sha(b"toolchain"), 5000),
    prov.StorePath("/nix/store/6yw5r3ljb6sqskqlk4py4krq9ny8255s-site", sha(b"site"), 3),
)
DEBIAN = (
    prov.DebianPackage("busybox-static", "1:1.35.0-4+deb12u1+b1", "amd64", prov.Role.CONTAINED),
    prov.DebianPackage("gcc", "4:12.2.0-3", "amd64", prov.Role.BUILT_WITH),
)
INPUTS = prov.NixInputs(
    nix_version="2.8.0",
    library_digest=sha(b"nix library"),
    toolchain="debian",
    toolchain_digest=sha(b"toolchain content"),
    debian_packages=DEBIAN,
    closure=CLOSURE,
    outputs=(OUTPUT,),
)
RECORD = prov.BuildRecord(
    repository="https://git.example/fleet.git",
    branch="main",
    commit=COMMIT,
    host="web-1",
    derivation=DRV,
    inputs=INPUTS,
    reconciler_version="0.1.0",
    builder="build-1",
    builder_uri="ssh-ng://nix@build-1.example",
    invocation_id="5f0c8a0e-2b1d-4c55-9a53-3a0d7e1f9b10",
    started=NOW - timedelta(minutes=2),
    finished=NOW,
)


def signed(statement: prov.Statement, signer: CryptoSigner = PUBLISHER, **change: Any) -> bytes:
    """``statement`` in a DSSE envelope signed by ``signer`` (``change`` replaces
    envelope fields before signing)."""
    env = replace(prov.envelope(statement), **change)
    sig = signer.sign(env.pae())
    return replace(env, signatures=(prov.Signature(sig.keyid, bytes.fromhex(sig.signature)),)).to_json()


def attested(release: Release, envelopes: dict[AttestationKind, bytes]) -> Release:
    return replace(
        release,
        attestations=tuple(
            Attestation(kind, attestation_path(release.host, release.version, kind), len(data), sha(data))
            for kind, data in envelopes.items()
        ),
    )


STATEMENTS = prov.statements(RELEASE, RECORD)
ENVELOPES = {kind: signed(s) for kind, s in STATEMENTS.items()}
ATTESTED = attested(RELEASE, ENVELOPES)
KEYS = [PUBLISHER.public_key]
SOURCE = "hosts/web-1/releases/3.provenance.json"


def check(
    data: bytes, release: Release = ATTESTED, kind: AttestationKind = AttestationKind.PROVENANCE
) -> str:
    """The refusal of ``data`` as ``release``'s attestation, as a string. Its reason:
    TAMPERED when ``data`` are not the bytes the release names (the store's doing, tried
    again by an agent), else BAD_PROVENANCE."""
    with pytest.raises(RefusalError) as err:
        check_attestation(kind, data, release, KEYS, SOURCE)
    ref = release.attestation(kind)
    named = ref is not None and (ref.size, ref.sha256) == (len(data), sha(data))
    assert err.value.reason is (Reason.BAD_PROVENANCE if named else Reason.TAMPERED)
    return str(err.value)


# -- the format, as the in-toto tooling reads it -------------------------------------------------


@given(st.text(max_size=40), st.binary(max_size=200))
def test_pae_is_dsse_v1_as_securesystemslib_computes_it(payload_type: str, payload: bytes) -> None:
    assert prov.pae(payload_type, payload) == SslibEnvelope(payload, payload_type, {}).pae()


def test_the_provenance_is_an_in_toto_statement_of_slsa_v1() -> None:
    payload = STATEMENTS[AttestationKind.PROVENANCE].to_json()
    # in-toto-attestation's protobuf schemas: unknown fields anywhere are an error.
    pb = json_format.Parse(payload, statement_pb2.Statement())
    AttestationStatement.copy_from_pb(pb).validate()
    doc = json.loads(payload)
    slsa = json_format.ParseDict(doc["predicate"], provenance_pb2.Provenance())
    assert pb.predicate_type == "https://slsa.dev/provenance/v1"
    assert [(s.name, s.digest["sha256"]) for s in pb.subject] == [(a.name, a.sha256) for a in ARTIFACTS]
    build = slsa.build_definition
    assert build.build_type == prov.BUILD_TYPE
    assert dict(build.external_parameters) == {
        "repository": "https://git.example/fleet.git",
        "branch": "main",
        "commit": COMMIT,
        "host": "web-1",
    }
    deps = {(d.uri or d.name): dict(d.digest) for d in build.resolved_dependencies}
    assert deps == {
        "git+https://git.example/fleet.git@refs/heads/main": {"gitCommit": COMMIT},
        "reconciler-nix-library": {"sha256": sha(b"nix library")},
        "reconciler-toolchain-debian": {"sha256": sha(b"toolchain content")},
        # Every store path of the closure by its NAR's sha256, but the output: a product.
        **{p.path: {"sha256": p.nar_sha256} for p in CLOSURE[1:]},
    }
    assert {d.media_type for d in build.resolved_dependencies if d.name.startswith("/nix/")} == {
        prov.NAR_MEDIA_TYPE
    }
    assert build.internal_parameters["reproducibility"]["status"] == "not run"
    run = slsa.run_details
    assert run.builder.id == prov.BUILDER_ID
    assert dict(run.builder.version) == {"reconciler": "0.1.0", "nix": "2.8.0"}
    (builder,) = run.builder.builder_dependencies
    assert (builder.name, builder.uri, builder.annotations["built"]) == (
        "build-1",
        "ssh-ng://nix@build-1.example",
        True,
    )
    assert run.metadata.invocation_id == RECORD.invocation_id
    assert run.metadata.started_on.ToJsonString() == "2026-03-01T11:58:00Z"
    assert run.metadata.finished_on.ToJsonString() == "2026-03-01T12:00:00Z"
    assert [(b.name, dict(b.digest)) for b in run.byproducts] == [(OUTPUT, {"sha256": sha(b"out")})]


def test_the_sbom_is_a_valid_spdx_2_3_document_listing_closure_and_debian_packages() -> None:
    statement = STATEMENTS[AttestationKind.SBOM]
    pb = json_format.Parse(statement.to_json(), statement_pb2.Statement())
    AttestationStatement.copy_from_pb(pb).validate()
    assert pb.predicate_type == "https://spdx.dev/Document/v2.3"
    document = JsonLikeDictParser().parse(json.loads(json.dumps(statement.predicate)))
    assert validate_full_spdx_document(document, "SPDX-2.3") == []
    packages = {p.name: p for p in document.packages}
    assert {p.checksums[0].value for p in document.packages if p.name.endswith((".aci", ".AppImage"))} == {
        a.sha256 for a in ARTIFACTS
    }
    assert {"host-web-1-3", "host-web-1-image", "reconciler-toolchain", "site"} <= set(packages)
    assert packages["busybox-static"].version == "1:1.35.0-4+deb12u1+b1"
    assert packages["busybox-static"].external_references[0].locator == (
        "pkg:deb/debian/busybox-static@1%3A1.35.0-4%2Bdeb12u1%2Bb1?arch=amd64"
    )
    relations = {
        (r.spdx_element_id, r.relationship_type.name, r.related_spdx_element_id)
        for r in document.relationships
    }
    ids = {p.name: p.spdx_id for p in document.packages}
    assert (ids["reconciler-toolchain"], "CONTAINS", ids["busybox-static"]) in relations
    assert (ids["gcc"], "BUILD_TOOL_OF", ids["reconciler-toolchain"]) in relations
    assert (ids["web-1-3-x86_64.AppImage"], "GENERATED_FROM", ids["site"]) in relations
    assert (ids["host-web-1-3"], "CONTAINS", ids["web-1-3-linux-amd64.aci"]) in relations


def test_the_envelope_is_read_and_verified_by_securesystemslib_and_in_toto() -> None:
    data = ENVELOPES[AttestationKind.PROVENANCE]
    doc = json.loads(data)
    assert doc["payloadType"] == "application/vnd.in-toto+json"
    env = SslibEnvelope.from_dict(json.loads(data))
    assert env.verify([PUBLISHER.public_key], 1) == {PUBLISHER.public_key.keyid: PUBLISHER.public_key}
    assert env.payload == STATEMENTS[AttestationKind.PROVENANCE].to_json()
    # in-toto's own metadata reader takes it as a DSSE envelope of an in-toto payload.
    meta = Metadata.from_dict(json.loads(data))
    assert isinstance(meta, InTotoEnvelope)
    key = {"keyid": PUBLISHER.public_key.keyid, **PUBLISHER.public_key.to_dict()}
    meta.verify_signature(key)
    # And ours reads back what securesystemslib writes.
    sslib = SslibEnvelope(env.payload, env.payload_type, {})
    sslib.sign(PUBLISHER)
    back = prov.parse_envelope(json.dumps(sslib.to_dict()).encode(), SOURCE)
    assert verify_envelope(back, KEYS, SOURCE) == PUBLISHER.public_key.keyid


def test_an_envelope_round_trips() -> None:
    data = ENVELOPES[AttestationKind.SBOM]
    env = prov.parse_envelope(data, SOURCE)
    assert env.to_json() == data
    assert prov.parse_statement(env.payload, SOURCE) == prov.Statement(
        STATEMENTS[AttestationKind.SBOM].subjects,
        prov.SPDX_DOCUMENT,
        json.loads(json.dumps(STATEMENTS[AttestationKind.SBOM].predicate)),
    )


# -- the check ---------------------------------------------------------------------------------


def test_a_good_provenance_checks_out_and_says_how_the_release_was_built() -> None:
    got = check_attestation(
        AttestationKind.PROVENANCE, ENVELOPES[AttestationKind.PROVENANCE], ATTESTED, KEYS, SOURCE
    )
    assert got.keyid == PUBLISHER.public_key.keyid
    assert got.summary == prov.ProvenanceSummary(
        repository="https://git.example/fleet.git",
        branch="main",
        commit=COMMIT,
        host="web-1",
        derivation=DRV,
        builder="build-1",
        built=True,
        versions={"reconciler": "0.1.0", "nix": "2.8.0"},
        invocation_id=RECORD.invocation_id,
        started=RECORD.started,
        finished=RECORD.finished,
        dependencies=6,  # commit, library, toolchain, three store paths
        store_paths=3,
        reproducibility="not run",
    )
    sbom = check_attestation(AttestationKind.SBOM, ENVELOPES[AttestationKind.SBOM], ATTESTED, KEYS, SOURCE)
    assert sbom.summary == prov.SbomSummary(
        packages=8, store_paths=4, debian=("busybox-static=1:1.35.0-4+deb12u1+b1", "gcc=4:12.2.0-3")
    )


def _payload(data: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(base64.b64decode(json.loads(data)["payload"]))
    return doc


def _with_payload(data: bytes, payload: dict[str, Any]) -> bytes:
    doc = json.loads(data)
    doc["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    return json.dumps(doc).encode()


def test_a_tampered_payload_fails_the_signature() -> None:
    data = ENVELOPES[AttestationKind.PROVENANCE]
    payload = _payload(data)
    payload["predicate"]["buildDefinition"]["externalParameters"]["commit"] = "f" * 40
    assert check(_with_payload(data, payload)) == f"{SOURCE}: bad signature (VerificationError)"
    # A subject digest changed the same way, unsigned.
    payload = _payload(data)
    payload["subject"][0]["digest"]["sha256"] = sha(b"other bytes")
    assert check(_with_payload(data, payload)) == f"{SOURCE}: bad signature (VerificationError)"


def test_a_changed_payload_type_is_refused_and_would_fail_the_signature() -> None:
    doc = json.loads(ENVELOPES[AttestationKind.PROVENANCE])
    doc["payloadType"] = "application/json"
    tampered = json.dumps(doc).encode()
    assert check(tampered) == (
        f"{SOURCE}: payloadType is 'application/json', not 'application/vnd.in-toto+json'"
    )
    # Even were the type not checked by name, PAE binds it: the signature fails.
    with pytest.raises(VerificationError, match="bad signature"):
        verify_envelope(prov.parse_envelope(tampered, SOURCE), KEYS, SOURCE)


def test_a_signed_statement_about_other_bytes_is_refused_by_subject() -> None:
    statement = STATEMENTS[AttestationKind.PROVENANCE]
    other = (prov.Subject(ARTIFACTS[0].name, sha(b"another aci")), statement.subjects[1])
    data = signed(replace(statement, subjects=other))
    assert check(data) == (
        f"{SOURCE}: subject {ARTIFACTS[0].name} has sha256 {sha(b'another aci')}, "
        f"the release says {ARTIFACTS[0].sha256}"
    )
    assert (
        check(signed(replace(statement, subjects=other[1:])))
        == f"{SOURCE}: no subject for artifact {ARTIFACTS[0].name}"
    )
    extra = (*statement.subjects, prov.Subject("x.aci", sha(b"x")))
    assert (
        check(signed(replace(statement, subjects=extra)))
        == f"{SOURCE}: subject x.aci is not an artifact of the release"
    )


def test_a_statement_signed_by_a_key_not_pinned_is_refused() -> None:
    data = signed(STATEMENTS[AttestationKind.PROVENANCE], ATTACKER)
    assert check(data) == f"{SOURCE}: no signature by a pinned key"
    # Nor does claiming the publisher's keyid help.
    doc = json.loads(data)
    doc["signatures"][0]["keyid"] = PUBLISHER.public_key.keyid
    assert check(json.dumps(doc).encode()) == f"{SOURCE}: bad signature (VerificationError)"


def test_another_signed_build_of_the_same_release_is_not_the_one_it_names() -> None:
    # Same artifacts, host, commit and derivation: another invocation, signed by the
    # publisher. The release's digest of its provenance tells them apart.
    again = signed(prov.provenance(RELEASE, replace(RECORD, invocation_id="another")))
    good = ENVELOPES[AttestationKind.PROVENANCE]
    assert check(again) == (
        f"{SOURCE}: {len(again)} bytes, sha256 {sha(again)}; the release says "
        f"{len(good)} bytes, sha256 {sha(good)}"
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"commit": "f" * 40}, f"it is the provenance of commit {'f' * 40}, the release says {COMMIT}"),
        ({"host": "web-2"}, "it is the provenance of host web-2, the release says web-1"),
        (
            {"derivation": "/nix/store/x.drv"},
            f"it is the provenance of derivation /nix/store/x.drv, the release says {DRV}",
        ),
    ],
)
def test_a_signed_provenance_of_another_build_is_refused(change: dict[str, Any], message: str) -> None:
    # Signed by the publisher, and named by the release: still not its provenance.
    data = signed(prov.provenance(RELEASE, replace(RECORD, **change)))
    assert check(data, attested(RELEASE, {AttestationKind.PROVENANCE: data})) == f"{SOURCE}: {message}"


def test_the_sbom_is_not_the_provenance() -> None:
    sbom = ENVELOPES[AttestationKind.SBOM]
    release = attested(RELEASE, {AttestationKind.PROVENANCE: sbom})
    assert (
        check(sbom, release)
        == f"{SOURCE}: predicateType is '{prov.SPDX_DOCUMENT}', not '{prov.SLSA_PROVENANCE}'"
    )


def test_a_release_naming_no_provenance_is_refused_as_such() -> None:
    with pytest.raises(RefusalError) as err:
        check_attestation(AttestationKind.PROVENANCE, b"{}", RELEASE, KEYS, SOURCE)
    assert err.value.reason is Reason.NO_PROVENANCE
    assert str(err.value) == "release 3 names no provenance attestation"


def envelope_of(*signatures: dict[str, Any]) -> bytes:
    return json.dumps({"payload": "", "payloadType": "t", "signatures": list(signatures)}).encode()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"[]", "must be a JSON object"),
        (b'{"payload": "", "payload": ""}', "key 'payload' appears more than once"),
        (b'{"payload": "%%%", "payloadType": "t", "signatures": []}', "payload: must be a base64 string"),
        (b'{"payload": "", "payloadType": 1, "signatures": []}', "payloadType: must be a string"),
        (b'{"payload": "", "payloadType": "t", "signatures": []}', "signatures: must be a non-empty list"),
        (
            b'{"payload": "", "payloadType": "t", "signatures": [{"keyid": "AB", "sig": ""}]}',
            "signatures[0].keyid: must be a lowercase hex key id",
        ),
        (
            envelope_of({"keyid": "abcdef01", "sig": "", "other_headers": 1}),
            "signatures[0].other_headers: must be a string",
        ),
        (
            envelope_of({"keyid": "abcdef01", "sig": ""}, {"keyid": "abcdef01", "sig": ""}),
            "signatures[1].keyid: a second signature by abcdef01",
        ),
        (b" " * (prov.ATTESTATION_LIMIT + 1), f"larger than {prov.ATTESTATION_LIMIT} bytes"),
    ],
)
def test_a_malformed_envelope_is_refused_by_name(data: bytes, message: str) -> None:
    with pytest.raises(VerificationError) as err:
        prov.parse_envelope(data, SOURCE)
    assert str(err.value) == f"{SOURCE}: {message}"


def test_url_safe_base64_is_read_as_dsse_allows() -> None:
    env = prov.parse_envelope(ENVELOPES[AttestationKind.PROVENANCE], SOURCE)
    doc = json.loads(env.to_json())
    doc["payload"] = base64.urlsafe_b64encode(env.payload).decode()
    assert prov.parse_envelope(json.dumps(doc).encode(), SOURCE).payload == env.payload


@given(st.binary(max_size=300))
def test_garbage_only_raises_verification_error(data: bytes) -> None:
    with pytest.raises(RefusalError):
        check_attestation(AttestationKind.PROVENANCE, data, ATTESTED, KEYS, SOURCE)


# -- small parts ---------------------------------------------------------------------------------


def test_debian_packages_are_read_as_import_debian_writes_them() -> None:
    text = "busybox-static\t1:1.35.0-4+deb12u1+b1\tamd64\tcontained\ngcc\t4:12.2.0-3\tamd64\tbuilt-with\n"
    assert prov.parse_debian_packages(text) == DEBIAN
    with pytest.raises(ValueError, match="line 2: expected name, version, architecture and role"):
        prov.parse_debian_packages("gcc\t1\tamd64\tbuilt-with\ngcc 1 amd64 contained\n")


def test_the_agent_takes_provenance_between_release_and_artifact() -> None:
    pinned = Pinned("web-1", "appimage", 2, require_provenance=True)
    state = TrustedState(pinned, NOW)
    with pytest.raises(RuntimeError, match="needs a trusted release first"):
        state.update_provenance(ENVELOPES[AttestationKind.PROVENANCE], KEYS, SOURCE)
    data = ATTESTED.to_json()
    state.update_target(3)
    assert state.latest == Latest(3, True)
    state.update_release(data, Expected(len(data), sha(data)))
    art = ATTESTED.artifact("appimage")
    assert art is not None
    with pytest.raises(RuntimeError, match="needs the release's provenance first"):
        state.update_artifact(Downloaded("blob", art.size, art.sha256))
    with pytest.raises(RuntimeError, match="not read where it does"):
        state.update_provenance(None, KEYS, SOURCE)
    assert state.update_provenance(ENVELOPES[AttestationKind.PROVENANCE], KEYS, SOURCE).keyid == (
        PUBLISHER.public_key.keyid
    )
    assert state.update_artifact(Downloaded("blob", art.size, art.sha256)) == art


def test_a_host_requiring_provenance_refuses_a_release_without() -> None:
    state = TrustedState(Pinned("web-1", "appimage", 2, require_provenance=True), NOW)
    data = RELEASE.to_json()
    state.update_target(3)
    state.update_release(data, Expected(len(data), sha(data)))
    with pytest.raises(RefusalError) as err:
        state.update_provenance(None, KEYS, SOURCE)
    assert err.value.reason is Reason.NO_PROVENANCE
    assert str(err.value) == "release 3 names no provenance, and this host requires it"
    assert state.provenance is None


def test_store_paths_are_read_from_nix_validity_registrations() -> None:
    dump = (
        f"/nix/store/b-image\n{sha(b'image')}\n8846768\n/nix/store/x-image.drv\n0\n"
        f"/nix/store/a-out\n{sha(b'out')}\n4926016\n/nix/store/y.drv\n1\n/nix/store/b-image\n"
        f"/nix/store/c-toolchain\n{sha(b'tc')}\n12700464\n\n0\n"
    )
    assert prov.parse_registrations(dump) == (
        prov.StorePath("/nix/store/a-out", sha(b"out"), 4926016),
        prov.StorePath("/nix/store/b-image", sha(b"image"), 8846768),
        prov.StorePath("/nix/store/c-toolchain", sha(b"tc"), 12700464),
    )
    assert prov.parse_registrations("") == ()
    for broken in (dump[:-20], dump.replace("8846768", "big"), dump.replace(sha(b"tc"), "sha256:abc")):
        with pytest.raises(ValueError):
            prov.parse_registrations(broken)
