"""A tool run once under a deadline that kills it with everything it started.

The tools the adapters run start others (git starts gpg; diffoscope hands files to
unpackers and disassemblers): killing the first process alone at the deadline would
leave one stuck on a crafted input running. Each runs in a session, and so a process
group, of its own, and the deadline kills the group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path


def run_with_deadline(
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    timeout: float,
    cwd: Path | None = None,
    stdout: bool = False,
    stderr: bool = False,
    kill_leftovers: bool = False,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``args`` with ``env`` (the whole environment) in ``cwd``, no stdin, and its
    ``stdout`` and ``stderr`` captured where asked (b"" where not: discarded).

    Past ``timeout`` seconds the whole process group is killed and reaped, and
    subprocess.TimeoutExpired raised. With ``kill_leftovers``, what the tool started
    and left running when it exited is killed too; without, it is left to finish
    (a captured stream it holds open keeps the run going, up to the deadline).
    FileNotFoundError and the like when ``args[0]`` cannot be started."""
    with subprocess.Popen(
        list(args),
        cwd=cwd,
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if stdout else subprocess.DEVNULL,
        stderr=subprocess.PIPE if stderr else subprocess.DEVNULL,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            # wait, not communicate: a process that left the group (its own setsid)
            # may hold a pipe open for ever; the output is not wanted anyway.
            proc.wait()
            raise
        if kill_leftovers:
            _kill_group(proc.pid)
    return subprocess.CompletedProcess(list(args), proc.returncode, out or b"", err or b"")


def _kill_group(pgid: int) -> None:
    # After a normal exit the group may be gone (nothing was left in it).
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
