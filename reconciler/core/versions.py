"""Which version a host's next release is: a pure decision on what the ledger and
the store say, made before anything is built.

Release N of a host is immutable and names the derivation it was built from, and
only that derivation depends on N (the ACI manifest's label, the file names). So a
candidate N is decided by instantiating the host as N, which is cheap, and looking
at what the store holds as N:

- nothing: publish N;
- this very derivation: a pass died after publishing it and before recording it;
  adopt it rather than publish the same build again;
- another derivation: N is taken (a lost ledger, another publisher); try N + 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from reconciler.core.release import Release

# How many taken version numbers to skip over before giving up on a host: more
# means the ledger and the store disagree about much more than one crash.
MAX_TAKEN = 5


@dataclass(frozen=True)
class Publish:
    version: int


@dataclass(frozen=True)
class Adopt:
    release: Release


@dataclass(frozen=True)
class Taken:
    version: int


Decision = Publish | Adopt | Taken


def first_candidate(recorded: int, in_store: int | None) -> int:
    """One past what the ledger recorded; the store's newest when the store is ahead
    (a pass died after writing latest.json, or the ledger was lost), so that a
    release already published for this build is found and adopted."""
    if in_store is not None and in_store > recorded:
        return in_store
    return recorded + 1


def decide(version: int, existing: Release | None, derivation: str) -> Decision:
    """What to do with candidate ``version``, whose release in the store is
    ``existing`` (None if there is none), for a build of ``derivation``."""
    if existing is None:
        return Publish(version)
    if existing.derivation == derivation:
        return Adopt(existing)
    return Taken(version)
