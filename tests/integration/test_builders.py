"""Nix remote builders for real on one machine: an sshd on 127.0.0.1 whose root runs
`nix-daemon --stdio` over a second Nix store (`remote-store=local?root=...`)."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from reconciler.config import load_config
from reconciler.core.release import parse_release
from reconciler.daemon.reconciler import Reconciler, status
from reconciler.wiring import open_reconciler
from tests.conftest import ConfigRepo, Signing, free_port, write_config
from tests.integration.test_sources import Sshd

pytestmark = pytest.mark.integration


def tiny_host(repo: ConfigRepo) -> None:
    """One ACI-only host, new to every store (a nonce), so Nix really builds it."""
    repo.write(
        "hosts/tiny.yaml",
        f"name: tiny\nformats: [aci]\nfiles: {{etc/nonce: '{uuid.uuid4()}'}}\n"
        "services:\n  idle: {exec: [bin/busybox, sleep, '3600']}\n",
    )
    repo.commit("tiny")


def second_store(root: Path) -> str:
    """A Nix store under ``root`` as a builder's remote-store. Build users are the
    machine's, so the locks that give each build its own user must be the machine's too."""
    state = root / "nix/var/nix"
    state.mkdir(parents=True)
    pool = Path("/nix/var/nix/userpool")
    pool.mkdir(parents=True, exist_ok=True)
    (state / "userpool").symlink_to(pool)
    return f"local%3Froot%3D{root}"


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[Sshd]:
    if not Path("/usr/sbin/sshd").exists() or shutil.which("nix-daemon") is None:
        pytest.skip("needs openssh-server and nix-daemon (scripts/setup installs them)")
    server = Sshd(tmp_path / "ssh")
    yield server
    server.stop()


def host_key(tmp_path: Path, name: str = "host") -> str:
    return (tmp_path / "ssh" / f"{name}.pub").read_text().strip()


def one_pass(cfg_path: Path) -> tuple[Reconciler, bool, str | None]:
    rec = open_reconciler(load_config(cfg_path))
    result = rec.reconcile()
    (outcome,) = result.outcomes
    return rec, outcome.ok, outcome.error


def builds(rec: Reconciler, builder: str, result: str) -> float:
    value = rec.metrics.registry.get_sample_value(
        "reconciler_builder_builds_total", {"builder": builder, "result": result}
    )
    return value or 0.0


def test_a_host_is_built_on_the_builder_and_copied_back(
    tmp_path: Path, sshd: Sshd, config_repo: ConfigRepo, signing: Signing
) -> None:
    tiny_host(config_repo)
    remote = tmp_path / "builder"
    builder = {
        "name": "b1",
        "uri": f"ssh-ng://root@127.0.0.1:{sshd.port}?remote-store={second_store(remote)}",
        "ssh_key": str(sshd.key),
        "host_key": host_key(tmp_path),
    }
    cfg = write_config(tmp_path, config_repo, signing, builders=[builder])
    nix = yaml_nix(cfg, local_builds=False)
    rec, ok, error = one_pass(nix)
    try:
        assert ok, error
        assert builds(rec, "b1", "success") == 1
        assert builds(rec, "local", "success") == 0
        assert rec.metrics.registry.get_sample_value(
            "reconciler_builder_build_duration_seconds_count", {"builder": "b1"}
        )
        b1 = status(rec.state)["builders"]["b1"]  # type: ignore[index]
        assert b1["builds"] == 1 and b1["last_build"] and b1["last_error"] is None
    finally:
        rec.close()
    # Built there, and copied back: the output is in both stores.
    release_file = tmp_path / "store/hosts/tiny/releases/1.json"
    drv = parse_release(release_file.read_bytes(), str(release_file)).derivation
    out = subprocess.run(["nix-store", "-q", "--outputs", drv], capture_output=True, text=True, check=True)
    out_path = Path(out.stdout.strip())
    assert out_path.is_dir()
    assert (remote / out_path.relative_to("/")).is_dir()


def test_a_dead_builder_fails_over_to_local_builds(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    tiny_host(config_repo)
    tmp_path.joinpath("keys").mkdir()
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "keys/k")], check=True
    )
    dead = {
        "name": "dead",
        # Nothing listens on this port.
        "uri": f"ssh-ng://root@127.0.0.1:{free_port()}?remote-store={second_store(tmp_path / 'builder')}",
        "ssh_key": str(tmp_path / "keys/k"),
        "host_key": (tmp_path / "keys/k.pub").read_text(),
    }
    cfg = write_config(tmp_path, config_repo, signing, builders=[dead])
    rec, ok, error = one_pass(yaml_nix(cfg, local_builds=True))
    try:
        assert ok, error
        assert builds(rec, "dead", "unreachable") == 1
        assert builds(rec, "local", "success") == 1
        row = status(rec.state)["builders"]["dead"]  # type: ignore[index]
        assert row["unreachable"] == 1 and "Connection refused" in row["last_error"], row
    finally:
        rec.close()


def test_an_unknown_host_key_is_refused_naming_the_builder(
    tmp_path: Path, sshd: Sshd, config_repo: ConfigRepo, signing: Signing
) -> None:
    tiny_host(config_repo)
    remote = tmp_path / "builder"
    impostor = {
        "name": "b1",
        "uri": f"ssh-ng://root@127.0.0.1:{sshd.port}?remote-store={second_store(remote)}",
        "ssh_key": str(sshd.key),
        # The builder's real key is not this one: ssh must not talk to it.
        "host_key": host_key(tmp_path, "other-host"),
    }
    cfg = write_config(tmp_path, config_repo, signing, builders=[impostor])
    rec, ok, error = one_pass(yaml_nix(cfg, local_builds=False))
    try:
        assert not ok
        assert error is not None and "builder b1 refused: Host key verification failed." in error, error
        assert builds(rec, "b1", "unreachable") == 1
        assert builds(rec, "b1", "success") == 0
        assert status(rec.state)["hosts"]["tiny"]["status"] == "failed"  # type: ignore[index]
    finally:
        rec.close()
    assert not (remote / "nix/store").exists() or not any((remote / "nix/store").iterdir())


def yaml_nix(cfg: Path, local_builds: bool) -> Path:
    """``cfg`` with nix.local_builds set."""
    data = yaml.safe_load(cfg.read_text())
    data["nix"]["local_builds"] = local_builds
    cfg.write_text(yaml.safe_dump(data))
    return cfg
