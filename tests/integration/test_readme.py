"""The README cannot rot: its "Your own fleet from scratch" runs as written, and its
tables of host file keys and toolchain attributes are those of the code."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.adapters.nix import NIX_DIR, Nix
from reconciler.agent.config import load_agent_config
from reconciler.config import NixConfig
from reconciler.core import hosts
from tests.conftest import TOOLCHAIN_DIR, ConfigRepo, Signing, cli, stop_gpg_agent, write_config

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
FENCE = re.compile(r"^```sh from-scratch\n(.*?)^```$", re.S | re.M)


def section(title: str) -> str:
    """The README's section ``## title``, up to the next one."""
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end >= 0 else None]


def scratch_script() -> str:
    blocks = FENCE.findall(section("Your own fleet from scratch"))
    assert len(blocks) >= 5, "the walkthrough's blocks are marked ```sh from-scratch"
    return "set -euo pipefail\n" + "\n".join(blocks)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path
    stop_gpg_agent(tmp_path / "gnupg")


def test_your_own_fleet_from_scratch_runs_as_written(workdir: Path) -> None:
    # `reconciler` as an operator's PATH has it: this checkout's, whatever is installed.
    bin_dir = workdir / ".bin"
    bin_dir.mkdir()
    (bin_dir / "reconciler").write_text(f'#!/bin/sh\nexec {sys.executable} -m reconciler "$@"\n')
    (bin_dir / "reconciler").chmod(0o755)
    # The toolchain the tests share, where the walkthrough's state_dir looks for it:
    # staging it again would take a minute and show nothing new.
    Nix(workdir / ".cache", NixConfig(toolchain_dir=TOOLCHAIN_DIR)).ensure_toolchain()
    (workdir / "state").mkdir()
    (workdir / "state" / "toolchain").symlink_to(TOOLCHAIN_DIR)
    shutil.copy(TOOLCHAIN_DIR.with_name("toolchain.stamp"), workdir / "state" / "toolchain.stamp")
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("GNUPG", "GIT_", "RECONCILER_", "NIX_PATH"))
    }
    env |= {
        "HOME": str(workdir / ".home"),
        "PATH": f"{bin_dir}:{env['PATH']}",
        "PYTHONPATH": str(ROOT),
        # A newcomer's git knows who they are.
        "GIT_AUTHOR_NAME": "Newcomer",
        "GIT_AUTHOR_EMAIL": "newcomer@example.com",
        "GIT_COMMITTER_NAME": "Newcomer",
        "GIT_COMMITTER_EMAIL": "newcomer@example.com",
    }
    (workdir / ".home").mkdir()
    script = workdir / ".scratch.sh"
    script.write_text(scratch_script())
    proc = subprocess.Popen(
        ["bash", str(script)],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        # Whatever it left running (the agent and its app, on a failure) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-6000:]
    assert "<h1>hello from web-1</h1>" in out and "<h1>hello again</h1>" in out, out[-6000:]
    verified = (
        r"^OK store/hosts/web-1/latest.json signed by [0-9A-F]{40}: web-1 release 1, commit [0-9a-f]{40}$"
    )
    assert re.search(verified, out, re.M), out[-6000:]
    assert re.search(r"^signing: ok: key [0-9A-F]{40}, expires \d{4}-", out, re.M), out[-6000:]
    assert "web-1: published version 2" in out
    assert "event=agent_switched host=web-1 version=2 previous=1" in out


def table(title: str, after: str) -> list[list[str]]:
    """The rows (cells, stripped) of the first Markdown table after ``after`` in section ``title``."""
    text = section(title)
    text = text[text.index(after) :]
    rows = []
    for line in text[text.index("\n|") + 1 :].splitlines():
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[2:]  # the header and its rule


def test_the_table_of_host_file_keys_lists_every_key_the_parser_knows() -> None:
    documented = {row[0].strip("`") for row in table("Config repository", "Keys of host and profile files")}
    expected = (
        {k for k in hosts.HOST_KEYS if k not in ("network", "services", "files")}
        | {f"network.{k}" for k in hosts.NETWORK_KEYS}
        | {"services.<name>"}
        | {f"services.<name>.{k}" for k in hosts.SERVICE_KEYS}
        | {f"services.<name>.ports[].{k}" for k in hosts.PORT_KEYS}
        | {"files.<path>"}
    )
    assert documented == expected


def test_the_table_of_toolchain_attributes_is_what_packages_receive() -> None:
    nix = (NIX_DIR / "toolchain-debian.nix").read_text()
    offered = set(re.findall(r"^\s+(\w+) = ", nix[nix.index("in {") :], re.M))
    documented = {
        row[0].strip("`").removeprefix("toolchain.") for row in table("Config repository", "Packages")
    }
    assert documented == offered
    for fmt in hosts.FORMATS:
        assert f"`{fmt}`" in section("Config repository")


def test_the_package_example_builds_into_the_image(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    text = section("Config repository")
    (package,) = re.findall(r"^```nix\n(.*?)^```$", text[text.index("### Packages") :], re.S | re.M)
    config_repo.write("packages/greeter.nix", package)
    services = re.search(r"with `(services: \{greeter: .*?\})`", text)
    assert services is not None
    config_repo.write("hosts/g-1.yaml", f"name: g-1\nformats: [aci]\n{services.group(1)}\n")
    config_repo.commit()
    res = cli("build", "-c", str(write_config(tmp_path, config_repo, signing)), "g-1")
    assert res.returncode == 0, res.stderr
    (aci,) = res.stdout.split()
    with tarfile.open(aci) as tar:
        member = tar.extractfile("rootfs/bin/greeter")
        assert member is not None
        assert member.read() == b'while true; do echo "hello from $HOSTNAME"; sleep 60; done\n'


def test_the_agent_example_is_a_config_the_agent_takes(tmp_path: Path) -> None:
    (example,) = [
        b
        for b in re.findall(r"^```yaml\n(.*?)^```$", section("The host agent"), re.S | re.M)
        if "# agent.yaml" in b
    ]
    cfg = load_agent_config(write(tmp_path / "agent.yaml", example))
    assert (cfg.host, cfg.supervise, cfg.activate) == ("web-1", True, None)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
