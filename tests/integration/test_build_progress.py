"""A long build says it is running, and a failed one says why in a few lines (real Nix)."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from tests.conftest import TOOLCHAIN_DIR, ConfigRepo, Signing, cli, write_config

pytestmark = pytest.mark.integration

NONCE = uuid.uuid4().hex
# Prints a line a second for four seconds; the nonce keeps an earlier run's build from
# being found.
SLOW = """{ toolchain }:
derivation {
  name = "slow";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  nonce = "NONCE";
  args = [ "sh" "-c" ''
    for i in 1 2 3 4; do echo "step $i"; ${toolchain.busybox} sleep 1; done
    ${toolchain.busybox} mkdir -p $out
  '' ];
}
""".replace("NONCE", NONCE)
BROKEN = """{ toolchain }:
derivation {
  name = "broken";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  nonce = "NONCE";
  args = [ "sh" "-c" ''
    for i in $(${toolchain.busybox} seq 1 30); do echo "compiling part $i"; done
    echo "cc: error: cannot read /etc/shadow" >&2
    exit 3
  '' ];
}
""".replace("NONCE", NONCE)
HOST = "name: {name}\nformats: [aci]\nservices:\n  s: {{package: {package}, exec: [bin/busybox, 'true']}}\n"


def test_a_running_build_beats_and_a_failed_one_ends_in_its_last_lines(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    config_repo.write("packages/slow.nix", SLOW)
    config_repo.write("packages/broken.nix", BROKEN)
    config_repo.write("hosts/a-slow.yaml", HOST.format(name="a-slow", package="slow"))
    config_repo.write("hosts/b-broken.yaml", HOST.format(name="b-broken", package="broken"))
    config_repo.commit()
    cfg = write_config(
        tmp_path, config_repo, signing, jobs=1, nix={"toolchain_dir": str(TOOLCHAIN_DIR), "heartbeat": 1}
    )
    res = cli("reconcile", "-c", str(cfg))
    assert res.returncode == 1, res.stderr

    beats = [ln for ln in res.stderr.splitlines() if "event=host_building host=a-slow" in ln]
    assert len(beats) >= 2, res.stderr
    matches = [re.search(r" seconds=(\d+)", ln) for ln in beats]
    seconds = [int(m.group(1)) for m in matches if m is not None]
    assert len(seconds) == len(beats), beats
    assert seconds == sorted(seconds) and seconds[-1] >= 2
    assert any(re.search(r' last="step [1-4]"', ln) for ln in beats), beats

    # The host's error: the failed derivation, its last ten lines (redacted), the hint.
    # b-broken is the last host: its error runs to the end.
    shown = res.stdout[res.stdout.index("b-broken: FAILED: ") :].splitlines()
    drv = re.search(r"'(/nix/store/[0-9a-z]{32}-broken\.drv)'", shown[0])
    assert drv is not None, shown
    assert shown == [
        f"b-broken: FAILED: build of host 'b-broken' failed: builder for '{drv.group(1)}' failed with "
        "exit code 3; its last lines:",
        *(f"  compiling part {i}" for i in range(22, 31)),
        "  cc: error: cannot read <outside the repository>",
        f"whole log: nix-store --read-log {drv.group(1)}",
    ]
    # In the log, still one event per line.
    (failed,) = [ln for ln in res.stderr.splitlines() if "event=host_failed host=b-broken" in ln]
    assert "its last lines:\\n  compiling part 22\\n" in failed
