"""Is the app healthy: one probe (an HTTP GET or a command), and the wait for it."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from typing import Protocol

from reconciler.adapters import fetch
from reconciler.agent.config import HealthConfig
from reconciler.errors import FetchError

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
            # One deadline for the whole probe: an app that answers a byte at a time must
            # not hold the wait (and the rollback after it) past its timeout.
            answered = fetch.status(h.url, min(h.timeout, URL_PROBE_TIMEOUT), label=h.url)
        except FetchError as exc:
            return str(exc)
        # As Kubernetes' httpGet probe: a redirect is an answer, not followed.
        return "" if 200 <= answered < 400 else f"{h.url} answered {answered}"
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
