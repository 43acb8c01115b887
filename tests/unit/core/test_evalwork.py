"""Unit tests of how an evaluation is split over workers and narrowed to the hosts that
fail it (reconciler.core.evalwork), against a simulated Nix: a batch fails as a whole
when any of its hosts fails alone."""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.core.evalwork import Batch, EvalWork, Failure, narrow, shards
from reconciler.core.model import Evaluation


def drv(name: str) -> str:
    return f"/nix/store/{name}-image.drv"


def simulate(names: list[str], workers: int, bad: dict[str, Failure]) -> tuple[Evaluation, EvalWork]:
    """Run ``EvalWork`` to the end, the batches in the order a pool would take them.
    A batch holding a host of ``bad`` fails the way the first such host does."""
    work = EvalWork(names, workers)
    queue: deque[Batch] = deque(work.initial)
    while queue:
        batch = queue.popleft()
        culprits = [n for n in batch if n in bad]
        if culprits:
            queue.extend(work.failed(batch, bad[culprits[0]], f"{culprits[0]} broke"))
        else:
            work.succeeded(batch, {n: drv(n) for n in batch})
    return work.result(), work


def test_shards_are_sorted_runs_of_near_equal_size() -> None:
    names = [f"h{i:02}" for i in range(10)][::-1]
    assert shards(names, 3) == [
        ("h00", "h01", "h02", "h03"),
        ("h04", "h05", "h06"),
        ("h07", "h08", "h09"),
    ]
    assert shards(names, 1) == [tuple(sorted(names))]
    assert shards(["b", "a"], 8) == [("a",), ("b",)]
    assert shards([], 4) == []


@given(st.sets(st.text(min_size=1, max_size=4), max_size=40), st.integers(min_value=1, max_value=12))
def test_shards_cover_every_host_once_in_at_most_workers_batches(names: set[str], workers: int) -> None:
    out = shards(names, workers)
    assert sorted(n for batch in out for n in batch) == sorted(names)
    assert len(out) <= workers and all(out)
    sizes = [len(b) for b in out]
    assert not sizes or max(sizes) - min(sizes) <= 1
    # The same hosts give the same shards whatever order they came in.
    assert shards(sorted(names, reverse=True), workers) == out


def test_a_timed_out_batch_is_retried_one_host_at_a_time() -> None:
    assert narrow(("a", "b", "c"), Failure.TIMEOUT, 2) == [("a",), ("b",), ("c",)]


@pytest.mark.parametrize("failure", [Failure.ERROR, Failure.MEMORY])
def test_a_failed_batch_is_cut_in_parts_for_every_worker(failure: Failure) -> None:
    batch = tuple("abcdefgh")
    assert narrow(batch, failure, 1) == [tuple("abcd"), tuple("efgh")]
    assert narrow(batch, failure, 3) == [tuple("abc"), tuple("def"), tuple("gh")]


NAMES = [f"host-{i:02}" for i in range(20)]
BAD = {"host-03": Failure.ERROR, "host-11": Failure.MEMORY, "host-17": Failure.TIMEOUT}


@pytest.mark.parametrize("workers", [1, 2, 3, 7, 20, 64])
def test_any_number_of_workers_gives_the_result_of_one_evaluation(workers: int) -> None:
    one, _ = simulate(NAMES, 1, BAD)
    many, _ = simulate(NAMES, workers, BAD)
    assert many == one
    assert one.errors == {name: f"{name} broke" for name in BAD}
    assert one.images == {n: drv(n) for n in NAMES if n not in BAD}
    assert list(one.images) == sorted(one.images)


def test_one_failing_host_costs_about_log_n_evaluations_not_one_per_host() -> None:
    names = [f"h{i:04}" for i in range(1024)]
    result, work = simulate(names, 1, {"h0500": Failure.MEMORY})
    assert result.errors == {"h0500": "h0500 broke"}
    assert len(result.images) == 1023
    # The whole fleet, then two halves at each of 10 levels.
    assert work.evaluations == 1 + 2 * 10


@given(
    st.sets(st.sampled_from(NAMES), max_size=20),
    st.dictionaries(st.sampled_from(NAMES), st.sampled_from(list(Failure)), max_size=6),
    st.integers(min_value=1, max_value=8),
)
def test_every_host_ends_with_an_image_or_its_own_error(
    names: set[str], bad: dict[str, Failure], workers: int
) -> None:
    result, _ = simulate(sorted(names), workers, bad)
    assert set(result.images) | set(result.errors) == names
    assert not set(result.images) & set(result.errors)
    assert result.errors == {n: f"{n} broke" for n in names if n in bad}
