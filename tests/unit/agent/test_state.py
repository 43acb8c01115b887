"""Unit tests of the agent's persisted state: the download backoff and its survival."""

from __future__ import annotations

import itertools
from pathlib import Path

from reconciler.agent.state import MAX_POLLS_BETWEEN_TRIES, AgentState


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
