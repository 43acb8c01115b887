"""Nix remote builders for real on one machine: an sshd on 127.0.0.1 whose root runs
`nix-daemon --stdio` over a second Nix store (`remote-store=local?root=...`); directly,
and through a local nix-daemon as production has it (deploy/README.md)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.config import load_config
from reconciler.core import builders as core_builders
from reconciler.core.release import parse_release
from reconciler.daemon.reconciler import Reconciler, status
from reconciler.wiring import open_reconciler
from tests.conftest import ConfigRepo, Signing, cli, free_port, wait_for, write_config
from tests.integration.test_sources import Sshd

pytestmark = pytest.mark.integration

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DROP_IN = DEPLOY / "systemd/nix-daemon.service.d/reconciler-builders.conf"


def recorded(rec: Reconciler) -> Mapping[str, object]:
    """What `reconciler status` would show now."""
    return status(rec.state, time.time(), rec.cfg.retry.max.total_seconds())


def recorded_row(rec: Reconciler, table: str, name: str) -> Mapping[str, Any]:
    """One builder's or host's entry (``table``: "builders" or "hosts") in what
    `reconciler status` would show now."""
    rows = recorded(rec)[table]
    assert isinstance(rows, Mapping), rows
    row = rows[name]
    assert isinstance(row, Mapping), row
    return row


# A package with a new random id in every build (NONCE: new to every store).
STAMP = """\
{ toolchain }:
derivation {
  name = "stamp";
  nonce = "NONCE";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  args = [ "sh" "-c" "${toolchain.busybox} cat /proc/sys/kernel/random/uuid > $out" ];
}
"""


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


def sshd_builder(tmp_path: Path, sshd: Sshd, key: str = "host") -> dict[str, str]:
    """builders: entry b1, the sshd's root over a second store in tmp_path/builder, with
    the host key ``key`` of the sshd's keys as the only one accepted."""
    return {
        "name": "b1",
        "uri": f"ssh-ng://root@127.0.0.1:{sshd.port}?remote-store={second_store(tmp_path / 'builder')}",
        "ssh_key": str(sshd.key),
        "host_key": host_key(tmp_path, key),
    }


def untrusting_nix_conf(directory: Path) -> Path:
    """A NIX_CONF_DIR of production's nix.conf, but trusting no user (root, as the tests
    run, is trusted by deploy/nix/nix.conf) and serving any."""
    directory.mkdir()
    (directory / "nix.conf").write_text(
        "build-users-group = nixbld\nsubstituters =\nsandbox = true\ntrusted-users =\nallowed-users = *\n"
    )
    return directory


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
    """Also the reproducibility gate with every build handed to a builder: its second
    build runs here. Nix 2.8 hands a --check to a builder when --max-jobs is 0, and the
    builder, whose output is valid already, passes it without building again: a
    non-deterministic package would go through. The provenance names both machines."""
    tiny_host(config_repo)
    config_repo.write("packages/stamp.nix", STAMP.replace("NONCE", str(uuid.uuid4())))
    services = "services:\n  idle: {package: stamp, exec: [bin/busybox, sleep, '3600']}\n"
    config_repo.write("hosts/bad.yaml", "name: bad\nformats: [aci]\n" + services)
    config_repo.commit("bad")
    remote = tmp_path / "builder"
    builder = sshd_builder(tmp_path, sshd)
    cfg = write_config(tmp_path, config_repo, signing, builders=[builder], reproducibility={"check": True})
    rec = open_reconciler(load_config(yaml_nix(cfg, local_builds=False)))
    try:
        result = {o.host: o for o in rec.reconcile().outcomes}
        assert result["tiny"].ok, result["tiny"].error
        assert builds(rec, "b1", "success") == 2
        assert builds(rec, "local", "success") == 0
        assert rec.metrics.registry.get_sample_value(
            "reconciler_builder_build_duration_seconds_count", {"builder": "b1"}
        )
        b1 = recorded_row(rec, "builders", "b1")
        assert b1["builds"] == 2 and b1["last_build"] and b1["last_error"] is None
        # Its sandbox probe ran there, and found the sandbox on.
        assert b1["sandbox"] == "on"
        assert rec.metrics.registry.get_sample_value("reconciler_builder_sandbox", {"builder": "b1"}) == 1
    finally:
        rec.close()
    # Built there, and copied back: the output is in both stores.
    release_file = tmp_path / "store/hosts/tiny/releases/1.json"
    drv = parse_release(release_file.read_bytes(), str(release_file)).derivation
    out = subprocess.run(["nix-store", "-q", "--outputs", drv], capture_output=True, text=True, check=True)
    out_path = Path(out.stdout.strip())
    assert out_path.is_dir()
    assert (remote / out_path.relative_to("/")).is_dir()
    assert list((remote / "nix/store").glob("*-reconciler-sandbox-probe"))
    # Built again here, where the package writing a random id gives other bytes.
    assert not result["bad"].ok
    assert "-stamp.drv built again here gave other bytes than" in (result["bad"].error or "")
    assert not (tmp_path / "store/hosts/bad").exists()
    envelope = (tmp_path / "store/hosts/tiny/releases/1.provenance.json").read_bytes()
    predicate = json.loads(base64.b64decode(json.loads(envelope)["payload"]))["predicate"]
    (first,) = predicate["runDetails"]["builder"]["builderDependencies"]
    assert first["name"] == "b1" and first["annotations"]["built"] is True
    repro = predicate["buildDefinition"]["internalParameters"]["reproducibility"]
    assert repro["status"] == "passed" and repro["where"] == ["local"] and repro["derivations"] >= 3


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
        row = recorded_row(rec, "builders", "dead")
        assert row["unreachable"] == 1 and "Connection refused" in row["last_error"], row
        # Found by its sandbox probe: the host's build was not offered to it.
        assert row["sandbox"] == "unknown" and row["last_error"].startswith("sandbox probe: "), row
    finally:
        rec.close()


