"""How the evaluation of many hosts is split over workers and narrowed when it fails.

Every host's image derivation is the same whichever hosts it is evaluated with
(fleet.nix instantiates each package once, from its file alone), and a host's error
is always that of its evaluation alone, so any split of the fleet gives the result
of one evaluation. What a split decides is only the cost: N shards keep N workers
busy; a shard that fails as a whole is cut until each failing host stands alone,
and the others of its shard still get their derivations. Pure: the adapter runs
the batches and reports what each gave.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from enum import Enum

from reconciler.core.model import Evaluation

Batch = tuple[str, ...]


class Failure(Enum):
    """Why the evaluation of a batch failed as a whole."""

    ERROR = "error"  # Nix reported an error: quick to find again in a part
    MEMORY = "memory"  # over nix.eval_memory: a part may fit
    TIMEOUT = "timeout"  # over nix.eval_timeout: each part holding the culprit costs it again


def shards(names: Iterable[str], workers: int) -> list[Batch]:
    """The hosts in at most ``workers`` batches of near-equal size, as runs of the
    sorted names: hosts named alike tend to share packages, which each batch then
    evaluates once instead of every batch evaluating every package."""
    ordered = sorted(set(names))
    count = max(1, min(workers, len(ordered)))
    size, extra = divmod(len(ordered), count)
    out: list[Batch] = []
    start = 0
    for i in range(count):
        end = start + size + (1 if i < extra else 0)
        if end > start:
            out.append(tuple(ordered[start:end]))
        start = end
    return out


def narrow(batch: Batch, failure: Failure, workers: int) -> list[Batch]:
    """What to evaluate instead of ``batch`` (more than one host), which failed as a whole.

    After a deadline, each host alone: cutting in parts would cost the deadline again
    at every level, one host at a time costs it once. Otherwise parts, as many as
    there are workers (at least halves), so one failing host costs about
    log(batch) evaluations instead of one per host of the batch.
    """
    if failure is Failure.TIMEOUT:
        return [(name,) for name in batch]
    return shards(batch, max(2, workers))


class EvalWork:
    """The bookkeeping of one evaluation of ``names`` by ``workers`` processes: the
    batches to run first, and what the finished ones gave."""

    def __init__(self, names: Iterable[str], workers: int) -> None:
        self.workers = max(1, workers)
        self.initial = shards(names, self.workers)
        self.images: dict[str, str] = {}
        self.errors: dict[str, str] = {}
        self.evaluations = 0

    def succeeded(self, batch: Batch, images: Mapping[str, str]) -> None:
        self.evaluations += 1
        self.images.update((name, images[name]) for name in batch)

    def failed(self, batch: Batch, failure: Failure, reason: str) -> list[Batch]:
        """Record that ``batch`` failed; returns the batches to evaluate in its place."""
        self.evaluations += 1
        if len(batch) == 1:
            self.errors[batch[0]] = reason
            return []
        return narrow(batch, failure, self.workers)

    def result(self) -> Evaluation:
        return Evaluation(images=dict(sorted(self.images.items())), errors=dict(sorted(self.errors.items())))
