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
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO


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


class _Kept:
    """What is kept of a stream: its first ``head`` bytes and its last ``tail``."""

    def __init__(self, head: int, tail: int) -> None:
        self._head_room, self._tail_room = head, tail
        self._head = bytearray()
        self._tail = bytearray()
        self.dropped = 0

    def drain(self, stream: IO[bytes]) -> None:
        while chunk := stream.read(1 << 16):
            room = self._head_room - len(self._head)
            self._head += chunk[:room]
            self._tail += chunk[room:]
            if len(self._tail) > self._tail_room:
                cut = len(self._tail) - self._tail_room
                del self._tail[:cut]
                self.dropped += cut

    def text(self) -> str:
        gap = f"\n[... {self.dropped} bytes left out ...]\n" if self.dropped else ""
        return self._head.decode(errors="replace") + gap + self._tail.decode(errors="replace")


class OutputTooLargeError(Exception):
    """A tool printed more than its caller reads (run_keeping's ``stdout_limit``)."""


def run_keeping(
    args: Sequence[str],
    *,
    env: Mapping[str, str],
    timeout: float,
    stderr_head: int,
    stderr_tail: int,
    stdout_limit: int,
) -> subprocess.CompletedProcess[str]:
    """Run ``args`` with no stdin, its stdout read whole and of its stderr only the first
    ``stderr_head`` and last ``stderr_tail`` bytes kept (a tool printing without end
    costs this process no more), both as text (bytes that are not UTF-8 replaced).
    Past ``timeout`` seconds it is killed (with its process group, as run_with_deadline
    does) and subprocess.TimeoutExpired raised; past ``stdout_limit`` bytes of stdout,
    killed so and OutputTooLargeError raised."""
    with subprocess.Popen(
        list(args),
        env=dict(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    ) as proc:
        stdout, stderr = proc.stdout, proc.stderr
        assert stdout is not None and stderr is not None
        out: list[bytes] = []
        err = _Kept(stderr_head, stderr_tail)
        over = threading.Event()

        def read_out() -> None:
            got = 0
            while chunk := stdout.read(1 << 16):
                got += len(chunk)
                if got > stdout_limit:
                    over.set()
                    _kill_group(proc.pid)
                    return
                out.append(chunk)

        readers = [
            threading.Thread(target=read_out, daemon=True),
            threading.Thread(target=err.drain, args=(stderr,), daemon=True),
        ]
        for reader in readers:
            reader.start()
        # The readers end when the tool closes its pipes, at its exit: joined, not
        # Popen.wait(timeout), which polls with sleeps of up to 50 ms.
        end = time.monotonic() + timeout
        for reader in readers:
            reader.join(max(0.0, end - time.monotonic()))
        try:
            proc.wait(max(0.0, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait()
            raise
        finally:
            # A process it started may hold the pipes open: waited for only so long.
            for reader in readers:
                reader.join(5.0)
    if over.is_set():
        raise OutputTooLargeError(f"{args[0]} printed more than {stdout_limit} bytes")
    return subprocess.CompletedProcess(
        list(args), proc.returncode, b"".join(out).decode(errors="replace"), err.text()
    )
