"""Unit tests of the agent's persisted state: the download backoff, the failed artifacts,
and their survival."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from reconciler.agent.state import FAILED_KEPT, MAX_POLLS_BETWEEN_TRIES, AgentState


def tries(state: AgentState, version: int, polls: int) -> list[int]:
    """The polls (0-based) at which ``version`` is downloaded when every try fails."""
    out = []
    for poll in range(polls):
        if not state.defer(version):
            out.append(poll)
            state.download_failed(version)
    return out


def test_failed_downloads_are_tried_at_doubling_distances_up_to_a_cap() -> None:
    state = AgentState()
    assert tries(state, 2, 40) == [0, 1, 3, 7, 15, 31]
    state = AgentState()
    at = tries(state, 2, 1000)
    assert max(b - a for a, b in itertools.pairwise(at)) == MAX_POLLS_BETWEEN_TRIES


def test_a_new_version_is_tried_at_once_and_starts_its_own_count(tmp_path: Path) -> None:
    state = AgentState()
    tries(state, 2, 20)
    assert state.retry_skip > 0
    assert not state.defer(3)
    state.download_failed(3)
    assert (state.retry_version, state.retry_failures, state.retry_skip) == (3, 1, 0)
    # The count survives a restart (a timer running --once is a new process each poll).
    state.download_failed(3)
    state.save(tmp_path / "state.json")
    again = AgentState.load(tmp_path / "state.json")
    assert (again.retry_version, again.retry_failures, again.retry_skip) == (3, 2, 1)
    assert again.defer(3) and not again.defer(3)


def test_failed_artifacts_are_kept_by_sha256_and_old_version_numbers_dropped(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    # Before TUF, state.json kept the version numbers that failed: a number says nothing
    # about what an alias of it would run, so those entries go.
    old = {"version": 3, "previous": 2, "failed": [4, "a" * 64, 5, True, None, "b" * 64]}
    path.write_text(json.dumps(old))
    state = AgentState.load(path)
    assert (state.version, state.previous, state.failed) == (3, 2, ["a" * 64, "b" * 64])
    state.save(path)
    assert json.loads(path.read_text())["failed"] == ["a" * 64, "b" * 64]


def test_the_newest_failures_are_kept(tmp_path: Path) -> None:
    state = AgentState(failed=[f"{i:064x}" for i in range(FAILED_KEPT + 5)])
    state.save(tmp_path / "state.json")
    assert AgentState.load(tmp_path / "state.json").failed == state.failed[-FAILED_KEPT:]
