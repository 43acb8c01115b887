"""Deciding which hosts to rebuild, and saying why. Pure.

A host rebuilds exactly when its image derivation differs from the one its
published release was built from. The git diff only explains the decision.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from reconciler.hosts import Fleet
from reconciler.state import HostState

REBUILD = "rebuild"
UNCHANGED = "unchanged"
INVALID = "invalid"
REMOVED = "removed"


@dataclass(frozen=True)
class HostPlan:
    host: str
    action: str
    reasons: tuple[str, ...]
    image: str | None = None

    def to_json(self) -> dict[str, object]:
        return {"host": self.host, "action": self.action, "reasons": list(self.reasons), "image": self.image}


@dataclass(frozen=True)
class Plan:
    commit: str
    entries: tuple[HostPlan, ...]

    def with_action(self, action: str) -> tuple[HostPlan, ...]:
        return tuple(e for e in self.entries if e.action == action)

    def to_json(self) -> dict[str, object]:
        return {"commit": self.commit, "hosts": [e.to_json() for e in self.entries]}


def make_plan(
    commit: str,
    fleet: Fleet,
    images: Mapping[str, str],
    eval_errors: Mapping[str, str],
    published: Mapping[str, HostState],
    changed: frozenset[str] | None,
) -> Plan:
    """``changed`` is the set of repo paths changed since the last reconciled commit,
    or None when that is unknown (first run, rewritten history)."""
    entries: list[HostPlan] = []
    for err in fleet.errors:
        name = err.path.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        entries.append(HostPlan(name, INVALID, (str(err),)))
    for name, host in sorted(fleet.hosts.items()):
        if name in eval_errors:
            entries.append(HostPlan(name, INVALID, (f"nix evaluation failed: {eval_errors[name]}",)))
            continue
        image = images[name]
        prev = published.get(name)
        touched = sorted(set(host.inputs()) & changed) if changed is not None else []
        if prev is None or prev.version == 0 or prev.image is None:
            entries.append(HostPlan(name, REBUILD, ("new host, never published",), image))
        elif prev.image != image:
            if touched:
                why = tuple(f"{p} changed" for p in touched)
            elif changed is None:
                why = ("build inputs changed (no common history with the last reconciled commit)",)
            else:
                why = ("build recipe changed (nix/ library or toolchain)",)
            entries.append(HostPlan(name, REBUILD, why, image))
        else:
            why = tuple(f"{p} changed but not its build" for p in touched) or ("inputs unchanged",)
            entries.append(HostPlan(name, UNCHANGED, why, image))
    present = set(fleet.hosts) | set(fleet.invalid)
    for name, prev in sorted(published.items()):
        if name not in present and prev.status != REMOVED:
            entries.append(HostPlan(name, REMOVED, (f"hosts/{name}.yaml no longer exists",)))
    entries.sort(key=lambda e: e.host)
    return Plan(commit=commit, entries=tuple(entries))
