"""The package as an operator installs it: a wheel in a virtualenv, away from the checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import stop_gpg_agent

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent.parent


def test_an_installed_wheel_carries_the_nix_library_and_publishes(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("reconciler-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "fleet.nix",
        "host.nix",
        "services.nix",
        "base.nix",
        "thin.nix",
        "oci.nix",
        "layers.nix",
        "apprun.sh",
        "runtime/runtime.c",
        "toolchain/import-debian.sh",
    ):
        assert f"reconciler/_nix/{needed}" in names, needed
    venv = tmp_path / "venv"
    # The dependencies come from this interpreter's site-packages: no network needed.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    subprocess.run(
        [str(venv / "bin/pip"), "install", "-q", "--no-deps", "--force-reinstall", str(wheel)],
        check=True,
        capture_output=True,
    )
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    where = subprocess.run(
        [str(venv / "bin/python"), "-c", "import reconciler.adapters.nix as n; print(n.NIX_DIR)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where == str(
        venv
        / "lib"
        / f"python{sys.version_info.major}.{sys.version_info.minor}"
        / "site-packages/reconciler/_nix"
    ), where
    demo = tmp_path / "demo"
    run = [str(venv / "bin/reconciler")]
    subprocess.run([*run, "init", str(demo)], cwd=tmp_path, env=env, check=True, capture_output=True)
    res = subprocess.run(
        [*run, "reconcile", "-c", str(demo / "reconciler.yaml")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "web-1: published version 1" in res.stdout
    stop_gpg_agent(demo / "gnupg")
