"""`plan` and `build` beside a daemon's pass: they share its steps, not its checkout.

Real git, Nix and gpg; the CLI as operators run it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from reconciler.adapters.tree import read_tree
from reconciler.config import load_config
from reconciler.core.appc import PortProtocol
from reconciler.core.hosts import Port, parse_fleet
from tests.conftest import ConfigRepo, Signing, aci_file, cli, stop_gpg_agent, wait_for, write_config

pytestmark = pytest.mark.integration

# A package whose build takes long enough for a command to run beside it; the nonce
# keeps Nix from finding it built by an earlier run.
SLOW = """{{ toolchain }}:
derivation {{
  name = "slow";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  nonce = "{nonce}";
  args = [ "sh" "-c" "${{toolchain.busybox}} sleep 8; ${{toolchain.busybox}} mkdir -p $out/srv" ];
}}
"""
SITE = """{{ toolchain }}:
derivation {{
  name = "site";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  args = [ "sh" "-c" "${{toolchain.busybox}} mkdir -p $out/srv && echo {text} > $out/srv/index.html" ];
}}
"""
NONCE = uuid.uuid4().hex
HOST = (
    "name: {name}\nformats: [aci]\nservices:\n  s: {{package: {package}, exec: [bin/busybox, sleep, '9']}}\n"
)


def fleet(repo: ConfigRepo, text: str) -> str:
    repo.write("packages/slow.nix", SLOW.format(nonce=NONCE))
    repo.write("packages/site.nix", SITE.format(text=text))
    repo.write("hosts/a-slow.yaml", HOST.format(name="a-slow", package="slow"))
    repo.write("hosts/b-site.yaml", HOST.format(name="b-site", package="site"))
    return repo.commit(f"site says {text}")


def test_plan_during_a_pass_changes_nothing_the_pass_builds(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    first = fleet(config_repo, "first")
    cfg = write_config(tmp_path, config_repo, signing, jobs=1)
    log = tmp_path / "reconcile.log"
    with log.open("w") as err:
        # a-slow builds first (hosts build in name order, one at a time), b-site after it.
        rec = subprocess.Popen(
            [sys.executable, "-m", "reconciler", "reconcile", "-c", str(cfg)],
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            text=True,
        )
    try:
        wait_for(lambda: "event=host_build host=a-slow" in log.read_text(), 120, "a-slow's build to start")
        second = fleet(config_repo, "second")
        planned = cli("plan", "-c", str(cfg), "--json")
        assert planned.returncode == 0, planned.stderr
        assert json.loads(planned.stdout)["commit"] == second
        # The plan ran while a-slow was still building.
        assert "host_published host=a-slow" not in log.read_text()
        rec.communicate(timeout=600)
    finally:
        rec.kill()
    assert rec.returncode == 0, log.read_text()[-3000:]
    store = tmp_path / "store"
    release = json.loads((store / "hosts/b-site/releases/1.json").read_text())
    assert release["commit"] == first
    # What the release says it was built from is what it holds.
    assert aci_file(store, "b-site", "srv/index.html", version=1) == b"first\n"


def files_in(folder: Path) -> dict[Path, tuple[int, bytes]]:
    """Each path under ``folder``: when it last changed, and a file's content."""
    return {p: (p.lstat().st_mtime_ns, p.read_bytes() if p.is_file() else b"") for p in folder.rglob("*")}


