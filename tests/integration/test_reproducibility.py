"""The reproducibility gate with real Nix: with reproducibility.check, a host whose package
writes something new at every build (a random id) is refused before anything is signed and
publishes nothing, while a deterministic host of the same pass is published with provenance
saying the check ran, here, and passed."""

from __future__ import annotations

import base64
import json
import re
import uuid
from pathlib import Path

import pytest

from reconciler.config import load_config
from reconciler.core.layout import AttestationKind, attestation_path, release_path
from reconciler.wiring import open_reconciler
from tests.conftest import ConfigRepo, Signing, write_config

pytestmark = pytest.mark.integration

PACKAGE = """\
{{ toolchain }}:
derivation {{
  name = "{name}";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  args = [ "sh" "-c" "${{toolchain.busybox}} mkdir -p $out/etc && {body} > $out/etc/build-id" ];
}}
"""
# The same bytes every time, and a new random id every time (the kernel's, in the sandbox too).
STEADY = PACKAGE.format(name="steady", body="echo 42")
RANDOM = PACKAGE.format(name="stamp", body="${toolchain.busybox} cat /proc/sys/kernel/random/uuid")
HOST = """\
name: {name}
formats: [aci]
services:
  app: {{package: {package}, exec: [bin/busybox, sleep, "3600"]}}
"""


def test_a_host_that_does_not_build_twice_the_same_publishes_nothing(
    tmp_path: Path, signing: Signing
) -> None:
    repo = ConfigRepo(tmp_path / "repo")
    repo.write("packages/steady.nix", STEADY)
    repo.write("packages/stamp.nix", RANDOM)
    repo.write("hosts/good.yaml", HOST.format(name="good", package="steady"))
    repo.write("hosts/bad.yaml", HOST.format(name="bad", package="stamp"))
    repo.commit("two hosts")
    cfg = load_config(write_config(tmp_path / "daemon", repo, signing, reproducibility={"check": True}))
    rec = open_reconciler(cfg)
    try:
        result = rec.reconcile()
        get = rec.metrics.registry.get_sample_value
        checks = {
            r: get("reconciler_reproducibility_checks_total", {"result": r}) for r in ("passed", "mismatch")
        }
    finally:
        rec.close()
    assert {o.host: o.ok for o in result.outcomes} == {"good": True, "bad": False}
    assert checks == {"passed": 1, "mismatch": 1}
    store = cfg.store.path
    assert store is not None
    assert not (store / "hosts" / "bad").exists()
    (bad,) = [o for o in result.outcomes if o.host == "bad"]
    error = bad.error or ""
    drv, out = r"(/nix/store/\S+-stamp\.drv)", r"(/nix/store/\S+-stamp)"
    m = re.search(f"derivation {drv} built again here gave other bytes than {out}: ", error)
    assert m is not None, error
    assert "etc/build-id: 37 bytes, sha256 " in error
    # What Nix kept of the second build is gone; diffoscope's report (it shows contents) is
    # in the state directory, and says what differs.
    assert not Path(m.group(2) + ".check").exists()
    report = re.search(r"\(diffoscope: (\S+\.diffoscope\.txt)\)", error)
    assert report is not None, error
    assert "build-id" in Path(report.group(1)).read_text()
    assert Path(report.group(1)).is_relative_to(cfg.state_dir)

    envelope = json.loads((store / attestation_path("good", 1, AttestationKind.PROVENANCE)).read_bytes())
    statement = json.loads(base64.b64decode(envelope["payload"]))
    repro = statement["predicate"]["buildDefinition"]["internalParameters"]["reproducibility"]
    # The package, the services tree, the image and the artifacts, each built twice.
    assert repro["status"] == "passed" and repro["where"] == ["local"] and repro["derivations"] >= 4
    assert (store / release_path("good", 1)).exists()


def test_a_build_that_logs_without_end_is_stopped_at_the_log_limit(
    tmp_path: Path, signing: Signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The build log reaches the daemon whole: a package printing more than its limit
    # is stopped by Nix, not held in the daemon's memory until the build deadline
    # (nix.MAX_BUILD_LOG).
    from reconciler.adapters import nix

    # 1 MiB here: the limit is what is tested, not its 64 MiB (which takes longer to write).
    limit = 1 << 20
    monkeypatch.setattr(nix, "MAX_BUILD_LOG", limit)
    loud = PACKAGE.format(
        name="loud",
        # One line without end: Nix counts bytes, and lines would cost it time each. A
        # nonce: a store that holds this output from another run would not build it.
        body=f"${{toolchain.busybox}} head -c {limit + (1 << 20)} /dev/zero >&2; echo {uuid.uuid4().hex}",
    )
    repo = ConfigRepo(tmp_path / "repo")
    repo.write("packages/loud.nix", loud)
    repo.write("hosts/loud.yaml", HOST.format(name="loud", package="loud"))
    repo.commit("a loud host")
    cfg = load_config(write_config(tmp_path / "daemon", repo, signing))
    rec = open_reconciler(cfg)
    try:
        result = rec.reconcile()
    finally:
        rec.close()
    (out,) = result.outcomes
    assert not out.ok
    assert f"killed after writing more than {limit} bytes of log output" in (out.error or "")
