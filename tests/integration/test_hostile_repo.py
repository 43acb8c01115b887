"""A config repository written to stop the fleet: one commit may cost its own hosts, never
the others, and never a pass that does not end (real git, Nix and gpg, through the CLI)."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from reconciler.core.schema import MAX_DEPTH
from tests.conftest import ConfigRepo, Signing, cli, standard_fleet, write_config

pytestmark = pytest.mark.integration

HOSTS = ("web-1", "web-2", "worker-1")
# Far longer than the passes below take, far shorter than what the attacks cost before
# the fix (measured: minutes). A pass that blows it fails the test with TimeoutExpired.
ATTACK_TIMEOUT = 60


def published(store: Path) -> dict[str, int]:
    out = {}
    for host in HOSTS:
        latest = store / "hosts" / host / "latest.json"
        if latest.exists():
            out[host] = json.loads(latest.read_text())["version"]
    return out


def warm(cfg: Path) -> None:
    """One plan of the standard fleet first: staging the toolchain on a cold cache is no
    part of what the attack tests time."""
    res = cli("plan", "-c", str(cfg))
    assert res.returncode == 0, res.stderr


def reconcile_with_package(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing, name: str, nix: bytes, why: str
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """The standard fleet, and host NAME-1 running package NAME (``nix``), committed as
    ``why``: the configuration, and a pass of it through the CLI."""
    standard_fleet(config_repo)
    (config_repo.path / "packages").mkdir(exist_ok=True)
    (config_repo.path / f"packages/{name}.nix").write_bytes(nix)
    config_repo.write(
        f"hosts/{name}-1.yaml",
        f"name: {name}-1\nformats: [aci]\n"
        f"services:\n  a: {{package: {name}, exec: [bin/busybox, sleep, '1']}}\n",
    )
    config_repo.commit(why)
    cfg = write_config(tmp_path, config_repo, signing)
    return cfg, cli("reconcile", "-c", str(cfg))


def test_a_host_nested_50000_deep_is_invalid_and_the_others_publish(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    standard_fleet(config_repo)
    # libyaml composes nested nodes by recursing in C: this killed every pass (SIGSEGV).
    config_repo.write("hosts/deep-1.yaml", "name: deep-1\nfiles: " + "[" * 50_000 + "]" * 50_000 + "\n")
    config_repo.commit("a host nested 50,000 deep")
    cfg = write_config(tmp_path, config_repo, signing)
    res = cli("reconcile", "-c", str(cfg))
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
    reason = f"hosts/deep-1.yaml: nested deeper than {MAX_DEPTH} levels at line 2, column {MAX_DEPTH + 7}"
    assert f"deep-1: invalid ({reason})" in res.stdout
    assert "Traceback" not in res.stderr
    assert published(tmp_path / "store") == dict.fromkeys(HOSTS, 1)
    status = json.loads(cli("status", "-c", str(cfg), "--json").stdout)
    assert status["hosts"]["deep-1"]["status"] == "invalid"
    assert status["hosts"]["deep-1"]["error"] == reason


@pytest.mark.parametrize(
    ("name", "text", "reason"),
    [
        # A scalar YAML resolves to a date no calendar has: a ValueError stopped every pass.
        ("bad-1.yaml", "name: bad-1\nfiles:\n  etc/date: 2024-02-30\n", "a value cannot be read"),
        # A file name that is not UTF-8: its surrogates reached sqlite, and every pass crashed.
        (b"caf\xe9.yaml", "name: cafe\n", "is not a valid host name"),
    ],
    ids=["no such date", "file name not UTF-8"],
)
def test_a_file_python_cannot_take_as_it_is_costs_only_its_host(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing, name: str | bytes, text: str, reason: str
) -> None:
    standard_fleet(config_repo)
    (config_repo.path / "hosts" / os.fsdecode(name)).write_text(text)
    # git itself: GitPython cannot read back an index holding a name that is not UTF-8.
    for args in (["add", "-A"], ["commit", "-qm", "a hostile host file"]):
        subprocess.run(["git", "-C", str(config_repo.path), *args], check=True, capture_output=True)
    cfg = write_config(tmp_path, config_repo, signing)
    res = cli("reconcile", "-c", str(cfg))
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr and "reconcile_crashed" not in res.stderr
    assert reason in res.stdout, res.stdout
    assert published(tmp_path / "store") == dict.fromkeys(HOSTS, 1)


def test_a_package_tracing_bytes_that_are_not_utf8_costs_nothing(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    """What evaluation prints reached this process as text decoded strictly: a byte
    0xff in a traced string raised UnicodeDecodeError out of the pass."""
    package = (
        b'{ toolchain }: builtins.trace "caf\xff" (derivation { name = "chatty"; system = "x86_64-linux";'
        b' builder = toolchain.busybox; args = [ "sh" "-c" "${toolchain.busybox} mkdir -p $out" ]; })\n'
    )
    _, res = reconcile_with_package(
        tmp_path, config_repo, signing, "chatty", package, "a package tracing a byte that is not UTF-8"
    )
    assert res.returncode == 0, (res.returncode, res.stderr[-2000:])
    assert published(tmp_path / "store") == dict.fromkeys(HOSTS, 1)
    assert (tmp_path / "store/hosts/chatty-1/latest.json").exists()


def test_a_build_logging_bytes_that_are_not_utf8_fails_only_its_host(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    """A build's log reached this process as text decoded strictly: a byte 0xe9 the
    builder wrote raised UnicodeDecodeError out of every pass."""
    package = (
        b'{ toolchain }: derivation { name = "latin"; system = "x86_64-linux";'
        rb""" builder = toolchain.busybox; args = [ "sh" "-c" "printf 'caf\\351\\n' >&2; exit 1" ]; }"""
    )
    cfg, res = reconcile_with_package(
        tmp_path,
        config_repo,
        signing,
        "latin",
        package,
        "a package whose build logs a byte that is not UTF-8",
    )
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr and "reconcile_crashed" not in res.stderr, res.stderr[-2000:]
    assert published(tmp_path / "store") == dict.fromkeys(HOSTS, 1)
    status = json.loads(cli("status", "-c", str(cfg), "--json").stdout)
    assert status["hosts"]["latin-1"]["status"] == "failed"
    assert "caf\ufffd" in status["hosts"]["latin-1"]["error"]


def test_a_package_of_a_long_string_costs_the_daemon_and_its_ledger_no_more_than_another(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    """A package's id was its whole output path, or whatever string it is: one of 8 MiB
    was read by the daemon and kept in its ledger, each pass (at hundreds of MB, the
    daemon's memory went with it)."""
    package = (
        b'{ toolchain }: builtins.concatStringsSep "" (builtins.genList (_: "0123456789abcdef") 524288)\n'
    )
    _, res = reconcile_with_package(
        tmp_path, config_repo, signing, "long", package, "a package that is a string of 8 MiB"
    )
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
    assert "Traceback" not in res.stderr
    assert published(tmp_path / "store") == dict.fromkeys(HOSTS, 1)
    with sqlite3.connect(tmp_path / "state" / "state.db") as db:
        (ids,) = db.execute("SELECT value FROM meta WHERE key = 'package_ids'").fetchone()
    assert len(ids) < 4096, len(ids)


def test_a_duplicate_key_makes_its_host_invalid_and_the_others_publish(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    standard_fleet(config_repo)
    # Which `services` runs? PyYAML silently took the second.
    config_repo.write(
        "hosts/dup-1.yaml",
        "name: dup-1\nservices:\n  tick: {exec: [bin/busybox, sleep, '60']}\n"
        "formats: [aci]\nservices:\n  tock: {exec: [bin/busybox, sleep, '1']}\n",
    )
    config_repo.commit("a host stating services twice")
    cfg = write_config(tmp_path, config_repo, signing)
    res = cli("reconcile", "-c", str(cfg))
    assert res.returncode == 1, res.stderr[-2000:]
    reason = (
        "hosts/dup-1.yaml: services: duplicate key at line 5, column 1 (first at line 2, column 1): "
        "ambiguous, YAML would silently keep only the last"
    )
    assert f"dup-1: invalid ({reason})" in res.stdout
    assert published(tmp_path / "store") == dict.fromkeys(HOSTS, 1)
    assert not (tmp_path / "store" / "hosts" / "dup-1").exists()
    status = json.loads(cli("status", "-c", str(cfg), "--json").stdout)
    assert (status["hosts"]["dup-1"]["status"], status["hosts"]["dup-1"]["error"]) == ("invalid", reason)


def test_profiles_including_each_other_25_levels_deep_are_planned_promptly(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    standard_fleet(config_repo)
    cfg = write_config(tmp_path, config_repo, signing)
    warm(cfg)
    # Level i has a_i and b_i, each including both of level i+1: 50 files, 2**25 paths.
    depth = 25
    for i in range(1, depth + 1):
        for p in ("a", "b"):
            inc = f"include: [a{i + 1}, b{i + 1}]\n" if i < depth else ""
            config_repo.write(f"profiles/{p}{i}.yaml", f"{inc}files: {{etc/{p}{i}: '{i}'}}\n")
    config_repo.write("hosts/layered-1.yaml", "name: layered-1\ninclude: [a1, b1]\nformats: [aci]\n")
    config_repo.commit("a diamond of profiles 25 levels deep")
    res = cli("plan", "-c", str(cfg), "--json", timeout=ATTACK_TIMEOUT)
    assert res.returncode == 0, res.stderr[-2000:]
    plan = {h["host"]: h for h in json.loads(res.stdout)["hosts"]}
    assert plan["layered-1"]["action"] == "rebuild", plan["layered-1"]
    assert {plan[h]["action"] for h in HOSTS} == {"rebuild"}


def test_hosts_with_many_files_entries_are_planned_promptly(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    standard_fleet(config_repo)
    cfg = write_config(tmp_path, config_repo, signing)
    warm(cfg)
    # 70,000 entries just under the size limit; the last one's parent is also a file,
    # found only after every entry was compared with every other (quadratic before).
    entries = "".join(f"  d/{i}: x\n" for i in range(70_000)) + "  zz: x\n  zz/x: x\n"
    for h in ("many-1", "many-2", "many-3"):
        config_repo.write(f"hosts/{h}.yaml", f"name: {h}\nfiles:\n{entries}")
    config_repo.commit("hosts with 70,000 files each")
    res = cli("plan", "-c", str(cfg), "--json", timeout=ATTACK_TIMEOUT)
    # 1: invalid hosts, which is what a pull request check should fail on.
    assert res.returncode == 1 and not res.stderr.count("Traceback"), res.stderr[-2000:]
    plan = {h["host"]: h for h in json.loads(res.stdout)["hosts"]}
    for h in ("many-1", "many-2", "many-3"):
        assert plan[h]["action"] == "invalid"
        assert plan[h]["reasons"] == [f"hosts/{h}.yaml: files.zz/x: its parent 'zz' is also a file"]