def test_plan_writes_nothing(tmp_path: Path, config_repo: ConfigRepo, signing: Signing) -> None:
    fleet(config_repo, "first")
    cfg = write_config(tmp_path, config_repo, signing)
    state = tmp_path / "state"
    planned = cli("plan", "-c", str(cfg))
    assert planned.returncode == 0, planned.stderr
    assert "b-site: rebuild: new host, never published" in planned.stdout
    assert planned.stdout.splitlines()[-1].startswith("plan: 2 to rebuild, 0 to remove, 0 invalid")
    assert cli("plan", "-c", str(cfg), "--detailed-exitcode").returncode == 2
    # No ledger, no clone of the daemon's: only the content-addressed toolchain cache.
    assert not (state / "state.db").exists()
    assert not (state / "checkout").exists() and not (state / "tree").exists()

    assert cli("reconcile", "-c", str(cfg)).returncode == 0
    fleet(config_repo, "second")
    # Git would repack the daemon's clone after a fetch leaving a second pack, in the
    # foreground: a plan leaves that housekeeping to the daemon's own fetches.
    for key, value in (("gc.autoPackLimit", "1"), ("fetch.unpackLimit", "1"), ("gc.autoDetach", "false")):
        subprocess.run(["git", "-C", str(state / "checkout"), "config", key, value], check=True)
    subprocess.run(["git", "-C", str(state / "checkout"), "repack", "-q"], check=True)
    packs = set((state / "checkout/.git/objects/pack").glob("*.pack"))
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in state.glob("state.db*")}
    # What the daemon's Nix reads: the tree its last pass wrote out.
    tree = files_in(state / "tree")
    assert tree and (state / "tree/packages/site.nix") in tree
    planned = cli("plan", "-c", str(cfg))
    assert planned.returncode == 0, planned.stderr
    assert "b-site: rebuild: packages/site.nix changed" in planned.stdout
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in state.glob("state.db*")} == before
    assert files_in(state / "tree") == tree
    assert packs < set((state / "checkout/.git/objects/pack").glob("*.pack"))
    # Nothing to do once reconciled: 0 with --detailed-exitcode too.
    assert cli("reconcile", "-c", str(cfg)).returncode == 0
    quiet = cli("plan", "-c", str(cfg), "--detailed-exitcode")
    assert quiet.returncode == 0 and "plan: 0 to rebuild" in quiet.stdout, quiet.stdout


def test_build_keeps_the_published_builds_gc_root(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    fleet(config_repo, "first")
    cfg = write_config(tmp_path, config_repo, signing)
    assert cli("reconcile", "-c", str(cfg)).returncode == 0
    root = tmp_path / "state" / "gcroots" / "b-site"
    published = os.readlink(root)
    fleet(config_repo, "second")
    built = cli("build", "-c", str(cfg), "b-site")
    assert built.returncode == 0, built.stderr
    assert os.readlink(root) == published
    # The command's own build is kept under a root of its own, through which it
    # printed the artifacts.
    mine = tmp_path / "state" / "gcroots" / "b-site.build"
    assert os.readlink(mine) != published
    assert built.stdout.strip() == f"{mine}/b-site-2-linux-amd64.aci"


# What only signing, pinning, checking commit signatures, an s3 store, a parse spread
# over processes, building and publishing, provenance or metrics need: together they
# took longer to import than a plan of a thousand hosts takes to run (issue 13).
NOT_FOR_A_PLAN = (
    "boto3",
    "botocore",
    "tuf",
    "securesystemslib",
    "watchdog",
    "gnupg",
    "multiprocessing",
    "prometheus_client",
    "http.server",
    "reconciler.daemon.reconciler",
    "reconciler.daemon.metrics",
    "reconciler.core.provenance",
    "reconciler.adapters.appimage",
)
# The plan command, then the modules it imported, one a line, after a marker.
PLAN_IMPORTS = """
import sys
from reconciler import cli
code = cli.main(sys.argv[1:])
print("--- imported")
print("\\n".join(sorted(sys.modules)))
sys.exit(code)
"""


def test_plan_imports_nothing_for_signing_or_s3(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    fleet(config_repo, "first")
    cfg = write_config(tmp_path, config_repo, signing)
    planned = subprocess.run(
        [sys.executable, "-c", PLAN_IMPORTS, "plan", "-c", str(cfg)],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    assert planned.returncode == 0, planned.stderr
    out, _, imported = planned.stdout.partition("--- imported\n")
    assert "b-site: rebuild: new host, never published" in out
    modules = imported.split()
    assert [m for m in modules if m in NOT_FOR_A_PLAN or m.split(".")[0] in NOT_FOR_A_PLAN] == []


def test_init_makes_an_rsa_key_and_a_fleet_declaring_ports_under_a_name_prefix(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    res = cli("init", str(demo))
    assert res.returncode == 0, res.stderr
    try:
        keys = subprocess.run(
            ["gpg", "--homedir", str(demo / "gnupg"), "--with-colons", "--list-secret-keys"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    finally:
        stop_gpg_agent(demo / "gnupg")
    # OpenPGP public key algorithm 1 (RSA), 3072 bits: what rkt's library verifies
    # (it refuses EdDSA, algorithm 22).
    (sec,) = [line.split(":") for line in keys.splitlines() if line.startswith("sec:")]
    assert (sec[3], sec[2]) == ("1", "3072")
    cfg = load_config(demo / "reconciler.yaml")
    assert cfg.images.name_prefix == "example.com/fleet"
    fleet = parse_fleet(read_tree(demo / "repo"))
    assert fleet.errors == ()
    (web,) = fleet.hosts["web-1"].services
    assert web.ports == (Port("http", 8081, PortProtocol.TCP),)
