"""Is the app healthy: one probe (an HTTP GET or a command), and the wait for it."""

from __future__ import annotations

import subprocess
import urllib.request
from collections.abc import Callable
from typing import Protocol

from reconciler.agent.config import HealthConfig

# One probe never takes longer than these, however long the whole check may take:
# a hung probe must leave time for the next one.
URL_PROBE_TIMEOUT = 5.0
COMMAND_PROBE_TIMEOUT = 30.0


class Ticks(Protocol):
    """The part of a clock the wait needs."""

    def monotonic(self) -> float: ...

    def sleep(self, seconds: float) -> None: ...


def probe(h: HealthConfig) -> str:
    """One health probe: empty when healthy, else why not."""
    if h.url is not None:
        try:
            with urllib.request.urlopen(h.url, timeout=min(h.timeout, URL_PROBE_TIMEOUT)) as r:
                return "" if 200 <= r.status < 300 else f"{h.url} answered {r.status}"
        except OSError as exc:
            return f"{h.url}: {getattr(exc, 'reason', exc)}"
    assert h.command is not None
    try:
        proc = subprocess.run(h.command, capture_output=True, timeout=min(h.timeout, COMMAND_PROBE_TIMEOUT))
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{h.command[0]}: {exc}"
    return "" if proc.returncode == 0 else f"{' '.join(h.command)} exited {proc.returncode}"


def wait_healthy(
    h: HealthConfig,
    clock: Ticks,
    down: Callable[[], str | None] = lambda: None,
    check: Callable[[HealthConfig], str] = probe,
) -> str | None:
    """Probe every ``h.interval`` until healthy or ``h.timeout`` passed; None when
    healthy, else why not. ``down`` says why the supervised app is not running as it
    should (it exited, or a service of it did), None while it is: that ends the wait
    at once, as no later probe can pass."""
    deadline = clock.monotonic() + h.timeout
    while True:
        gone = down()
        if gone is not None:
            return gone
        last = check(h)
        if not last:
            return None
        if clock.monotonic() + h.interval > deadline:
            return f"health check failed for {h.timeout:g}s: {last}"
        clock.sleep(h.interval)