def test_an_unknown_host_key_is_refused_naming_the_builder(
    tmp_path: Path, sshd: Sshd, config_repo: ConfigRepo, signing: Signing
) -> None:
    tiny_host(config_repo)
    remote = tmp_path / "builder"
    # The builder's real key is not this one: ssh must not talk to it.
    impostor = sshd_builder(tmp_path, sshd, key="other-host")
    cfg = write_config(tmp_path, config_repo, signing, builders=[impostor])
    rec, ok, error = one_pass(yaml_nix(cfg, local_builds=False))
    try:
        assert not ok
        # Found by the sandbox probe, before anything was built.
        said = "builder b1: its sandbox could not be verified: sandbox probe: Host key verification failed."
        assert error is not None and said in error, error
        assert builds(rec, "b1", "unreachable") == 1
        assert builds(rec, "b1", "success") == 0
        assert recorded_row(rec, "hosts", "tiny")["status"] == "failed"
    finally:
        rec.close()
    assert not (remote / "nix/store").exists() or not any((remote / "nix/store").iterdir())


def test_a_builder_that_does_not_trust_the_reconciler_is_refused_naming_it(
    tmp_path: Path, sshd: Sshd, config_repo: ConfigRepo, signing: Signing
) -> None:
    """The builder's nix-daemon does not trust the ssh user (its trusted-users leaves it
    out), so it refuses every build handed over: the builder's ssh command hands the
    session to that daemon, over a second store, as deploy/README.md's builder does when
    trusted-users lacks its user. Found by the sandbox probe, before any host build."""
    tiny_host(config_repo)
    conf = untrusting_nix_conf(tmp_path / "builder-conf")
    store = second_store(tmp_path / "untrusting").replace("%3F", "?").replace("%3D", "=")
    sock = tmp_path / "builder.socket"
    env = {k: v for k, v in os.environ.items() if k not in ("NIX_CONFIG", "NIX_REMOTE")}
    env |= {"NIX_CONF_DIR": str(conf), "NIX_DAEMON_SOCKET_PATH": str(sock)}
    program = tmp_path / "builder-nix-daemon"
    program.write_text(f'#!/bin/sh\nNIX_REMOTE=unix://{sock} exec nix-daemon "$@"\n')
    program.chmod(0o755)
    builder = {
        **sshd_builder(tmp_path, sshd),
        "uri": f"ssh-ng://root@127.0.0.1:{sshd.port}?remote-program={program}",
    }
    with (tmp_path / "builder-daemon.log").open("w") as sink:
        daemon = subprocess.Popen(
            ["nix-daemon", "--store", store], env=env, stdout=sink, stderr=subprocess.STDOUT
        )
    try:
        wait_for(sock.exists, 30, "the builder's nix-daemon socket")
        cfg = write_config(tmp_path, config_repo, signing, builders=[builder])
        rec, ok, error = one_pass(yaml_nix(cfg, local_builds=False))
        try:
            assert not ok
            assert (
                error is not None and "builder b1: its sandbox could not be verified: sandbox probe:" in error
            )
            # Nix 2.8's words for a user its daemon does not trust.
            assert "you are not privileged to build input-addressed derivations" in error, error
            assert builds(rec, "b1", "unreachable") == 1 and builds(rec, "b1", "success") == 0
        finally:
            rec.close()
        # With local builds, the host (a new commit of it: the failed one waits out its
        # backoff) builds here instead.
        tiny_host(config_repo)
        rec, ok, error = one_pass(yaml_nix(cfg, local_builds=True))
        try:
            assert ok, error
            assert builds(rec, "local", "success") == 1
        finally:
            rec.close()
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


