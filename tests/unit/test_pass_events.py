"""What a pass records in the event history (reconciler.core.events), on in-memory fakes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest

from reconciler.core.events import EventType
from reconciler.daemon.gate import CommitRefusedError
from tests.fakes import MemoryEvents, MemoryLedger, RefusingGate
from tests.unit.test_daemon_pass import FLEET, HOST, World


@dataclass
class EventWorld(World):
    history: MemoryEvents = field(default_factory=MemoryEvents)


@pytest.fixture
def world(tmp_path: Path) -> EventWorld:
    return EventWorld(tmp_path)


def types(world: EventWorld) -> list[tuple[EventType, str | None]]:
    return [(e.type, e.host) for e in world.history.events]


def test_a_pass_records_its_start_each_host_built_and_published_and_its_end(world: EventWorld) -> None:
    commit = world.source.push(FLEET, at=world.clock.t - 40)
    world.reconciler().reconcile()
    assert types(world)[0] == (EventType.PASS_STARTED, None)
    assert types(world)[-1] == (EventType.PASS_FINISHED, None)
    assert sorted(types(world)[1:-1]) == sorted(
        (t, h) for h in ("web-1", "web-2") for t in (EventType.HOST_BUILT, EventType.HOST_PUBLISHED)
    )
    start, end = world.history.of(EventType.PASS_STARTED, EventType.PASS_FINISHED)
    assert start.commit == end.commit == commit
    assert dict(start.data) == {"hosts": 2, "rebuild": 2}
    assert end.data["ok"] is True and end.data["published"] == 2 and end.data["failed"] == 0
    assert end.seconds is not None and end.error is None
    published = world.history.of(EventType.HOST_PUBLISHED)
    assert {(e.host, e.version, e.commit) for e in published} == {("web-1", 1, commit), ("web-2", 1, commit)}
    # Commit to published, by the clocks the pass read: 40 s.
    assert {e.data["latency"] for e in published} == {40.0}
    assert all(e.data["recovered"] is False and e.data["artifacts"] for e in published)
    # Why each was rebuilt, as `reconciler plan` says it.
    assert {e.data["reasons"] for e in published} == {"new host, never published"}
    built = world.history.of(EventType.HOST_BUILT)
    assert {(e.host, e.version, e.data["builder"]) for e in built} == {
        ("web-1", 1, "local"),
        ("web-2", 1, "local"),
    }
    assert [e.id for e in world.history.events] == list(range(1, 7))


def test_a_failure_is_recorded_with_its_error_and_the_next_publication_as_a_recovery(
    world: EventWorld,
) -> None:
    world.source.push(FLEET)
    world.nix.failing.add("web-1")
    rec = world.reconciler()
    rec.reconcile()
    (failed,) = world.history.of(EventType.HOST_FAILED)
    assert failed.host == "web-1" and failed.error is not None and "exit code 1" in failed.error
    assert dict(failed.data) == {"failures": 1, "retry_in": 30, "reasons": "new host, never published"}
    end = world.history.of(EventType.PASS_FINISHED)[-1]
    assert end.data["ok"] is False and end.data["failed"] == 1 and end.data["published"] == 1
    world.nix.failing.clear()
    world.clock.advance(31)
    rec.reconcile()
    (again,) = [e for e in world.history.of(EventType.HOST_PUBLISHED) if e.host == "web-1"]
    assert again.data["recovered"] is True
    # web-2 published the first time round: no recovery there.
    assert [e.data["recovered"] for e in world.history.of(EventType.HOST_PUBLISHED) if e.host == "web-2"] == [
        False
    ]


def test_an_adopted_release_is_recorded_as_adopted(world: EventWorld) -> None:
    world.source.push(FLEET)
    world.reconciler().reconcile()
    world.ledger = MemoryLedger()  # the process died before recording
    world.history = MemoryEvents()
    world.reconciler().reconcile()
    assert {e.host for e in world.history.of(EventType.HOST_ADOPTED)} == {"web-1", "web-2"}
    assert world.history.of(EventType.HOST_PUBLISHED) == []


def test_an_untrusted_head_is_recorded_once_however_many_passes_meet_it(world: EventWorld) -> None:
    world.gate = RefusingGate()
    head = world.source.push(FLEET)
    world.gate.refused.add(head)
    rec = world.reconciler()
    for _ in range(3):
        with pytest.raises(CommitRefusedError):
            rec.reconcile()
    (untrusted,) = world.history.of(EventType.COMMIT_UNTRUSTED)
    assert untrusted.commit == head and untrusted.data == {"reason": "unsigned"}
    assert untrusted.error == "not signed"
    ends = world.history.of(EventType.PASS_FINISHED)
    assert len(ends) == 3 and all(e.data == {"ok": False} and e.commit == head for e in ends)
    assert all(e.error is not None and "not signed" in e.error for e in ends)
    # Another refused head is another event.
    world.gate.refused.add(world.source.push({**FLEET, "README": "x"}))
    with pytest.raises(CommitRefusedError):
        rec.reconcile()
    assert len(world.history.of(EventType.COMMIT_UNTRUSTED)) == 2


def test_a_host_turning_invalid_is_recorded_once(world: EventWorld) -> None:
    world.source.push(FLEET)
    rec = world.reconciler()
    rec.reconcile()
    world.source.push({**FLEET, "hosts/web-1.yaml": "name: web-1\nformats: [tarball]\n"})
    rec.reconcile()
    rec.reconcile()
    (invalid,) = world.history.of(EventType.HOST_INVALID)
    assert invalid.host == "web-1" and invalid.error is not None and "formats" in invalid.error
    world.source.push({**FLEET, "hosts/web-1.yaml": HOST.format(name="web-1", address="10.0.0.8/24")})
    rec.reconcile()
    fixed = [e for e in world.history.of(EventType.HOST_PUBLISHED) if e.host == "web-1"][-1]
    assert fixed.version == 2 and fixed.data["recovered"] is True


def test_a_pass_that_observes_nothing_records_its_failure(world: EventWorld) -> None:
    world.source.push(FLEET)
    world.source.unreachable = "cannot fetch: connection refused"
    rec = world.reconciler()
    with pytest.raises(Exception, match="connection refused"):
        rec.reconcile()
    (end,) = world.history.events
    assert end.type == EventType.PASS_FINISHED and end.data == {"ok": False} and end.commit is None
    assert end.error == "cannot fetch: connection refused"


def test_record_event_and_close_reach_the_history(world: EventWorld) -> None:
    rec = world.reconciler()
    rec.record_event(EventType.SUSPENDED, host="web-1", by="operator")
    (e,) = world.history.events
    assert (e.type, e.host, e.time, dict(e.data)) == (
        EventType.SUSPENDED,
        "web-1",
        world.clock.t,
        {"by": "operator"},
    )
    rec.close()
    assert world.history.closed
