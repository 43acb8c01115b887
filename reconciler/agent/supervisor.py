"""The host's AppImage, run by the agent itself (``supervise: true``): started, stopped
by TERM to its process group, restarted with backoff while it keeps crashing."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from reconciler import log

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

    def __init__(self, host: str, monotonic: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self._monotonic = monotonic
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.crashes = 0  # exits in a row, each soon after its start
        self.restart_at = 0.0

    def start(self, artifact: Path) -> None:
        self.proc = subprocess.Popen([str(artifact)], cwd=artifact.parent, start_new_session=True)
        self.started = self._monotonic()
        log.event("app_started", host=self.host, artifact=str(artifact), pid=self.proc.pid)

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