# A package only a machine with the system feature "gpu" may build.
NEEDS_GPU = """\
{ toolchain }:
derivation {
  name = "needs-gpu";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  requiredSystemFeatures = [ "gpu" ];
  args = [ "sh" "-c" "echo NONCE > $out" ];
}
"""


def test_a_build_needing_a_feature_no_builder_has_fails_that_host_saying_so(
    tmp_path: Path, sshd: Sshd, config_repo: ConfigRepo, signing: Signing
) -> None:
    tiny_host(config_repo)
    config_repo.write("packages/gpu.nix", NEEDS_GPU.replace("NONCE", str(uuid.uuid4())))
    services = "services:\n  idle: {package: gpu, exec: [bin/busybox, sleep, '3600']}\n"
    config_repo.write("hosts/render.yaml", "name: render\nformats: [aci]\n" + services)
    config_repo.commit("render")
    cfg = write_config(tmp_path, config_repo, signing, builders=[sshd_builder(tmp_path, sshd)])
    rec = open_reconciler(load_config(yaml_nix(cfg, local_builds=False)))
    try:
        result = {o.host: o for o in rec.reconcile().outcomes}
        # The other host builds on the builder as ever.
        assert result["tiny"].ok, result["tiny"].error
        assert not result["render"].ok
        # Nix's own account: what the derivation needs, what the machines have.
        error = result["render"].error or ""
        assert "required (system, features): (x86_64-linux, gpu)" in error, error
        assert "remote machines may not have all required system features" in error, error
        assert builds(rec, "b1", "success") == 1
    finally:
        rec.close()


# A package whose build runs until stopped; NONCE, new to every store, is the $0 of its
# shell, which names the build's process (pgrep -f): the shell stays, as it would not
# for a lone command, which it execs.
ENDLESS = """\
{ toolchain }:
derivation {
  name = "endless";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  args = [ "sh" "-c" "${toolchain.busybox} sleep 3600; exit 1" "NONCE" ];
}
"""


def session_pids(sshd: Sshd) -> set[int]:
    """The processes serving sshd's connections: its listener's children and theirs."""
    found: set[int] = set()
    parents = [sshd.proc.pid]
    while parents:
        out = subprocess.run(["pgrep", "-P", str(parents.pop())], capture_output=True, text=True).stdout
        kids = {int(pid) for pid in out.split()}
        parents += sorted(kids - found)
        found |= kids
    return found


