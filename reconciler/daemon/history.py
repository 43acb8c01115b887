"""What a pass records in the event history (reconciler.core.events), from its own data:
the pass's start and end, each host acted on, a refused head. The pass (reconciler.py)
calls these where it logs the same things and hands the events to its EventLog port."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from reconciler.core.events import Event, EventType, Scalar, summary
from reconciler.core.model import Action, HostState, Status
from reconciler.core.plan import Plan
from reconciler.daemon.gate import CommitRefusedError

if TYPE_CHECKING:
    from reconciler.daemon.observer import Observation
    from reconciler.daemon.reconciler import HostOutcome, ReconcileResult


def pass_started(obs: Observation, rebuild: int, now: float) -> Event:
    return Event(
        EventType.PASS_STARTED,
        now,
        commit=obs.commit,
        data={"hosts": len(obs.fleet.hosts), "rebuild": rebuild},
    )


def pass_finished(result: ReconcileResult, seconds: float, now: float) -> Event:
    plan = result.plan
    return Event(
        EventType.PASS_FINISHED,
        now,
        commit=plan.commit,
        seconds=seconds,
        error=None if result.metadata_error is None else summary(result.metadata_error),
        data={
            "ok": result.ok,
            "published": sum(o.ok for o in result.outcomes),
            "failed": sum(not o.ok for o in result.outcomes),
            "invalid": len(plan.with_action(Action.INVALID)),
            "backoff": len(plan.with_action(Action.BACKOFF)),
            "interrupted": len(result.interrupted),
        },
    )


def pass_failed(exc: Exception, seconds: float, now: float) -> Event:
    """A pass that ended in ``exc`` before it had a plan (nothing could be observed)."""
    commit = exc.commit if isinstance(exc, CommitRefusedError) else None
    return Event(
        EventType.PASS_FINISHED,
        now,
        commit=commit,
        seconds=seconds,
        error=summary(str(exc)),
        data={"ok": False},
    )


def commit_untrusted(exc: CommitRefusedError, now: float) -> Event:
    return Event(
        EventType.COMMIT_UNTRUSTED,
        now,
        commit=exc.commit,
        error=summary(exc.why),
        data={"reason": exc.reason.value},
    )


def host_events(
    commit: str,
    commit_time: float,
    plan: Plan,
    outcomes: tuple[HostOutcome, ...],
    before: Mapping[str, HostState],
    backoff: Mapping[str, tuple[int, float]],
    now: float,
) -> list[Event]:
    """The hosts in a pass at ``commit``, given what the ledger held ``before`` it: a host
    that turned invalid (once, not every pass it stays so), and what came of each host
    acted on (``backoff``: the failed ones' failures in a row and retry delay)."""
    events: list[Event] = []
    why = {e.host: "; ".join(e.reasons) for e in plan.with_action(Action.REBUILD)}
    for entry in plan.with_action(Action.INVALID):
        prev = before.get(entry.host)
        if prev is None or prev.status != Status.INVALID or prev.error != entry.reasons[0]:
            events.append(
                Event(EventType.HOST_INVALID, now, entry.host, commit, error=summary(entry.reasons[0]))
            )
    for o in outcomes:
        if not o.ok:
            failures, delay = backoff[o.host]
            failed: dict[str, Scalar] = {
                "failures": failures,
                "retry_in": round(delay),
                "reasons": why.get(o.host),
            }
            error = summary(o.error or "")
            events.append(
                Event(EventType.HOST_FAILED, now, o.host, commit, seconds=o.seconds, error=error, data=failed)
            )
            continue
        assert o.published_at is not None
        if o.build_seconds is not None:
            built: dict[str, Scalar] = {"builder": o.builder}
            events.append(
                Event(EventType.HOST_BUILT, now, o.host, commit, o.version, o.build_seconds, data=built)
            )
        prev = before.get(o.host)
        published: dict[str, Scalar] = {
            "latency": max(0.0, o.published_at - commit_time),
            "artifacts": ",".join(o.artifacts),
            "recovered": prev is not None and prev.status in (Status.FAILED, Status.INVALID),
            "reasons": why.get(o.host),
        }
        kind = EventType.HOST_ADOPTED if o.adopted else EventType.HOST_PUBLISHED
        events.append(Event(kind, o.published_at, o.host, commit, o.version, o.seconds, data=published))
    return events
