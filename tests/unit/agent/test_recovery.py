"""What an agent killed part-way leaves, put right by the next one (Agent.hold): a
switch it did not decide, a rollback it did not finish, its downloads, its app; and one
agent per state directory. Whole polls on the in-memory store of test_updater; the
orphaned app is a real process."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reconciler.agent.config import HealthConfig
from reconciler.agent.state import MAX_SWITCH_TRIES, AgentState
from reconciler.agent.supervisor import App
from reconciler.errors import ReconcilerError
from tests.unit.agent.test_updater import Host, Probe, make_agent, make_host


class Killed(BaseException):
    """The agent's process ending where it stands (SIGKILL, power loss): nothing after
    it runs, no handler, no save."""


class KillingProbe(Probe):
    """A probe whose agent is killed while it checks one of the versions in ``kill``."""

    kill: set[int]

    def __call__(self, h: HealthConfig) -> str:
        version = int(os.readlink(self.current).rsplit("/", 1)[1])
        if version in self.kill:
            raise Killed
        return super().__call__(h)


def killing(host: Host, *versions: int) -> KillingProbe:
    """A new agent process on ``host``'s state directory, killed while it checks ``versions``."""
    probe = KillingProbe(host.probe.current, set(host.probe.unhealthy))
    probe.kill = set(versions)
    host.probe = probe
    host.restart()
    return probe


@pytest.fixture
def on_v1(tmp_path: Path) -> Host:
    host = make_host(tmp_path)
    host.publish(1)
    assert host.poll() == "updated"
    return host


def state(host: Host) -> AgentState:
    return AgentState.load(host.agent.state_file)


def test_a_switch_killed_in_its_check_is_tried_again_and_then_given_up(on_v1: Host) -> None:
    v2 = on_v1.publish(2)
    killing(on_v1, 2)
    for tries in range(1, MAX_SWITCH_TRIES + 1):
        with pytest.raises(Killed):
            on_v1.poll()
        # The agent died with current on 2, and its state on 1 with the switch noted.
        assert on_v1.running() == 2
        assert (state(on_v1).version, state(on_v1).switching_version, state(on_v1).switching_tries) == (
            1,
            2,
            tries,
        )
        killing(on_v1, 2)
        with on_v1.agent.hold():
            assert on_v1.running() == 1  # where the state says the host runs
    # Begun MAX_SWITCH_TRIES times and never decided: failed, as a failed check is.
    art = v2.artifact("appimage")
    assert art is not None
    st = state(on_v1)
    assert art.sha256 in st.failed and st.switching == "" and st.settled
    probed = len(on_v1.probe.probed)
    assert on_v1.poll() == "current"
    assert on_v1.running() == 1 and len(on_v1.probe.probed) == probed


def test_a_switch_killed_once_is_taken_at_the_next_start(on_v1: Host) -> None:
    on_v1.publish(2)
    killing(on_v1, 2)
    with pytest.raises(Killed):
        on_v1.poll()
    killing(on_v1)  # the next process lives
    with on_v1.agent.hold():
        assert on_v1.running() == 1
        assert on_v1.poll() == "updated"
    assert on_v1.running() == 2
    st = state(on_v1)
    assert (st.version, st.previous, st.switching, st.failed) == (2, 1, "", [])


def test_a_rollback_killed_part_way_keeps_the_release_failed(on_v1: Host) -> None:
    v2 = on_v1.publish(2)
    on_v1.probe.unhealthy.add(2)
    probe = killing(on_v1, 1)  # v2 fails its check; the agent dies while v1 starts again
    with pytest.raises(Killed):
        on_v1.poll()
    art = v2.artifact("appimage")
    assert art is not None and art.sha256 in state(on_v1).failed
    probe.kill.clear()
    on_v1.restart()
    probed = len(probe.probed)
    with on_v1.agent.hold():
        assert on_v1.running() == 1
        assert on_v1.poll() == "current"
    assert on_v1.running() == 1 and len(probe.probed) == probed  # v2 not started again


def test_one_agent_holds_a_state_directory(on_v1: Host) -> None:
    other = make_agent(on_v1)
    with on_v1.agent.hold():
        with pytest.raises(ReconcilerError) as refused, other.hold():
            pass
        assert str(refused.value) == (
            f"{on_v1.agent.cfg.state_dir} is in use by another agent (pid {os.getpid()}); "
            "one agent runs per state directory"
        )
    with other.hold():
        assert other.poll() == "idle"


