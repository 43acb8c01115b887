"""The version decision (reconciler.core.versions), pure."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from reconciler.core.release import Release, new_release
from reconciler.core.versions import Adopt, Publish, Taken, decide, first_candidate

DRV = "/nix/store/" + "a" * 32 + "-host-web-1-3.drv"


def release(version: int, derivation: str) -> Release:
    return new_release(
        "web-1",
        version,
        "c" * 40,
        derivation,
        (),
        now=datetime(2026, 1, 1, tzinfo=UTC),
        lifetime=timedelta(days=1),
    )


def test_a_free_version_is_published_the_same_build_adopted_another_taken() -> None:
    assert decide(3, None, DRV) == Publish(3)
    mine = release(3, DRV)
    assert decide(3, mine, DRV) == Adopt(mine)
    assert decide(3, release(3, DRV.replace("a", "b")), DRV) == Taken(3)


@given(st.integers(0, 10**6), st.none() | st.integers(1, 10**6))
def test_the_first_candidate_follows_the_ledger_unless_the_store_is_ahead(
    recorded: int, in_store: int | None
) -> None:
    first = first_candidate(recorded, in_store)
    assert first >= 1
    if in_store is not None and in_store > recorded:
        assert first == in_store
    else:
        assert first == recorded + 1
