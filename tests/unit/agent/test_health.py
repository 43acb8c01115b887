"""The wait for a release to become healthy (reconciler.agent.health)."""

from __future__ import annotations

from reconciler.agent.config import HealthConfig
from reconciler.agent.health import wait_healthy

CHECK = HealthConfig(command=("probe",), timeout=30.0, interval=1.0)


class Ticks:
    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_a_service_that_died_ends_the_wait_at_once() -> None:
    """The app's supervisor saw a service fail: no later probe can pass, so the
    rollback need not wait out the timeout."""
    ticks, reports = Ticks(), iter([None, None, "service web exited with status 1"])
    probes: list[float] = []

    def probe(h: HealthConfig) -> str:
        probes.append(ticks.now)
        return "connection refused"

    assert wait_healthy(CHECK, ticks, lambda: next(reports), probe) == "service web exited with status 1"
    assert probes == [0.0, 1.0] and ticks.now == 2.0


def test_a_probe_that_keeps_failing_fails_after_the_timeout() -> None:
    ticks = Ticks()
    assert wait_healthy(CHECK, ticks, lambda: None, lambda h: "answered 500") == (
        "health check failed for 30s: answered 500"
    )
    assert ticks.now == 30.0


def test_healthy_once_a_probe_passes() -> None:
    ticks, answers = Ticks(), iter(["refused", ""])
    assert wait_healthy(CHECK, ticks, lambda: None, lambda h: next(answers)) is None
