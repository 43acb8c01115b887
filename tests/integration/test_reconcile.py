"""Commit -> reconcile -> signed artifacts in the store, with real git, Nix and gpg."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from reconciler.adapters.gpg import Verifier
from reconciler.config import load_config
from reconciler.core.release import parse_release
from reconciler.wiring import open_reconciler
from tests.conftest import WEB, ConfigRepo, Signing, cli, gpg_verify, standard_fleet, write_config

pytestmark = pytest.mark.integration


def latest(store: Path, host: str) -> dict[str, object]:
    data = json.loads((store / "hosts" / host / "latest.json").read_text())
    assert isinstance(data, dict)
    return data


def test_commit_publishes_signed_verified_artifacts(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing, gpg_home: Path
) -> None:
    commit = standard_fleet(config_repo)
    cfg = write_config(tmp_path, config_repo, signing)
    res = cli("reconcile", "-c", str(cfg))
    assert res.returncode == 0, res.stderr
    assert "web-1: published version 1" in res.stdout
    store = tmp_path / "store"

    for host, formats in (
        ("web-1", {"aci", "appimage"}),
        ("web-2", {"aci", "appimage"}),
        ("worker-1", {"aci"}),
    ):
        release_file = store / "hosts" / host / "releases" / "1.json"
        release = parse_release(release_file.read_bytes(), str(release_file))
        assert (release.host, release.version, release.commit) == (host, 1, commit)
        assert release.derivation.startswith("/nix/store/") and release.derivation.endswith(".drv")
        assert release.expires > release.created
        assert {a.format for a in release.artifacts} == formats
        # latest.json is the same document as the newest release
        assert (store / "hosts" / host / "latest.json").read_bytes() == release_file.read_bytes()
        for meta in (release_file, store / "hosts" / host / "latest.json"):
            v = gpg_verify(signing.public_key, meta, meta.with_name(meta.name + ".asc"), gpg_home)
            assert v.returncode == 0 and "Good signature" in v.stderr, v.stderr
        for art in release.artifacts:
            blob = store / art.blob
            assert blob.stat().st_size == art.size
            v = gpg_verify(signing.public_key, blob, blob.with_name(blob.name + ".asc"), gpg_home)
            assert v.returncode == 0 and "Good signature" in v.stderr, v.stderr
            if art.format == "aci":
                assert art.name == f"{host}-1-linux-amd64.aci"
                val = subprocess.run(["actool", "validate", str(blob)], capture_output=True, text=True)
                assert val.returncode == 0, val.stderr
            else:
                assert art.name == f"{host}-1-x86_64.AppImage"
                assert blob.read_bytes()[8:11] == b"AI\x02"

    with Verifier([(store / "keys/publisher.asc").read_bytes()]) as published_key:
        assert published_key.fingerprints == {signing.fingerprint}
    ok = cli("verify", "--key", str(signing.public_key), str(store / "hosts" / "web-1" / "latest.json"))
    assert ok.returncode == 0, ok.stderr
    assert "OK web-1-1-linux-amd64.aci" in ok.stdout
    status = cli("status", "-c", str(cfg), "--json")
    st = json.loads(status.stdout)
    assert st["commit"] == commit
    assert {h: v["version"] for h, v in st["hosts"].items()} == {"web-1": 1, "web-2": 1, "worker-1": 1}


def test_second_commit_publishes_version_2_for_the_changed_host_only(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    standard_fleet(config_repo)
    cfg = load_config(write_config(tmp_path, config_repo, signing))
    rec = open_reconciler(cfg)
    try:
        first = rec.reconcile()
        assert first.ok
        config_repo.write("hosts/web-1.yaml", WEB.format(name="web-1", address="10.42.0.99/24", port=18081))
        second_commit = config_repo.commit("move web-1")
        _, plan = rec.plan()
        assert [(e.host, e.action, e.reasons) for e in plan.entries] == [
            ("web-1", "rebuild", ("hosts/web-1.yaml changed",)),
            ("web-2", "unchanged", ("inputs unchanged",)),
            ("worker-1", "unchanged", ("inputs unchanged",)),
        ]
        second = rec.reconcile()
    finally:
        rec.close()
    assert second.ok
    assert [(o.host, o.version) for o in second.outcomes] == [("web-1", 2)]
    store = tmp_path / "store"
    assert latest(store, "web-1")["version"] == 2
    assert latest(store, "web-1")["commit"] == second_commit
    assert latest(store, "web-2")["version"] == 1
    assert sorted(p.name for p in (store / "hosts" / "web-2" / "releases").iterdir()) == [
        "1.inclusion.json",
        "1.json",
        "1.json.asc",
        "1.provenance.json",
        "1.sbom.json",
    ]
    assert (store / "hosts" / "web-1" / "releases" / "1.json").exists()  # history is kept


def test_invalid_host_is_reported_and_the_others_still_publish(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    standard_fleet(config_repo)
    config_repo.write("hosts/bad-1.yaml", "name: bad-1\nservices:\n  web:\n    exec: bin/busybox httpd\n")
    config_repo.commit("add a broken host")
    cfg = write_config(tmp_path, config_repo, signing)
    res = cli("reconcile", "-c", str(cfg))
    assert res.returncode == 1
    assert "hosts/bad-1.yaml: services.web.exec: must be a non-empty list of strings" in res.stdout
    assert "Traceback" not in res.stderr
    store = tmp_path / "store"
    for host in ("web-1", "web-2", "worker-1"):
        assert latest(store, host)["version"] == 1
    assert not (store / "hosts" / "bad-1").exists()
    status = json.loads(cli("status", "-c", str(cfg), "--json").stdout)
    assert status["hosts"]["bad-1"]["status"] == "invalid"
    assert "services.web.exec" in status["hosts"]["bad-1"]["error"]


def test_unusable_signing_key_fails_clearly_and_publishes_nothing(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    standard_fleet(config_repo)
    cfg = write_config(
        tmp_path, config_repo, signing, signing={"gnupghome": str(signing.gnupghome), "key": "0" * 40}
    )
    res = cli("reconcile", "-c", str(cfg))
    assert res.returncode == 1
    assert f"no secret key '{'0' * 40}'" in res.stdout
    assert not (tmp_path / "store" / "hosts").exists()


def test_bad_config_and_bad_verify_input_are_one_line_errors(tmp_path: Path, signing: Signing) -> None:
    bad = tmp_path / "reconciler.yaml"
    bad.write_text(
        "repo: {url: x}\nstore: {path: s}\nstate_dir: st\nsigning: {gnupghome: g, key: k}\njobs: 0\n"
    )
    res = cli("reconcile", "-c", str(bad))
    assert res.returncode == 1
    assert res.stderr.strip() == f"reconciler: error: {bad}: jobs: must be an integer from 1 to 64"
    res = cli("verify", "--key", str(signing.public_key), str(tmp_path / "missing.json"))
    assert res.returncode == 1
    assert res.stderr.startswith("reconciler: error: cannot fetch") and res.stderr.count("\n") == 1


def test_verify_refuses_a_tampered_artifact(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    standard_fleet(config_repo)
    cfg = write_config(tmp_path, config_repo, signing)
    assert cli("reconcile", "-c", str(cfg)).returncode == 0
    store = tmp_path / "store"
    release = parse_release((store / "hosts/web-1/latest.json").read_bytes(), "latest")
    blob = store / release.artifacts[0].blob
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF
    blob.write_bytes(bytes(data))
    res = cli("verify", "--key", str(signing.public_key), str(store / "hosts/web-1/latest.json"))
    assert res.returncode == 1
    assert "sha256" in res.stderr and "release says" in res.stderr
    res = cli("verify", "--key", str(signing.public_key), str(blob))
    assert res.returncode == 1
    assert "bad signature" in res.stderr


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_what_a_host_published_stays_published_while_its_file_is_invalid(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    standard_fleet(config_repo)
    cfg = str(write_config(tmp_path, config_repo, signing, retention={"keep": 1, "interval": 0}))
    assert cli("reconcile", "-c", cfg).returncode == 0
    # web-1 moves on to version 2, so gc has a release to delete (keep: 1).
    config_repo.write("hosts/web-1.yaml", WEB.format(name="web-1", address="10.42.0.99/24", port=18081))
    config_repo.commit("move web-1")
    assert cli("reconcile", "-c", cfg).returncode == 0
    store = tmp_path / "store"
    before = snapshot(store / "hosts" / "web-2")
    release = parse_release(before["latest.json"], "web-2 latest.json")
    blobs = {a.blob: (store / a.blob).read_bytes() for a in release.artifacts}
    blobs |= {b + ".asc": (store / (b + ".asc")).read_bytes() for b in list(blobs)}

    config_repo.write("hosts/web-2.yaml", "name: web-2\nservices:\n  web:\n    exec: bin/busybox httpd\n")
    config_repo.commit("break web-2")
    for _ in range(2):  # the pass that finds it invalid, and one that finds it still invalid
        res = cli("reconcile", "-c", cfg)
        assert res.returncode == 1
        assert "web-2: invalid (hosts/web-2.yaml: services.web.exec:" in res.stdout, res.stdout
        assert "Traceback" not in res.stderr
        status = json.loads(cli("status", "-c", cfg, "--json").stdout)["hosts"]["web-2"]
        assert (status["status"], status["version"]) == ("invalid", 1)
        assert "services.web.exec" in status["error"]
    gc = cli("gc", "-c", cfg)
    assert gc.returncode == 0, gc.stderr
    assert "deleted hosts/web-1/releases/1.json\n" in gc.stdout  # gc did run
    assert "web-2" not in gc.stdout

    assert snapshot(store / "hosts" / "web-2") == before
    assert {key: (store / key).read_bytes() for key in blobs} == blobs
    ok = cli("verify", "--key", str(signing.public_key), str(store / "hosts" / "web-2" / "latest.json"))
    assert ok.returncode == 0, ok.stderr
    for art in release.artifacts:
        assert f"OK {art.name} " in ok.stdout, ok.stdout


@pytest.mark.parametrize(
    ("extra", "said"),
    [
        (
            {
                "repo": {
                    "url": "REPO",
                    "verify_commits": {"keys": ["missing.asc"], "fingerprints": ["A" * 40]},
                }
            },
            "missing.asc",
        ),
        ({"store": {"type": "s3", "bucket": "fleet", "credentials_file": "missing.creds"}}, "missing.creds"),
    ],
    ids=["commit keys", "store credentials"],
)
def test_bad_keys_or_store_fail_before_the_state_is_created(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing, extra: dict[str, object], said: str
) -> None:
    standard_fleet(config_repo)
    repo = extra.get("repo")
    if repo is not None:
        assert isinstance(repo, dict)
        extra = {"repo": {**repo, "url": str(config_repo.path)}}
    cfg = write_config(tmp_path, config_repo, signing, **extra)
    res = cli("reconcile", "-c", str(cfg))
    assert res.returncode != 0 and said in res.stderr, res.stderr
    assert not (tmp_path / "state").exists()
