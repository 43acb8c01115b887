"""Deciding which hosts to rebuild, and saying why. Pure.

A host rebuilds exactly when its image derivation differs from the one its
published release was built from. The git diff only explains the decision.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from reconciler.core.hosts import Fleet
from reconciler.core.model import Action, HostState, Status, Suspensions


@dataclass(frozen=True)
class HostPlan:
    host: str
    action: Action
    reasons: tuple[str, ...]
    image: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"host": self.host, "action": self.action, "reasons": list(self.reasons), "image": self.image}


@dataclass(frozen=True)
class Plan:
    commit: str
    entries: tuple[HostPlan, ...]

    def with_action(self, action: Action) -> tuple[HostPlan, ...]:
        return tuple(e for e in self.entries if e.action == action)

    def to_json(self) -> dict[str, object]:
        return {
            "commit": self.commit,
            "summary": self.counts(),
            "hosts": [e.to_json() for e in self.entries],
        }

    def suspend(self, hosts: Iterable[str], suspended: Suspensions) -> Plan:
        """This plan with ``hosts`` suspended (as ``suspended`` says): a pass that finds
        them suspended when their turn comes leaves them."""
        names = frozenset(hosts)
        return Plan(
            self.commit,
            tuple(_suspended(e, suspended) if e.host in names else e for e in self.entries),
        )

    def counts(self) -> dict[str, int]:
        """Hosts per action, every action named."""
        return {a.value: len(self.with_action(a)) for a in Action}

    def summary(self) -> str:
        c = self.counts()
        return (
            f"plan: {c[Action.REBUILD]} to rebuild, {c[Action.REMOVED]} to remove, "
            f"{c[Action.INVALID]} invalid, {c[Action.BACKOFF]} in backoff, {c[Action.SUSPENDED]} suspended, "
            f"{c[Action.UNCHANGED]} unchanged"
        )

    def exit_code(self, detailed: bool = False) -> int:
        """What `reconciler plan` exits with: 1 when a host is invalid (a pull request
        that breaks a host file fails its check); with ``detailed``, as `terraform plan
        -detailed-exitcode`: 2 when a pass would change the store, else 0."""
        if self.with_action(Action.INVALID):
            return 1
        if detailed and (self.with_action(Action.REBUILD) or self.with_action(Action.REMOVED)):
            return 2
        return 0


NONE_SUSPENDED = Suspensions()


def make_plan(
    commit: str,
    fleet: Fleet,
    images: Mapping[str, str],
    eval_errors: Mapping[str, str],
    published: Mapping[str, HostState],
    changed: frozenset[str] | None,
    now: float | None = None,
    max_wait: float = math.inf,
    suspended: Suspensions = NONE_SUSPENDED,
) -> Plan:
    """``changed`` is the set of repo paths changed since the last reconciled commit,
    or None when that is unknown (first run, rewritten history). With ``now`` (unix
    time), a build that failed is not retried before its recorded retry time, unless
    that is more than ``max_wait`` (retry.max) away: no backoff is that long, so the
    clock went back since it was recorded (or retry.max was lowered), and waiting
    for it could take as long as the clock jumped.

    A host that ``suspended`` covers is left as it is (Action.SUSPENDED, saying what
    the pass would otherwise do), removed from the repository or not; an invalid
    definition is still reported as invalid, which changes nothing in the store."""
    entries: list[HostPlan] = []
    for err in fleet.errors:
        name = err.path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        entries.append(HostPlan(name, Action.INVALID, (str(err),)))
    for name, host in sorted(fleet.hosts.items()):
        if name in eval_errors:
            entries.append(HostPlan(name, Action.INVALID, (f"nix evaluation failed: {eval_errors[name]}",)))
            continue
        image = images[name]
        prev = published.get(name)
        # Nothing changed (a pass at the same head): no host's inputs are looked at.
        touched = sorted(changed.intersection(host.inputs())) if changed else []
        if prev is not None and prev.version > 0 and prev.image == image:
            why = tuple(f"{p} changed but not its build" for p in touched) or ("inputs unchanged",)
            entries.append(HostPlan(name, Action.UNCHANGED, why, image))
            continue
        if prev is None or prev.version == 0 or prev.image is None:
            why = ("new host, never published",)
        elif touched:
            why = tuple(f"{p} changed" for p in touched)
        elif changed is None:
            why = ("build inputs changed (no common history with the last reconciled commit)",)
        elif prev.failed_image == image:
            # At the head a build failed at (a store that was down): no input changed,
            # and the same image is built again.
            why = ("nothing changed since the build of this image failed",)
        else:
            why = ("build recipe changed (nix/ library or toolchain)",)
        if (
            now is not None
            and prev is not None
            and prev.failed_image == image
            and prev.retry_at is not None
            and now < prev.retry_at <= now + max_wait
        ):
            wait = math.ceil(prev.retry_at - now)
            why = (f"build failed {prev.failures} time(s) in a row; next retry in {wait}s", *why)
            entries.append(HostPlan(name, Action.BACKOFF, why, image))
            continue
        entries.append(HostPlan(name, Action.REBUILD, why, image))
    present = set(fleet.hosts) | set(fleet.invalid)
    for name, prev in sorted(published.items()):
        if name not in present and prev.status != Status.REMOVED:
            entries.append(HostPlan(name, Action.REMOVED, (f"hosts/{name}.yaml no longer exists",)))
    entries.sort(key=lambda e: e.host)
    return Plan(commit=commit, entries=tuple(_suspended(e, suspended) for e in entries))


def _suspended(entry: HostPlan, suspended: Suspensions) -> HostPlan:
    if entry.action in (Action.INVALID, Action.SUSPENDED) or not suspended.covers(entry.host):
        return entry
    if suspended.fleet is not None:
        why = "the fleet is suspended (reconciler resume)"
    else:
        why = f"the host is suspended (reconciler resume {entry.host})"
    otherwise = f"otherwise {entry.action}: {'; '.join(entry.reasons)}"
    return HostPlan(entry.host, Action.SUSPENDED, (why, otherwise), entry.image)


def suspended_fleet(commit: str, published: Mapping[str, HostState]) -> Plan:
    """The plan of a pass that finds the whole fleet suspended: it fetches nothing, so
    it knows only the hosts recorded, and leaves each as it is."""
    why = ("the fleet is suspended (reconciler resume)",)
    return Plan(
        commit,
        tuple(
            HostPlan(name, Action.SUSPENDED, why, hs.image)
            for name, hs in sorted(published.items())
            if hs.status != Status.REMOVED
        ),
    )


def retry_delay(failures: int, initial: float, maximum: float) -> float:
    """Seconds to wait after the ``failures``-th consecutive failure: doubling, capped."""
    return float(min(initial * 2 ** min(failures - 1, 62), maximum))
