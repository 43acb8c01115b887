"""Provenance and SBOM of a release published by a real pass (Nix, gpg): checked by
`reconciler verify --provenance`, by the in-toto tooling (in-toto, securesystemslib,
in-toto-attestation, spdx-tools), against Nix's own hashes and dpkg, and refused by
both the CLI and an agent once tampered with."""

from __future__ import annotations

import base64
import hashlib
import json
import shutil
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from google.protobuf import json_format
from in_toto.models.metadata import Envelope as InTotoEnvelope
from in_toto.models.metadata import Metadata
from in_toto_attestation.predicates.provenance.v1 import provenance_pb2
from in_toto_attestation.v1 import statement_pb2
from in_toto_attestation.v1.statement import Statement as AttestationStatement
from securesystemslib.dsse import Envelope as SslibEnvelope
from securesystemslib.signer import GPGSigner, Key
from spdx_tools.spdx.parser.jsonlikedict.json_like_dict_parser import JsonLikeDictParser
from spdx_tools.spdx.validation.document_validator import validate_full_spdx_document

from reconciler.adapters.tufkeys import TufSigner
from reconciler.config import load_config
from reconciler.core import provenance as prov
from reconciler.core.layout import AttestationKind, attestation_path, release_path
from reconciler.core.release import Release, parse_release
from reconciler.demo import make_signing_key
from reconciler.wiring import open_reconciler
from tests.conftest import ConfigRepo, Signing, cli, stop_gpg_agent, write_config

pytestmark = pytest.mark.integration

SITE = """\
{ toolchain }:
derivation {
  name = "site";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  args = [ "sh" "-c" "${toolchain.busybox} mkdir -p $out/srv/www && echo NONCE > $out/srv/www/index.html" ];
}
"""
# Three artifact kinds and four OCI blobs: the subjects are all of them.
HOST = """\
name: web-1
formats: [aci, oci]
services:
  web: {package: site, exec: [bin/busybox, httpd, -f, -p, "8080", -h, srv/www]}
"""
PROVENANCE = attestation_path("web-1", 1, AttestationKind.PROVENANCE)
SBOM = attestation_path("web-1", 1, AttestationKind.SBOM)


@dataclass
class Published:
    store: Path
    release: Release
    commit: str
    repo: Path
    state: Path

    def envelope(self, key: str = PROVENANCE) -> bytes:
        return (self.store / key).read_bytes()


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory, signing: Signing) -> Published:
    root = tmp_path_factory.mktemp("provenance")
    repo = ConfigRepo(root / "repo")
    # A page of its own: Nix builds the image here, it is not in the store already.
    repo.write("packages/site.nix", SITE.replace("NONCE", uuid.uuid4().hex))
    repo.write("hosts/web-1.yaml", HOST)
    commit = repo.commit("web-1")
    cfg = load_config(write_config(root / "daemon", repo, signing))
    rec = open_reconciler(cfg)
    try:
        assert rec.reconcile().ok
    finally:
        rec.close()
    assert cfg.store.path is not None
    store = cfg.store.path
    release = parse_release((store / release_path("web-1", 1)).read_bytes(), "release")
    return Published(store, release, commit, repo.path, cfg.state_dir)


@pytest.fixture
def store_copy(published: Published, tmp_path: Path) -> Path:
    """A copy of the published store to tamper with."""
    copy = tmp_path / "store"
    shutil.copytree(published.store, copy)
    return copy


def verify_cli(signing: Signing, store: Path) -> subprocess.CompletedProcess[str]:
    return cli(
        "verify",
        "--provenance",
        "--key",
        str(signing.public_key),
        str(store / release_path("web-1", 1)),
        timeout=120,
    )