def test_a_builder_gone_silent_mid_build_fails_the_host_instead_of_holding_it(
    tmp_path: Path, sshd: Sshd, config_repo: ConfigRepo, signing: Signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A builder that stops answering (powered off, cut off: here its sshd's session
    stopped with SIGSTOP) while it builds: ssh's keepalives end the connection, and the
    host fails long before nix.build_timeout, the failure counted on that builder.
    Keepalives every second, three unanswered (15 s and four in production). Without
    them, a build here was still waiting on the silent builder after 30 s."""
    monkeypatch.setattr(core_builders, "KEEPALIVE_INTERVAL", 1)
    monkeypatch.setattr(core_builders, "KEEPALIVE_COUNT", 3)
    nonce = str(uuid.uuid4())
    config_repo.write("packages/endless.nix", ENDLESS.replace("NONCE", nonce))
    services = "services:\n  idle: {package: endless, exec: [bin/busybox, sleep, '3600']}\n"
    config_repo.write("hosts/stuck.yaml", "name: stuck\nformats: [aci]\n" + services)
    config_repo.commit("stuck")
    builder = sshd_builder(tmp_path, sshd)
    cfg = write_config(tmp_path, config_repo, signing, builders=[builder])
    # Without keepalives the build would wait on the silent builder until build_timeout.
    rec = open_reconciler(load_config(yaml_nix(cfg, local_builds=False, build_timeout="90s")))
    stopped: list[int] = []
    silent_at: list[float] = []

    def silence_the_builder() -> None:
        # Once the package's build runs on the builder, its sshd stops answering.
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not stopped:
            building = subprocess.run(["pgrep", "-f", nonce], capture_output=True, text=True)
            if building.returncode == 0:
                stopped.extend(session_pids(sshd))
                silent_at.append(time.monotonic())
                for pid in stopped:
                    os.kill(pid, signal.SIGSTOP)
                return
            time.sleep(0.2)

    watcher = threading.Thread(target=silence_the_builder)
    watcher.start()
    try:
        (outcome,) = rec.reconcile().outcomes
        ended = time.monotonic()
        watcher.join(5)
        assert silent_at, "the package's build never started on the builder"
        assert not outcome.ok
        # 3 s of unanswered keepalives, and Nix's report: not the build's hour.
        assert ended - silent_at[0] < 30, ended - silent_at[0]
        assert outcome.error is not None and "unexpected end-of-file" in outcome.error, outcome.error
        where = "build of host 'stuck' failed: on builder b1: builder for '"
        assert outcome.error.startswith(where), outcome.error
        # Counted where the package's build failed: on b1 (the image was never built).
        assert builds(rec, "b1", "failure") == 1 and builds(rec, "local", "failure") == 0
        b1 = recorded_row(rec, "builders", "b1")
        assert b1["failures"] == 1 and "unexpected end-of-file" in b1["last_error"], b1
    finally:
        for pid in stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        watcher.join(5)
        rec.close()
        subprocess.run(["pkill", "-f", nonce], check=False)


def yaml_nix(cfg: Path, **settings: object) -> Path:
    """``cfg`` with these nix: settings."""
    data = yaml.safe_load(cfg.read_text())
    data["nix"].update(settings)
    cfg.write_text(yaml.safe_dump(data))
    return cfg


def drop_in_environment(directory: Path) -> dict[str, str]:
    """The environment deploy/systemd's nix-daemon drop-in gives the daemon, with its
    /etc/nix/builders moved to ``directory``."""
    env: dict[str, str] = {}
    for line in DROP_IN.read_text().splitlines():
        if line.startswith("Environment="):
            for assignment in shlex.split(line.removeprefix("Environment=")):
                name, _, value = assignment.partition("=")
                env[name] = value.replace("/etc/nix/builders", str(directory))
    return env


def test_the_root_daemons_machines_file_lists_only_builders_a_probe_found_sandboxed(
    tmp_path: Path, sshd: Sshd, config_repo: ConfigRepo, signing: Signing
) -> None:
    """`reconciler builders`, run as root for a root nix-daemon (which takes no builders
    from the reconciler, so the reconciler cannot probe them itself): each builder's
    sandbox is probed on it alone first; one whose probe cannot run is left out."""
    remote = tmp_path / "builder"
    (tmp_path / "keys").mkdir()
    keygen = ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "keys/k")]
    subprocess.run(keygen, check=True)
    dead = {
        "name": "dead",
        # Another address (builders on one share a port), where nothing listens.
        "uri": f"ssh-ng://root@127.0.0.2:{free_port()}?remote-store={second_store(tmp_path / 'dead')}",
        "ssh_key": str(tmp_path / "keys/k"),
        "host_key": (tmp_path / "keys/k.pub").read_text(),
    }
    cfg = write_config(tmp_path, config_repo, signing, builders=[sshd_builder(tmp_path, sshd), dead])
    files = tmp_path / "etc-nix-builders"
    wrote = cli("builders", "-c", str(cfg), str(files))
    assert wrote.returncode == 1, wrote.stdout + wrote.stderr
    assert "wrote 1 of 2 builders" in wrote.stdout
    said = "reconciler: builder dead is not listed: its sandbox could not be verified: sandbox probe: "
    assert said in wrote.stderr, wrote.stderr
    (line,) = (files / "machines").read_text().splitlines()
    assert line.startswith(f"ssh-ng://root@127.0.0.1?remote-store=local%3Froot%3D{remote} ")
    # The probe was built on b1 itself; nothing was written into the state directory.
    assert list((remote / "nix/store").glob("*-reconciler-sandbox-probe"))
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir())
    # Both builders' ssh settings stay, for when the dead one is probed again.
    assert len((files / "known_hosts").read_text().splitlines()) == 2


def test_builds_through_an_untrusted_nix_daemon_run_on_its_builders(
    tmp_path: Path, sshd: Sshd, config_repo: ConfigRepo, signing: Signing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """deploy/README.md's layout: the builders are the root nix-daemon's (the drop-in's
    environment, the files `reconciler builders` wrote), the reconciler is a client the
    daemon does not trust, whose --builders it ignores. The build runs on the builder,
    and the daemon passes Nix's "building ... on ..." on, so it is counted there."""
    tiny_host(config_repo)
    remote = tmp_path / "builder"
    builder = sshd_builder(tmp_path, sshd)
    cfg = yaml_nix(write_config(tmp_path, config_repo, signing, builders=[builder]), local_builds=False)
    conf = untrusting_nix_conf(tmp_path / "nix-daemon-conf")
    files = tmp_path / "etc-nix-builders"
    sock = tmp_path / "nix-daemon.socket"
    daemon_log = tmp_path / "nix-daemon.log"
    env = {k: v for k, v in os.environ.items() if k not in ("NIX_CONFIG", "NIX_SSHOPTS")}
    env |= {"NIX_CONF_DIR": str(conf), "NIX_DAEMON_SOCKET_PATH": str(sock), **drop_in_environment(files)}
    # Started as the image starts it (the chart's sidecar has the same two variables).
    entry = ["sh", str(DEPLOY / "container/reconciler-nix-daemon")]
    with daemon_log.open("w") as sink:
        daemon = subprocess.Popen(entry, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        wait_for(sock.exists, 30, "the nix-daemon's socket")
        # Written after the daemon started: Nix reads them for each build.
        wrote = cli("builders", "-c", str(cfg), str(files))
        assert wrote.returncode == 0, wrote.stderr
        assert (files / "machines").read_text().startswith("ssh-ng://root@127.0.0.1?remote-store=")

        monkeypatch.setenv("NIX_REMOTE", "daemon")
        monkeypatch.setenv("NIX_DAEMON_SOCKET_PATH", str(sock))
        rec = open_reconciler(load_config(cfg))
        try:
            (outcome,) = rec.reconcile().outcomes
            assert outcome.ok, outcome.error
            assert builds(rec, "b1", "success") == 1
            assert builds(rec, "local", "success") == 0
            b1 = recorded_row(rec, "builders", "b1")
            assert b1["builds"] == 1 and b1["last_error"] is None
            release_file = tmp_path / "store/hosts/tiny/releases/1.json"
            drv = parse_release(release_file.read_bytes(), str(release_file)).derivation
            out = subprocess.run(
                ["nix-store", "-q", "--outputs", drv], capture_output=True, text=True, check=True
            )
            out_path = Path(out.stdout.strip())
            assert out_path.is_dir() and (remote / out_path.relative_to("/")).is_dir()
            # The sandbox probe too went where the daemon sent it: to the builder.
            assert list((remote / "nix/store").glob("*-reconciler-sandbox-probe"))

            # The builder down: with local_builds false (--max-jobs 0, which the daemon
            # takes from any client) the host fails naming it, and nothing builds here.
            sshd.stop()
            tiny_host(config_repo)
            (outcome,) = rec.reconcile().outcomes
            assert not outcome.ok
            # Nix's words reach the client; ssh's own ("Connection refused") go to the
            # daemon's stderr, as the hook's other output does.
            assert outcome.error is not None, outcome
            assert "builder b1 refused: error: cannot open connection to remote store" in outcome.error
            assert builds(rec, "b1", "unreachable") == 1
            assert builds(rec, "local", "success") == builds(rec, "local", "failure") == 0
            b1 = recorded_row(rec, "builders", "b1")
            assert b1["unreachable"] == 1 and "cannot open connection" in b1["last_error"], b1
        finally:
            rec.close()
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    # Every client was served untrusted ("accepted connection from pid N, user U" gains
    # " (trusted)" for a trusted one), so the builders were the daemon's own.
    logged = daemon_log.read_text()
    accepted = re.findall(r"^accepted connection from pid \d+, user .*$", logged, re.M)
    assert accepted and not any("trusted" in line for line in accepted), accepted
    assert re.search(rf"^ssh: connect to host 127.0.0.1 port {sshd.port}: Connection refused$", logged, re.M)
