"""adapters.process: a tool run under a deadline that kills its whole process group
(git verify-commit with its gpg, diffoscope with its unpackers, zsync), with real
processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.adapters.process import OutputTooLargeError, run_keeping, run_with_deadline
from tests.conftest import alive, wait_for

ENV = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}


@pytest.fixture
def pidfile(tmp_path: Path) -> Iterator[Path]:
    """Where a script writes the pid of what it started; that process is killed after
    the test, whatever the test saw."""
    path = tmp_path / "child.pid"
    yield path
    with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
        os.kill(int(path.read_text()), signal.SIGKILL)


@pytest.mark.parametrize("escaped", [False, True])
def test_the_deadline_kills_the_tool_and_what_it_started(pidfile: Path, escaped: bool) -> None:
    # Both sleeps hold the captured stdout open: the run ends at the deadline alone. A
    # process that left the group (setsid) outlives the kill and keeps the pipe open:
    # the run still ends at the deadline instead of reading it for ever.
    setsid = "setsid " if escaped else ""
    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_with_deadline(
            ["sh", "-c", f"{setsid}sleep 30 & echo $! > {pidfile}; sleep 30"],
            env=ENV,
            timeout=0.3,
            stdout=True,
            stderr=True,
        )
    assert time.monotonic() - start < 3
    if not escaped:
        child = int(pidfile.read_text())
        wait_for(lambda: not alive(child), 3, "the tool's background child to be killed")


@pytest.mark.parametrize("kill_leftovers", [True, False])
def test_what_a_tool_leaves_running_is_killed_only_when_asked(pidfile: Path, kill_leftovers: bool) -> None:
    # diffoscope's run kills them; git's and zsync's leave them be, as they always did.
    got = run_with_deadline(
        ["sh", "-c", f"sleep 30 >/dev/null 2>&1 & echo $! > {pidfile}; echo done; exit 3"],
        env=ENV,
        timeout=5,
        stdout=True,
        kill_leftovers=kill_leftovers,
    )
    assert (got.returncode, got.stdout, got.stderr) == (3, b"done\n", b"")
    child = int(pidfile.read_text())
    if kill_leftovers:
        wait_for(lambda: not alive(child), 3, "the leftover child to be killed")
    else:
        assert alive(child)


def test_a_run_has_its_own_environment_directory_and_the_output_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAEMON_SECRET", "s3cret")
    script = 'echo "$(pwd -P) $GREETING ${DAEMON_SECRET:-unset}"; echo oops >&2; exit 1'
    got = run_with_deadline(
        ["sh", "-c", script],
        env={**ENV, "GREETING": "hi"},
        cwd=tmp_path,
        timeout=5,
        stdout=True,
        stderr=True,
    )
    assert (got.returncode, got.stdout, got.stderr) == (
        1,
        f"{tmp_path.resolve()} hi unset\n".encode(),
        b"oops\n",
    )
    # A stream not asked for is discarded.
    quiet = run_with_deadline(["sh", "-c", script], env=ENV, timeout=5, stderr=True)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (1, b"", b"oops\n")
    with pytest.raises(FileNotFoundError):
        run_with_deadline(["/nonexistent/tool"], env=ENV, timeout=5)


def test_of_a_tool_that_prints_without_end_only_the_head_and_tail_are_kept() -> None:
    # 5 MB on stderr, bytes that are not UTF-8 among them; the end says what went wrong.
    script = (
        "printf 'start\\n' >&2; head -c 5000000 /dev/zero | tr '\\0' a >&2;"
        " printf '\\377\\nerror: the end\\n' >&2; echo out; exit 3"
    )
    done = run_keeping(
        ["sh", "-c", script], env=ENV, timeout=30, stderr_head=100, stderr_tail=1000, stdout_limit=4
    )
    assert (done.returncode, done.stdout) == (3, "out\n")
    assert done.stderr.startswith("start\naaa") and done.stderr.endswith("\ufffd\nerror: the end\n")
    assert len(done.stderr) < 1200
    assert f"[... {6 + 5_000_000 + 1 + 16 - 100 - 1000} bytes left out ...]" in done.stderr


def test_a_tool_kept_past_its_deadline_is_killed() -> None:
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_keeping(["sleep", "30"], env=ENV, timeout=0.5, stderr_head=10, stderr_tail=10, stdout_limit=10)
    assert time.monotonic() - started < 10


def test_a_tool_printing_more_than_is_read_is_stopped_at_the_limit() -> None:
    """Its stdout was read whole: a package's string of hundreds of MB in the daemon."""
    started = time.monotonic()
    with pytest.raises(OutputTooLargeError):
        run_keeping(
            ["sh", "-c", "yes; sleep 30"],
            env=ENV,
            timeout=30,
            stderr_head=10,
            stderr_tail=10,
            stdout_limit=1 << 20,
        )
    assert time.monotonic() - started < 10
    done = run_keeping(
        ["printf", "1234"], env=ENV, timeout=30, stderr_head=10, stderr_tail=10, stdout_limit=4
    )
    assert done.stdout == "1234"