def test_downloads_a_killed_agent_left_are_removed(on_v1: Host) -> None:
    leftover = on_v1.agent.releases / ".2.x1y2z3"
    leftover.mkdir()
    (leftover / "web-1-2-x86_64.AppImage").write_bytes(b"half")
    on_v1.agent.current.with_name("current.tmp").symlink_to("releases/2")
    on_v1.restart()
    with on_v1.agent.hold():
        assert not leftover.exists() and not on_v1.agent.current.with_name("current.tmp").is_symlink()
        assert on_v1.running() == 1 and sorted(p.name for p in on_v1.agent.releases.iterdir()) == ["1"]


def test_an_app_a_killed_agent_left_running_is_stopped(tmp_path: Path) -> None:
    app = tmp_path / "app"
    app.write_text("#!/bin/sh\nexec sleep 60\n")
    app.chmod(0o755)
    pidfile = tmp_path / "app.pid"
    first = App("web-1", pidfile=pidfile)
    first.start(app)
    assert first.proc is not None
    # The agent that started it is gone; the next one finds the app by its pidfile.
    App("web-1", pidfile=pidfile).stop_orphan()
    assert first.proc.wait(10) == -signal.SIGTERM
    assert not pidfile.exists()


def test_a_pidfile_naming_another_process_stops_nothing(tmp_path: Path) -> None:
    pidfile = tmp_path / "app.pid"
    # A process now holding the number, started at another time than the app was.
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        pidfile.write_text(f"{other.pid} 1\n")
        App("web-1", pidfile=pidfile).stop_orphan()
        time.sleep(0.2)
        assert other.poll() is None and not pidfile.exists()
    finally:
        other.kill()
        other.wait()


def test_a_stop_during_a_check_abandons_the_switch_without_blaming_the_release(on_v1: Host) -> None:
    """SIGTERM while a release is checked: the agent does not wait out the check (a
    service manager would kill it first), and the release is tried at the next start."""
    on_v1.publish(2)
    on_v1.probe.unhealthy.add(2)  # not healthy yet: the check would go on to its timeout
    stopping = on_v1.agent._stopping

    class StoppedWhileChecking(Probe):
        def __call__(self, h: HealthConfig) -> str:
            stopping.set()
            return super().__call__(h)

    on_v1.agent._probe = StoppedWhileChecking(on_v1.probe.current, {2})
    started = on_v1.clock.monotonic()
    assert on_v1.poll() == "error"
    # One probe more once told, then it gives up: two intervals, not the 5 s timeout.
    assert on_v1.clock.monotonic() - started <= 2.0
    st = state(on_v1)
    assert (st.version, st.switching, st.failed, st.settled) == (1, "", [], "")
    assert on_v1.running() == 1
    on_v1.probe.unhealthy.clear()
    on_v1.restart()
    with on_v1.agent.hold():
        assert on_v1.poll() == "updated"
    assert on_v1.running() == 2


@pytest.mark.parametrize("damage", ["cut", "gone"])
def test_a_trusted_root_damaged_on_disk_is_trusted_again_from_the_pinned_keys(
    on_v1: Host, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The host's own copy, not the store: refusing the store for it at every poll would
    leave the host off every release until someone deleted the directory by hand."""
    root = on_v1.agent.cfg.state_dir / "tuf" / "root.json"
    kept = root.resolve()  # root_history/<N>.root.json, as ngclient keeps it
    if damage == "cut":
        kept.write_bytes(kept.read_bytes()[:100])
    else:
        kept.unlink()  # root.json dangles
    on_v1.publish(2)
    on_v1.restart()
    with caplog.at_level(logging.WARNING, logger="reconciler"):
        assert on_v1.poll() == "updated"
    assert on_v1.running() == 2
    assert ("agent_tuf_reset" in caplog.text) == (damage == "cut")


@pytest.mark.parametrize("damage", ["release.json", "artifact"])
def test_a_running_release_damaged_on_disk_is_installed_afresh(on_v1: Host, damage: str) -> None:
    release = on_v1.agent.releases / "1"
    if damage == "release.json":
        (release / "release.json").write_bytes(b'{"host": "web-1", "vers')
    else:
        art = next(p for p in release.iterdir() if p.name.endswith(".AppImage"))
        art.chmod(0o644)
        art.write_bytes(b"cut")
    on_v1.restart()
    with on_v1.agent.hold():
        assert state(on_v1).version == 0 and not on_v1.agent.current.is_symlink()
        assert on_v1.poll() == "updated"
    assert on_v1.running() == 1 and on_v1.agent._installed(1) is not None


def test_a_stop_during_a_check_keeps_the_switch_when_the_next_probe_passes(on_v1: Host) -> None:
    on_v1.publish(2)
    stopping = on_v1.agent._stopping
    answers = iter(["not up yet", ""])

    def probe(h: HealthConfig) -> str:
        stopping.set()  # the stop comes while the app is coming up
        return next(answers)

    on_v1.agent._probe = probe
    assert on_v1.poll() == "updated"
    assert on_v1.running() == 2 and state(on_v1).version == 2
