"""The commit gate: whether the head of the config repository may be built.

The repository is untrusted input, and so is where its branch points. A head is built
only if

1. with ``repo.verify_commits``, it carries a good signature by a trusted fingerprint;
   a signature that is anything but OpenPGP signature packets is refused before gpg
   reads it (reconciler.openpgp), and
2. it is the last reconciled commit or a descendant of it, unless
   ``repo.allow_force_push``: a branch moved back to an older commit, even a validly
   signed one, would otherwise republish old configuration as new versions.

Verdicts depend only on commit ids (and the fixed configuration), so they are
remembered for the life of the process: an unchanged refused head costs no git or
gpg run on the next pass.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, TypeVar

from reconciler.config import RepoConfig
from reconciler.core import openpgp
from reconciler.errors import SourceError, VerificationError
from reconciler.ports import Source

if TYPE_CHECKING:
    from reconciler.adapters.gpg import Verifier

# Verdicts remembered per gate; a head moves a few times a day, an attacker's pushes
# must not grow the daemon without bound.
VERDICT_CACHE = 256

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Refusal(StrEnum):
    """Why a head is not built: the ``reason`` label of reconciler_untrusted_commits_total."""

    UNSIGNED = "unsigned"
    UNKNOWN_KEY = "unknown-key"
    UNTRUSTED_KEY = "untrusted-key"
    BAD_SIGNATURE = "bad-signature"
    MALFORMED_SIGNATURE = "malformed-signature"
    NOT_DESCENDANT = "not-descendant"


class CommitRefusedError(SourceError):
    """The head commit may not be built."""

    def __init__(self, commit: str, reason: Refusal, why: str) -> None:
        self.commit = commit
        self.reason = reason
        self.why = why
        super().__init__(f"commit {commit} is not built: {why}")


@dataclass(frozen=True)
class _Verdict:
    refusal: Refusal | None
    why: str


class Gate:
    def __init__(self, repo: RepoConfig) -> None:
        self._trusted = repo.trusted_fingerprints
        self._allow_force_push = repo.allow_force_push
        self._keys: Verifier | None = None
        if repo.trusted_fingerprints:
            # python-gnupg only for a gate that checks signatures.
            from reconciler.adapters.gpg import Verifier, read_keys

            self._keys = Verifier(read_keys(list(repo.trusted_keys)))
        self._signatures: dict[str, _Verdict] = {}
        self._ancestry: dict[tuple[str, str], bool | None] = {}

    def close(self) -> None:
        if self._keys is not None:
            self._keys.close()

    def check(self, source: Source, commit: str, last: str | None) -> None:
        """Raise CommitRefusedError unless ``commit`` may be built, ``last`` being the last
        reconciled commit (None before the first pass)."""
        if self._keys is not None:
            keys = self._keys
            verdict = _remember(self._signatures, commit, lambda: self._signature(source, keys, commit))
            if verdict.refusal is not None:
                raise CommitRefusedError(commit, verdict.refusal, verdict.why)
        if self._allow_force_push or last is None or last == commit:
            return
        descends = _remember(self._ancestry, (last, commit), lambda: source.is_ancestor(last, commit))
        if descends is None:
            raise CommitRefusedError(
                commit,
                Refusal.NOT_DESCENDANT,
                f"cannot tell whether it descends from {last}, the last reconciled commit: "
                "the shallow clone's history, deepened as far as the reconciler goes, does not reach it",
            )
        if not descends:
            raise CommitRefusedError(
                commit,
                Refusal.NOT_DESCENDANT,
                f"it does not descend from {last}, the last reconciled commit "
                "(history rewritten; repo.allow_force_push: true builds it)",
            )

    def _signature(self, source: Source, keys: Verifier, commit: str) -> _Verdict:
        try:
            signature = source.signature(commit)
            if signature is None:
                return _Verdict(Refusal.UNSIGNED, "not signed")
            openpgp.detached_signature(signature, "gpgsig header")
        except VerificationError as exc:
            return _Verdict(Refusal.MALFORMED_SIGNATURE, str(exc))
        status = source.verify_commit(commit, keys.home)
        lines = [ln.split() for ln in status.splitlines()]
        fields = {ln[1]: ln[2:] for ln in lines if len(ln) > 1 and ln[0] == "[GNUPG:]"}
        if "VALIDSIG" in fields and "GOODSIG" in fields:
            # The signing key's fingerprint, then its primary key's.
            valid = fields["VALIDSIG"]
            if {valid[0], valid[-1]} & self._trusted:
                return _Verdict(None, "good signature")
            return _Verdict(Refusal.UNTRUSTED_KEY, f"signed by {valid[0]}, which is not a trusted key")
        if "ERRSIG" in fields or "NO_PUBKEY" in fields:
            return _Verdict(Refusal.UNKNOWN_KEY, "signed by an unknown key")
        if "EXPKEYSIG" in fields or "REVKEYSIG" in fields:
            return _Verdict(Refusal.BAD_SIGNATURE, "signed by an expired or revoked key")
        return _Verdict(Refusal.BAD_SIGNATURE, "bad signature")


def _remember(cache: dict[K, V], key: K, compute: Callable[[], V]) -> V:
    if key in cache:
        return cache[key]
    value = compute()
    if len(cache) >= VERDICT_CACHE:
        del cache[next(iter(cache))]  # the oldest
    cache[key] = value
    return value