def publisher_key(signing: Signing, home: Path) -> Key:
    """The publisher's key as securesystemslib reads it from a keyring holding only its
    public half (what a third party verifying our attestations has)."""
    home.mkdir(mode=0o700)
    subprocess.run(["gpg", "--homedir", str(home), "-q", "--import", str(signing.public_key)], check=True)
    try:
        _, key = GPGSigner.import_(signing.fingerprint.lower(), str(home))
    finally:
        stop_gpg_agent(home)
    return key


def statement(data: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(base64.b64decode(json.loads(data)["payload"]))
    return doc


def test_our_cli_says_where_the_bytes_came_from(published: Published, signing: Signing) -> None:
    res = verify_cli(signing, published.store)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    prov_url = f"{published.store}/{PROVENANCE}"
    arts = len(published.release.artifacts)
    assert arts == 5  # the ACI, the OCI manifest, config and two layers
    assert f"OK {prov_url}: SLSA provenance v1 signed by {signing.fingerprint.lower()}, " in out
    assert f"of the release's {arts} artifacts" in out
    assert f"  source: {published.repo} branch main commit {published.commit}, host web-1" in out
    assert f"  derivation: {published.release.derivation}" in out
    nix = subprocess.run(["nix-store", "--version"], capture_output=True, text=True).stdout.split()[-1]
    assert f"  built by: nix {nix}, reconciler 0.1.0; on builder local" in out
    assert "  reproducibility check: not run" in out
    assert f"OK {published.store}/{SBOM}: SPDX 2.3 SBOM signed by {signing.fingerprint.lower()}" in out
    # Every artifact's bytes are checked too, by sha256: what runs on a host is one of them.
    for art in published.release.artifacts:
        assert f"OK {art.name} ({art.format}, {art.size} bytes, sha256 {art.sha256})" in out


def test_the_closure_is_recorded_by_the_nar_hash_nix_computes(published: Published) -> None:
    doc = statement(published.envelope())
    deps = doc["predicate"]["buildDefinition"]["resolvedDependencies"]
    paths = {d["name"]: d["digest"]["sha256"] for d in deps if d.get("mediaType") == prov.NAR_MEDIA_TYPE}
    for name in ("-reconciler-toolchain", "-site", "-host-web-1-image"):
        assert any(p.endswith(name) for p in paths), name
    # Each path's NAR serialised from its files now, not read from Nix's database.
    for path, digest in paths.items():
        nar = subprocess.run(["nix-store", "--dump", path], capture_output=True, check=True).stdout
        assert hashlib.sha256(nar).hexdigest() == digest, path
    (output,) = doc["predicate"]["runDetails"]["byproducts"]
    assert output["name"] not in paths
    assert {p.name for p in Path(output["name"]).iterdir()} >= {a.name for a in published.release.artifacts}


def test_the_sbom_lists_the_debian_packages_as_dpkg_knows_them(published: Published) -> None:
    doc = statement(published.envelope(SBOM))
    document = JsonLikeDictParser().parse(doc["predicate"])
    assert validate_full_spdx_document(document, "SPDX-2.3") == []
    versions = {p.name: p.version for p in document.packages if p.version}
    for name in ("busybox-static", "tar", "squashfs-tools", "libc6", "musl-tools"):
        dpkg = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", name], capture_output=True, text=True, check=True
        )
        assert versions[name] == dpkg.stdout, name


def test_the_in_toto_tooling_verifies_both_attestations(
    published: Published, signing: Signing, tmp_path: Path
) -> None:
    key = publisher_key(signing, tmp_path / "gnupg")
    for path, predicate_type in ((PROVENANCE, prov.SLSA_PROVENANCE), (SBOM, prov.SPDX_DOCUMENT)):
        data = published.envelope(path)
        # securesystemslib's DSSE, with the key as its GPGKey.
        env = SslibEnvelope.from_dict(json.loads(data))
        assert set(env.verify([key], 1)) == {signing.fingerprint.lower()}
        # in-toto reads it as an envelope of an in-toto payload and verifies it.
        meta = Metadata.load(str(published.store / path))
        assert isinstance(meta, InTotoEnvelope)
        meta.verify_signature({"keyid": key.keyid, **key.to_dict()})
        # in-toto-attestation's schema of a Statement, and SLSA provenance v1's.
        pb = json_format.Parse(env.payload, statement_pb2.Statement())
        AttestationStatement.copy_from_pb(pb).validate()
        assert pb.predicate_type == predicate_type
        assert sorted((s.name, s.digest["sha256"]) for s in pb.subject) == sorted(
            (a.name, a.sha256) for a in published.release.artifacts
        )
        if predicate_type == prov.SLSA_PROVENANCE:
            json_format.ParseDict(json.loads(env.payload)["predicate"], provenance_pb2.Provenance())


