"""Parallel evaluation with real Nix: shards over several nix-instantiate processes give the
result of one evaluation, and a host that blows the memory limit fails alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.adapters.nix import Nix
from reconciler.adapters.tree import read_tree
from reconciler.config import NixConfig
from reconciler.core.hosts import Fleet, parse_fleet
from reconciler.core.model import Evaluation
from tests.conftest import SITE, TOOLCHAIN_DIR, ConfigRepo, Signing, cli, standard_fleet, write_config

pytestmark = pytest.mark.integration

HOST = """\
name: {name}
formats: [aci]
services:
  main: {{package: {package}, exec: [bin/busybox, sleep, "{n}"]}}
"""


def package(name: str, let: str = "", extra: str = "") -> str:
    return f"""{{ toolchain }}:
let {let}
in derivation {{
  name = "{name}";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  {extra}
  args = [ "sh" "-c" "$builder mkdir $out" ];
}}
"""


# An 800 MB list at once, then 10^8 thunks: more than the limit below, in seconds.
HOG = package("hog", let="n = builtins.length (builtins.genList (x: x) 100000000);", extra="inherit n;")
BAD_HOSTS = {"h-04": "broken", "h-09": "thrower", "h-13": "hog", "h-18": "broken"}
MEMORY = "1G"


def fleet(repo: ConfigRepo) -> Fleet:
    """20 hosts: 16 on two good packages, 4 on packages that do not evaluate, and one
    host file that is no host at all."""
    repo.write("packages/site.nix", SITE)
    repo.write("packages/other.nix", package("other"))
    repo.write("packages/broken.nix", "{ toolchain }: derivation {")
    repo.write("packages/thrower.nix", '{ toolchain }: throw "thrower refuses"')
    repo.write("packages/hog.nix", HOG)
    for i in range(20):
        name = f"h-{i:02}"
        pkg = BAD_HOSTS.get(name, "site" if i % 2 else "other")
        repo.write(f"hosts/{name}.yaml", HOST.format(name=name, package=pkg, n=i))
    repo.write("hosts/nonsense.yaml", "name: nonsense\nservices: 7\n")
    repo.commit("twenty hosts, four of them bad")
    parsed = parse_fleet(read_tree(repo.path))
    assert parsed.invalid == {"nonsense"} and len(parsed.hosts) == 20
    return parsed


def evaluate(tmp_path: Path, repo: ConfigRepo, workers: int) -> Evaluation:
    settings = NixConfig(toolchain_dir=TOOLCHAIN_DIR, eval_workers=workers, eval_memory=1 << 30)
    nix = Nix(tmp_path / f"state-{workers}", settings)
    return nix.evaluate(list(fleet(repo).hosts.values()), repo.path)


def test_three_workers_give_the_result_of_one_and_the_memory_hog_fails_alone(
    tmp_path: Path, config_repo: ConfigRepo
) -> None:
    one = evaluate(tmp_path, config_repo, 1)
    three = evaluate(tmp_path, config_repo, 3)
    assert three == one
    good = {f"h-{i:02}" for i in range(20)} - set(BAD_HOSTS)
    assert set(one.images) == good
    assert all(drv.startswith("/nix/store/") and drv.endswith(".drv") for drv in one.images.values())
    # The two hosts on one package share nothing but it: different derivations.
    assert len(set(one.images.values())) == len(good)
    assert set(one.errors) == set(BAD_HOSTS)
    assert one.errors["h-13"] == (
        f"evaluation needed more memory than nix.eval_memory ({MEMORY}) and was stopped"
    )
    assert "thrower refuses" in one.errors["h-09"]
    assert "packages/broken.nix" in one.errors["h-04"]
    assert one.errors["h-04"] == one.errors["h-18"]


def test_plan_with_workers_and_a_memory_limit_names_the_one_host_over_it(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    standard_fleet(config_repo)
    config_repo.write("packages/hog.nix", HOG)
    config_repo.write("hosts/hog-1.yaml", HOST.format(name="hog-1", package="hog", n=1))
    config_repo.commit("a host whose package allocates 800 MB at once")
    nix = {"toolchain_dir": str(TOOLCHAIN_DIR), "eval_workers": "auto", "eval_memory": "512M"}
    cfg = write_config(tmp_path, config_repo, signing, nix=nix)
    res = cli("plan", "-c", str(cfg))
    assert res.returncode == 1, res.stderr  # a host is invalid
    lines = set(res.stdout.splitlines())
    assert (
        "hog-1: invalid: nix evaluation failed: "
        "package hog: evaluation needed more memory than nix.eval_memory (512M) and was stopped"
    ) in lines, res.stdout
    for host in ("web-1", "web-2", "worker-1"):
        assert f"{host}: rebuild: new host, never published" in lines, res.stdout
