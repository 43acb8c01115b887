"""One pass at a time per state directory, across processes: a second `reconcile`
and `gc` wait for the pass in progress (SPEC: GC must not race a publish).

Waiting is observed from the outside, in the kernel's table of file locks
(/proc/locks), not by sleeping and hoping: a process blocked in flock() is listed
there as waiting on the lock another process holds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import ConfigRepo, Signing, cli, standard_fleet, wait_for, write_config

pytestmark = pytest.mark.integration

# The builder sleeps, so the pass is still building when the test freezes it. The
# nonce makes the derivation new on every run: a cached build would end the pass
# before the test could look at it.
SLOW = """\
{{ toolchain }}:
derivation {{
  name = "slow";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  args = [ "sh" "-c" ''
    ${{toolchain.busybox}} sleep 3
    ${{toolchain.busybox}} mkdir -p $out/srv
    echo {nonce} > $out/srv/nonce
  '' ];
}}
"""

SLOW_HOST = """\
name: slow-1
formats: [aci]
services:
  nap: {package: slow, exec: [bin/busybox, sleep, "3600"]}
"""


@dataclass(frozen=True)
class Flock:
    pid: int
    file: str  # device:inode
    waiting: bool


def flocks() -> list[Flock]:
    """The flock() locks the kernel knows of, held and waited for."""
    out = []
    for line in Path("/proc/locks").read_text().splitlines():
        # "1: FLOCK  ADVISORY  WRITE 4242 fe:00:2146500 0 EOF", with "->" after the
        # number for a process blocked waiting for that lock.
        fields = line.split()
        waiting = fields[1] == "->"
        if waiting:
            del fields[1]
        if fields[1] == "FLOCK":
            out.append(Flock(int(fields[4]), fields[5], waiting))
    return out


def held_by(pid: int) -> set[str]:
    return {f.file for f in flocks() if f.pid == pid and not f.waiting}


def waits_on(proc: subprocess.Popen[str], files: set[str], what: str) -> bool:
    if proc.poll() is not None:
        out, err = proc.communicate()
        raise AssertionError(f"{what} ran to the end while a pass held the lock:\n{out}\n{err}")
    return any(f.pid == proc.pid and f.waiting and f.file in files for f in flocks())


def building(nonce: str) -> bool:
    """Whether a builder of the slow package runs now (in Nix's sandbox, but in
    this machine's process table)."""
    for proc in Path("/proc").iterdir():
        try:
            if nonce.encode() in (proc / "cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def test_gc_and_a_second_pass_wait_for_the_pass_in_progress(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    standard_fleet(config_repo)
    cfg = str(write_config(tmp_path, config_repo, signing, retention={"keep": 1, "interval": 0}))
    assert cli("reconcile", "-c", cfg).returncode == 0
    # Then only slow-1 builds: while its builder sleeps, the pass waits on it and
    # writes nothing (its state database included) when it is frozen.
    nonce = f"nonce-{uuid.uuid4().hex}"
    config_repo.write("packages/slow.nix", SLOW.format(nonce=nonce))
    config_repo.write("hosts/slow-1.yaml", SLOW_HOST)
    config_repo.commit("a host whose build takes a while")
    procs: list[subprocess.Popen[str]] = []

    def start(*args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "reconciler", *args, "-c", cfg],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        return proc

    first = start("reconcile")
    try:

        def first_builds() -> bool:
            if first.poll() is not None:
                raise AssertionError(f"the pass ended before building slow-1: {first.communicate()}")
            return building(nonce)

        wait_for(first_builds, 120, "the first pass to build slow-1")
        # Frozen mid-pass: whatever it holds now, it holds until SIGCONT.
        os.kill(first.pid, signal.SIGSTOP)
        locks = held_by(first.pid)
        assert locks, "a pass in the middle of a build holds no file lock"

        gc = start("gc")
        second = start("reconcile")
        wait_for(lambda: waits_on(gc, locks, "gc"), 60, "gc to wait for the pass lock")
        wait_for(lambda: waits_on(second, locks, "a second pass"), 60, "a second pass to wait for the lock")
        # Blocked in the kernel: neither has done anything yet, and slow-1 is unpublished.
        assert gc.poll() is None and second.poll() is None
        assert not (tmp_path / "store" / "hosts" / "slow-1").exists()

        os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=300)
        assert first.returncode == 0, err
        assert "slow-1: published version 1" in out
        gc_out, gc_err = gc.communicate(timeout=300)
        assert gc.returncode == 0, gc_err
        assert "objects (keeping 1 releases per host)" in gc_out, gc_out
        second_out, second_err = second.communicate(timeout=300)
        assert second.returncode == 0, second_err
    finally:
        if first.returncode is None:
            os.kill(first.pid, signal.SIGCONT)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    # The second pass began after the first had recorded everything: nothing to do.
    assert "published version" not in second_out, second_out
    assert "slow-1: unchanged" in second_out
    # What the pass published is whole after gc: every host verifies.
    for host in ("web-1", "web-2", "worker-1", "slow-1"):
        latest = tmp_path / "store" / "hosts" / host / "latest.json"
        ok = cli("verify", "--key", str(signing.public_key), str(latest))
        assert ok.returncode == 0, ok.stderr
