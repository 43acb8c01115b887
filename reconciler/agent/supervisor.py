"""The host's AppImage, run by the agent itself (``supervise: true``): started, stopped
by TERM to its process group, restarted with backoff while it keeps crashing.

The image's own supervisor (nix/runtime/supervise.c) restarts a service that dies
inside a running AppImage, so the AppImage itself lives on; what the agent learns of
such a death is the supervisor's line on the AppImage's stderr ("reconciler-supervise:
web exited with status 1; restarting in 1000 ms"). The agent reads that stream (and
passes every line on to its own stderr), so that the health check after a switch can
roll back at once instead of waiting out its timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from reconciler import log

# What the image's supervisor says on stderr when a service ended (supervise.c, exited()).
# A service's own output goes to stdout, prefixed with its name, so it cannot say this.
SERVICE_ENDED = re.compile(
    r"^reconciler-supervise: (?P<service>\S+) "
    r"(?P<how>exited with status (?P<status>\d+)|killed by signal \d+)"
)

# The app gets this long to stop on TERM before its process group is killed.
STOP_TIMEOUT = 30.0
# An app that exits sooner than this after its start counts as crashing: its restarts
# back off, doubling from a second up to a minute.
STABLE_AFTER = 60.0
MAX_RESTART_DELAY = 60.0
# A killed process group is gone at once; this only bounds the wait for the kernel.
KILL_WAIT = 10.0


class App:
    """The host's AppImage, run by the agent itself (``supervise: true``)."""

    def __init__(
        self, host: str, monotonic: Callable[[], float] = time.monotonic, pidfile: Path | None = None
    ) -> None:
        self.host = host
        self._monotonic = monotonic
        # Where the running app's process is noted (stop_orphan): an agent killed with
        # SIGKILL leaves its app running in a session of its own.
        self.pidfile = pidfile
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.crashes = 0  # exits in a row, each soon after its start
        self.restart_at = 0.0
        # Services the image's supervisor saw fail since the last start (read from its stderr).
        self._failures: list[str] = []

    def start(self, artifact: Path) -> None:
        self.proc = subprocess.Popen(
            [str(artifact)], cwd=artifact.parent, start_new_session=True, stderr=subprocess.PIPE
        )
        self.started = self._monotonic()
        self._failures = []
        if self.pidfile is not None:
            self.pidfile.write_text(f"{self.proc.pid} {_start_time(self.proc.pid)}\n")
        assert self.proc.stderr is not None
        threading.Thread(
            target=self._read_stderr, args=(self.proc.stderr, self._failures), name="app-stderr", daemon=True
        ).start()
        log.event("app_started", host=self.host, artifact=str(artifact), pid=self.proc.pid)

    @staticmethod
    def _read_stderr(stream: IO[bytes], failures: list[str]) -> None:
        """Pass the app's stderr on, line by line, and note each service that failed
        (a one-shot service that exited 0 did not)."""
        with stream:
            for raw in stream:
                sys.stderr.buffer.write(raw)
                sys.stderr.buffer.flush()
                m = SERVICE_ENDED.match(raw.decode(errors="replace"))
                if m and m.group("status") != "0":
                    failures.append(f"service {m.group('service')} {m.group('how')}")

    def failure(self) -> str | None:
        """Why the app since its last start is not well: it exited, or one of its
        services did (the first such); None while both run."""
        if self.proc is None or self.proc.poll() is not None:
            return "the app exited"
        return self._failures[0] if self._failures else None

    def exited(self) -> None:
        """Note that the app exited on its own; restarts back off while it keeps crashing."""
        assert self.proc is not None
        now = self._monotonic()
        self.crashes = self.crashes + 1 if now - self.started < STABLE_AFTER else 1
        delay = min(2.0 ** (self.crashes - 1), MAX_RESTART_DELAY)
        self.restart_at = now + delay
        status = self.proc.returncode
        log.event("app_exited", logging.WARNING, host=self.host, status=status, restart_in=round(delay))
        self.proc = None

    def restart_due(self) -> bool:
        """Whether a crashed app's backoff is over."""
        return self._monotonic() >= self.restart_at

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            # The runtime forwards TERM to AppRun, which stops every service.
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(KILL_WAIT)
        log.event("app_stopped", host=self.host, pid=self.proc.pid, status=self.proc.returncode)
        self.proc = None
        if self.pidfile is not None:
            self.pidfile.unlink(missing_ok=True)

    def stop_orphan(self) -> None:
        """Stop the app an agent before this one started and did not live to stop (its
        pidfile names it), as stop() would have: TERM to its process group, and KILL
        after STOP_TIMEOUT. A process of that number started at another time is not
        it, and is left alone."""
        if self.pidfile is None:
            return
        try:
            pid_text, _, started = self.pidfile.read_text().partition(" ")
            pid = int(pid_text)
        except (OSError, ValueError):
            return
        if pid > 1 and started.strip() and _start_time(pid) == started.strip():
            log.event("app_orphan_stopped", logging.WARNING, host=self.host, pid=pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGTERM)
                end = time.monotonic() + STOP_TIMEOUT
                while _start_time(pid) == started.strip() and time.monotonic() < end:
                    time.sleep(0.1)
                os.killpg(pid, signal.SIGKILL)
        self.pidfile.unlink(missing_ok=True)


def _start_time(pid: int) -> str:
    """When process ``pid`` started, in clock ticks since boot (/proc/PID/stat's 22nd
    field): with the pid, what names one process; empty if there is none, or only its
    zombie is left."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The command name, in parentheses, may hold spaces and parentheses of its own.
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 and fields[0] != "Z" else ""