def _resign(
    published: Published, home: Path, fingerprint: str, change: Callable[[dict[str, Any]], None]
) -> bytes:
    """The provenance statement changed by ``change``, signed by ``fingerprint`` of
    ``home`` as the daemon signs."""
    doc = statement(published.envelope())
    change(doc)
    env = prov.Envelope(json.dumps(doc).encode(), prov.PAYLOAD_TYPE)
    sig = TufSigner(home, fingerprint).sign_attestation(env.pae())
    return replace(env, signatures=(sig,)).to_json()


@pytest.fixture
def stranger(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A gpg key the verifier does not pin."""
    home = tmp_path / "stranger"
    fpr = make_signing_key(home, name="Stranger")
    yield home, fpr
    stop_gpg_agent(home)


def _other_subject(doc: dict[str, Any]) -> None:
    doc["subject"][0]["digest"]["sha256"] = "0" * 64


@pytest.mark.parametrize("how", ["payload", "payload-type", "subject-digest", "unknown-key"])
def test_each_tampering_fails_verification(
    published: Published,
    signing: Signing,
    store_copy: Path,
    stranger: tuple[Path, str],
    how: str,
) -> None:
    target = store_copy / PROVENANCE
    data = published.envelope()
    first = published.release.artifacts[0].name
    if how == "payload":
        # The commit claimed, changed under the signature.
        doc = json.loads(data)
        payload = statement(data)
        payload["predicate"]["buildDefinition"]["externalParameters"]["commit"] = "f" * 40
        doc["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
        target.write_text(json.dumps(doc))
        expected = "bad signature"
    elif how == "payload-type":
        doc = json.loads(data)
        doc["payloadType"] = "application/vnd.in-toto.provenance+json"
        target.write_text(json.dumps(doc))
        expected = (
            "payloadType is 'application/vnd.in-toto.provenance+json', not 'application/vnd.in-toto+json'"
        )
    elif how == "subject-digest":
        # Signed by the publisher's own key, but about other bytes than the release's.
        target.write_bytes(_resign(published, signing.gnupghome, signing.fingerprint, _other_subject))
        sha = next(a.sha256 for a in published.release.artifacts if a.name == first)
        expected = f"subject {first} has sha256 {'0' * 64}, the release says {sha}"
    else:
        home, fpr = stranger
        target.write_bytes(_resign(published, home, fpr, lambda doc: None))
        expected = "no signature by a pinned key"
    res = verify_cli(signing, store_copy)
    assert res.returncode == 1
    assert res.stderr.startswith(f"reconciler: error: {target}: "), res.stderr
    assert expected in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_a_release_without_provenance_fails_verify_provenance(
    published: Published, signing: Signing, store_copy: Path
) -> None:
    # As a release published before provenance: the same artifacts, no attestations,
    # signed by the publisher.
    meta = store_copy / release_path("web-1", 1)
    old = replace(published.release, attestations=()).to_json()
    meta.write_bytes(old)
    sig = subprocess.run(
        ["gpg", "--homedir", str(signing.gnupghome), "--armor", "--detach-sign", "-u", signing.fingerprint],
        input=old,
        capture_output=True,
        check=True,
    )
    meta.with_name(meta.name + ".asc").write_bytes(sig.stdout)
    plain = cli("verify", "--key", str(signing.public_key), str(meta), timeout=120)
    assert plain.returncode == 0, plain.stderr
    res = verify_cli(signing, store_copy)
    assert res.returncode == 1
    assert res.stderr.strip() == (
        f"reconciler: error: {meta}: names no provenance attestation (published before provenance?)"
    )


def _agent_config(tmp: Path, store: Path, signing: Signing) -> Path:
    cfg = tmp / "agent.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "host": "web-1",
                "store": str(store),
                "keys": [str(signing.public_key)],
                "state_dir": str(tmp / "agent-state"),
                "format": "aci",
                "require_provenance": True,
                "metrics_file": str(tmp / "agent.prom"),
            }
        )
    )
    return cfg


def test_an_agent_requiring_provenance_refuses_a_tampered_one_and_takes_the_real_one(
    published: Published, signing: Signing, store_copy: Path, tmp_path: Path
) -> None:
    target = store_copy / PROVENANCE
    good = target.read_bytes()
    doc = json.loads(good)
    payload = statement(good)
    payload["predicate"]["buildDefinition"]["externalParameters"]["repository"] = "https://evil.example/fleet"
    doc["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    target.write_text(json.dumps(doc))
    cfg = _agent_config(tmp_path, store_copy, signing)
    refused = cli("agent", "-c", str(cfg), "--once", timeout=120)
    assert refused.returncode == 1, refused.stderr
    # Not the bytes the signed release names: the store's doing, not the release's.
    assert "agent_refused" in refused.stderr and "reason=tampered" in refused.stderr
    metrics = (tmp_path / "agent.prom").read_text()
    assert 'reconciler_agent_refusals_total{reason="tampered"} 1.0' in metrics
    assert not (tmp_path / "agent-state" / "current").exists()
    # The real provenance: the same agent tries again, and takes it.
    target.write_bytes(good)
    ok = cli("agent", "-c", str(cfg), "--once", timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "agent_provenance" in ok.stderr
    aci = published.release.artifact("aci")
    assert aci is not None
    assert (tmp_path / "agent-state" / "current" / aci.name).is_file()


def test_provenance_is_a_release_files_not_an_artifacts(published: Published, signing: Signing) -> None:
    blob = published.store / published.release.artifacts[0].blob
    res = cli("verify", "--provenance", "--key", str(signing.public_key), str(blob), timeout=60)
    assert res.returncode == 1
    assert (
        res.stderr.strip()
        == f"reconciler: error: {blob}: --provenance checks a release file, not an artifact"
    )


def test_a_key_behind_a_passphrase_file_signs_attestations_securesystemslib_verifies(tmp_path: Path) -> None:
    home = tmp_path / "protected"
    home.mkdir(mode=0o700)
    gpg = ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback"]
    subprocess.run(
        [*gpg, "--passphrase", "right", "--quick-gen-key", "P <p@example.invalid>", "ed25519", "sign", "0"],
        check=True,
        capture_output=True,
    )
    # No agent holds the passphrase: only the file can give it.
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "all"], check=True)
    listing = subprocess.run(
        ["gpg", "--homedir", str(home), "--with-colons", "--list-secret-keys"], capture_output=True, text=True
    ).stdout
    fpr = next(ln.split(":")[9] for ln in listing.splitlines() if ln.startswith("fpr:"))
    (tmp_path / "passphrase").write_text("right\n")
    try:
        env = prov.Envelope(b'{"_type": "x"}', prov.PAYLOAD_TYPE)
        sig = TufSigner(home, fpr, tmp_path / "passphrase").sign_attestation(env.pae())
        signed = SslibEnvelope.from_dict(json.loads(replace(env, signatures=(sig,)).to_json()))
        _, key = GPGSigner.import_(fpr.lower(), str(home))
        assert set(signed.verify([key], 1)) == {fpr.lower()}
    finally:
        stop_gpg_agent(home)
