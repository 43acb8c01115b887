"""Faults during reconcile and publish: kill -9 anywhere, full disk, store outage, gpg failure.

Whatever happens, a reader of the store never sees a latest.json pointing at a
missing or unsigned object, and what failed is said in one clear error and a metric.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.adapters.gpg import Verifier
from reconciler.config import load_config
from reconciler.core.release import parse_release
from reconciler.daemon.reconciler import Reconciler
from reconciler.errors import StoreError
from reconciler.wiring import audit_log, open_reconciler
from tests.conftest import WEB, ConfigRepo, Signing, standard_fleet, stop_gpg_agent, write_config

pytestmark = pytest.mark.integration

KILL_RUNS = 50
HOSTS = ("web-1", "web-2", "worker-1")


def check_store(store: Path, verifier: Verifier) -> dict[str, int]:
    """Assert SPEC's reader guarantee; return each host's latest version."""
    versions = {}
    for host_dir in sorted((store / "hosts").glob("*")) if (store / "hosts").exists() else []:
        latest = host_dir / "latest.json"
        if not latest.exists():
            # Nothing points at anything yet; whatever else is there is unreachable.
            continue
        data = latest.read_bytes()
        sig = latest.with_name("latest.json.asc")
        assert sig.exists(), f"{latest} is unsigned"
        verifier.verify_bytes(data, sig.read_bytes(), str(latest))
        release = parse_release(data, str(latest))
        versions[host_dir.name] = release.version
        immutable = host_dir / "releases" / f"{release.version}.json"
        assert immutable.read_bytes() == data, f"{latest} differs from {immutable}"
        assert immutable.with_name(immutable.name + ".asc").exists()
        for art in release.artifacts:
            blob = store / art.blob
            assert blob.exists(), f"{latest} points at missing {art.blob}"
            assert blob.with_name(blob.name + ".asc").exists(), f"{art.blob} is unsigned"
            with blob.open("rb") as f:
                assert hashlib.file_digest(f, "sha256").hexdigest() == art.sha256
        assert release.attestations, f"{latest} names no attestations"
        for att in release.attestations:
            path = store / att.path
            assert path.exists(), f"{latest} points at missing {att.path}"
            assert hashlib.sha256(path.read_bytes()).hexdigest() == att.sha256, att.path
    return versions


@pytest.fixture
def fleet(config_repo: ConfigRepo) -> ConfigRepo:
    standard_fleet(config_repo)
    return config_repo


@pytest.fixture
def verifier(signing: Signing) -> Iterator[Verifier]:
    with Verifier([signing.public_key.read_bytes()]) as v:
        yield v


def reconcile_cmd(cfg: Path) -> list[str]:
    return [sys.executable, "-m", "reconciler", "reconcile", "-c", str(cfg)]


def test_kill_9_at_many_points_never_exposes_a_broken_release(
    tmp_path: Path, fleet: ConfigRepo, signing: Signing, verifier: Verifier
) -> None:
    cfg = write_config(tmp_path, fleet, signing)
    config = load_config(cfg)
    store = config.store.path
    assert store is not None, "the test's store is a directory"
    # How long a whole pass takes here, Nix outputs already built: kills spread over it.
    warm = tmp_path / "warm"
    t = time.monotonic()
    subprocess.run(
        reconcile_cmd(write_config(warm, fleet, signing)), check=True, capture_output=True, timeout=600
    )
    span = time.monotonic() - t
    rng = random.Random(20261124)
    published_before: dict[str, int] = {}
    killed_mid_pass = 0
    for run in range(KILL_RUNS):
        # Every fifth run starts afresh; the others resume whatever the last kill left.
        if run % 5 == 0:
            shutil.rmtree(store, ignore_errors=True)
            shutil.rmtree(config.state_dir, ignore_errors=True)
            published_before = {}
        proc = subprocess.Popen(reconcile_cmd(cfg), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # The kill lands at the drawn moment; a pass that ends before it is not waited for.
        # Moments are drawn over the first three quarters of a whole pass: resumed passes
        # have less to do, and a kill after a pass ended tests nothing.
        try:
            proc.wait(rng.uniform(0.0, 0.75 * span))
        except subprocess.TimeoutExpired:
            killed_mid_pass += 1
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        versions = check_store(store, verifier)
        # A kill never takes back or skips a version: each host is at 1 or unpublished.
        assert set(versions.values()) <= {1}, versions
        assert versions.keys() >= published_before.keys()
        published_before = versions
        if run % 5 == 4:
            done = subprocess.run(reconcile_cmd(cfg), capture_output=True, text=True, timeout=600)
            assert done.returncode == 0, done.stderr
            # Hosts already published are not published again; the rest are, as version 1.
            assert "published version 2" not in done.stdout
            assert check_store(store, verifier) == dict.fromkeys(HOSTS, 1)
            for host in HOSTS:
                listed = store / "hosts" / host / "releases"
                releases = sorted(p.name for p in listed.iterdir())
                assert releases == [
                    "1.inclusion.json",
                    "1.json",
                    "1.json.asc",
                    "1.provenance.json",
                    "1.sbom.json",
                ], (host, releases)
            # The transparency log continued as one history through every kill, and
            # holds each release once.
            found = audit_log(config, None, [signing.public_key], [], [])
            assert found.problems == [] and found.entries == len(HOSTS), found
            # What writes cut short by the kills left, the completing pass removed.
            assert not list(store.rglob(".tmp-*"))
    # The kills must have hit passes in flight, not only finished ones (resumed passes
    # have less to do, so some end before their kill).
    assert killed_mid_pass >= KILL_RUNS // 3, killed_mid_pass


def metrics_of(rec: Reconciler) -> dict[str, float]:
    reg = rec.metrics.registry
    names = ("reconciler_publish_failures_total", "reconciler_signing_failures_total")
    out = {n: reg.get_sample_value(n) or 0.0 for n in names}
    out["builds_failed"] = reg.get_sample_value("reconciler_host_builds_total", {"result": "failure"}) or 0.0
    out["runs_failed"] = reg.get_sample_value("reconciler_reconcile_runs_total", {"result": "failure"}) or 0.0
    return out


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 3 MiB tmpfs: room for metadata, not for a 4 MB AppImage."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_fails_clearly_with_a_metric_and_no_partial_release(
    tmp_path: Path, fleet: ConfigRepo, signing: Signing, verifier: Verifier, small_disk: Path
) -> None:
    store = small_disk / "store"
    rec = open_reconciler(
        load_config(write_config(tmp_path, fleet, signing, store={"type": "filesystem", "path": str(store)}))
    )
    try:
        result = rec.reconcile()
        errors = {o.host: o.error for o in result.outcomes if not o.ok}
        assert errors, "everything fit in 3 MiB?"
        assert all(e and "disk full" in e and str(store) in e for e in errors.values()), errors
        assert metrics_of(rec)["reconciler_publish_failures_total"] == len(errors)
        assert rec.state.hosts()["web-1"].status == "failed"
    finally:
        rec.close()
    check_store(store, verifier)
    for host in errors:
        assert not (store / "hosts" / host / "latest.json").exists()
    assert not list(store.rglob(".tmp-*")), "a temporary file was left on the full disk"


def test_store_outage_fails_clearly_with_a_metric_and_no_partial_release(
    tmp_path: Path, fleet: ConfigRepo, signing: Signing
) -> None:
    # The store's directory is unusable: a file stands where it should be.
    blocked = tmp_path / "store"
    blocked.write_text("not a directory\n")
    rec = open_reconciler(load_config(write_config(tmp_path, fleet, signing)))
    try:
        # The first write of a pass is the store's publisher lease: the pass stops there,
        # before building anything, naming the store.
        with pytest.raises(StoreError, match=f"^cannot create lease/1.json in {blocked}: Not a directory$"):
            rec.reconcile()
        assert metrics_of(rec)["runs_failed"] == 1
        assert metrics_of(rec)["builds_failed"] == 0
    finally:
        rec.close()
    assert blocked.read_text() == "not a directory\n"
    res = subprocess.run(
        [sys.executable, "-m", "reconciler", "reconcile", "-c", str(tmp_path / "reconciler.yaml")],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1
    assert res.stderr.splitlines()[-1:] == [
        f"reconciler: error: cannot create lease/1.json in {blocked}: Not a directory"
    ]
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("fault", ["secret key gone", "wrong passphrase"])
def test_gpg_failure_fails_clearly_with_a_metric_and_publishes_nothing(
    tmp_path: Path, fleet: ConfigRepo, signing: Signing, fault: str
) -> None:
    home = tmp_path / "gnupg"
    if fault == "secret key gone":
        # A copy of the keyring without the secret key material.
        shutil.copytree(signing.gnupghome, home, ignore=shutil.ignore_patterns("S.*"))
        shutil.rmtree(home / "private-keys-v1.d")
        (home / "private-keys-v1.d").mkdir(mode=0o700)
        fpr, extra, expected = signing.fingerprint, {}, "no secret key"
    else:
        # A protected key and the wrong passphrase: gpg itself refuses to sign.
        home.mkdir(mode=0o700)
        gen = [
            "gpg",
            "--homedir",
            str(home),
            "--batch",
            "--pinentry-mode",
            "loopback",
            "--passphrase",
            "right",
        ]
        subprocess.run(
            [*gen, "--quick-gen-key", "Protected <p@example.invalid>", "ed25519", "sign", "0"], check=True
        )
        listing = subprocess.run(
            ["gpg", "--homedir", str(home), "--with-colons", "--list-secret-keys"],
            capture_output=True,
            text=True,
        ).stdout
        fpr = next(ln.split(":")[9] for ln in listing.splitlines() if ln.startswith("fpr:"))
        (tmp_path / "passphrase").write_text("wrong\n")
        extra, expected = {"passphrase_file": str(tmp_path / "passphrase")}, "gpg could not sign"
    cfg = write_config(tmp_path, fleet, signing, signing={"gnupghome": str(home), "key": fpr, **extra})
    rec = open_reconciler(load_config(cfg))
    try:
        result = rec.reconcile()
        errors = [o.error or "" for o in result.outcomes]
        assert len(errors) == 3 and all(expected in e for e in errors), errors
        assert metrics_of(rec)["reconciler_signing_failures_total"] >= 3
    finally:
        rec.close()
        stop_gpg_agent(home)
    store = tmp_path / "store"
    assert not list(store.glob("hosts/*/latest.json"))
    assert not list(store.glob("hosts/*/releases/*.json"))


def test_a_corrupt_checkout_is_cloned_again_and_the_pass_goes_on(
    tmp_path: Path, fleet: ConfigRepo, signing: Signing, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config(write_config(tmp_path, fleet, signing))
    rec = open_reconciler(cfg)
    try:
        assert rec.reconcile().ok
        # Every object of the daemon's own clone is lost or damaged and its ref of the
        # branch half-written (a disk error, an interrupted gc): the remote is fine.
        # (Damaged objects alone a fetch heals: it finds none here and fetches all.)
        git_dir = cfg.state_dir / "checkout" / ".git"
        for f in [f for f in (git_dir / "objects").rglob("*") if f.is_file() and f.parent.name != "info"]:
            f.write_bytes(b"")
        (git_dir / "refs/remotes/origin/main").write_text("d1f")
        fleet.write("hosts/web-1.yaml", WEB.format(name="web-1", address="10.42.0.99/24", port=18081))
        fleet.commit("a change after the damage")
        result = rec.reconcile()
        assert result.ok, [(e.host, e.reasons) for e in result.plan.entries]
        assert {o.host: o.version for o in result.outcomes} == {"web-1": 2}
        assert [r for r in caplog.records if r.getMessage() == "checkout_repaired"]
    finally:
        rec.close()


def test_an_unreachable_remote_is_not_mistaken_for_a_corrupt_checkout(
    tmp_path: Path, fleet: ConfigRepo, signing: Signing, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config(write_config(tmp_path, fleet, signing))
    rec = open_reconciler(cfg)
    try:
        assert rec.reconcile().ok
        clone = cfg.state_dir / "checkout"
        shutil.move(fleet.path, tmp_path / "moved-away")
        with pytest.raises(Exception, match="cannot fetch"):
            rec.reconcile()
        # The clone is kept for when the remote is back.
        assert (clone / ".git").is_dir()
        assert not [r for r in caplog.records if r.getMessage() == "checkout_repaired"]
    finally:
        rec.close()
