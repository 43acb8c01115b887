"""Debian's zsync: ``zsyncmake`` writes the control file of an AppImage blob (the
publisher), ``zsync`` builds a new release from the running one and the blocks it
lacks (the agent).

Both run in a process group of their own under a deadline, killed whole past it.
The client speaks plain HTTP only (zsync 0.6.2 has no TLS) and reads a local control
file the caller checked and pointed at the blob (reconciler.core.zsync); whatever it
builds is checked by the caller against the signed release, never by zsync's own
SHA-1 alone.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from reconciler.adapters.process import run_with_deadline
from reconciler.errors import FetchError, FetchKind, StoreError

MAKE_TIMEOUT = 60.0
# zsyncmake reads the file once; each byte adds to its deadline at this rate.
HASH_RATE = 16 * 1024 * 1024
# The client's last line: "used <N> local, fetched <M>".
_FETCHED = re.compile(rb"^used (\d+) local, fetched (\d+)$", re.M)


def available() -> bool:
    return shutil.which("zsync") is not None


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[bytes]:
    """``args`` in ``cwd`` with no proxy, no terminal and a deadline for the whole run."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd), "LC_ALL": "C"}
    return run_with_deadline(args, env=env, cwd=cwd, timeout=timeout, stdout=True, stderr=True)


def _tail(proc: subprocess.CompletedProcess[bytes]) -> str:
    lines = (proc.stderr or proc.stdout).decode(errors="replace").strip().splitlines()
    return lines[-1][:200] if lines else f"exit status {proc.returncode}"


def make(artifact: Path, name: str, url: str) -> bytes:
    """The control file of ``artifact``, to be saved as ``name`` and fetched from
    ``url`` (relative to where the control file is served)."""
    try:
        with tempfile.TemporaryDirectory(prefix="reconciler-zsyncmake-") as tmp:
            out = Path(tmp) / "control.zsync"
            args = ["zsyncmake", "-C", "-u", url, "-f", name, "-o", str(out), str(artifact.resolve())]
            timeout = MAKE_TIMEOUT + artifact.stat().st_size / HASH_RATE
            try:
                proc = _run(args, Path(tmp), timeout)
            except FileNotFoundError:
                raise StoreError("zsyncmake not found (install the Debian package zsync)") from None
            except subprocess.TimeoutExpired:
                raise StoreError(f"zsyncmake {artifact.name} timed out after {timeout:.3g} s") from None
            if proc.returncode != 0:
                raise StoreError(f"zsyncmake {artifact.name} failed: {_tail(proc)}")
            return out.read_bytes()
    except OSError as exc:
        raise StoreError(f"zsyncmake {artifact.name}: {exc}") from None


def sync(seed: Path, control: Path, dest: Path, timeout: float) -> int:
    """Build ``dest`` with zsync from the blocks of ``seed`` and those ``control``
    names, fetched from its URL, all within ``timeout`` seconds; the bytes fetched."""
    work = dest.parent
    try:
        proc = _run(
            ["zsync", "-i", str(seed.resolve()), "-o", str(dest.resolve()), str(control.resolve())],
            work,
            timeout,
        )
    except FileNotFoundError:
        raise FetchError(
            "zsync not found (install the Debian package zsync)", kind=FetchKind.UNREACHABLE
        ) from None
    except subprocess.TimeoutExpired:
        raise FetchError(
            f"zsync from {seed.name}: not done within {timeout:g}s (slow retrieval)", kind=FetchKind.DEADLINE
        ) from None
    if proc.returncode != 0:
        raise FetchError(f"zsync from {seed.name} failed: {_tail(proc)}", kind=FetchKind.INTERRUPTED)
    m = _FETCHED.search(proc.stdout.replace(b"\r", b"\n"))
    if m is None:
        raise FetchError(f"zsync from {seed.name}: no byte count in its output", kind=FetchKind.INTERRUPTED)
    return int(m.group(2))
