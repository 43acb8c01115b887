"""The project's exception hierarchy.

Every error a user can cause carries enough context (file, key, host, reason) for
the CLI to print one line that says what to fix.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum


class ReconcilerError(Exception):
    """Base of every error the reconciler raises on purpose."""


# The most of a ConfigError's key and reason kept (characters).
MAX_KEY = 200
MAX_REASON = 1000


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def internal_error(exc: BaseException) -> str:
    """A bug's exception as a log field: its type and message, cut to MAX_REASON. Not
    repr(): a UnicodeDecodeError's repr holds the whole input it failed on (a build's
    log, a file of the config repository), which has no place in a log line."""
    return _cut(f"{type(exc).__name__}: {exc}", MAX_REASON)


class ConfigError(ReconcilerError):
    """A configuration or definition file is invalid.

    ``path`` is the file, ``key`` the dotted key inside it (empty for the whole file).
    """

    def __init__(self, path: str, key: str, reason: str) -> None:
        self.path = path
        # Both may quote what the file said: a value of a megabyte would be quoted whole
        # into every pass's log, the status and the ledger.
        self.key = _cut(key, MAX_KEY)
        self.reason = _cut(reason, MAX_REASON)
        where = f"{path}: {self.key}" if self.key else path
        super().__init__(f"{where}: {self.reason}")

    def __reduce__(self) -> tuple[type[ConfigError], tuple[str, str, str]]:
        # Parse results cross process boundaries (reconciler.daemon.parsing).
        return (type(self), (self.path, self.key, self.reason))


class SourceError(ReconcilerError):
    """The config repository could not be fetched or read."""


class BuildError(ReconcilerError):
    """Nix evaluation or a host build failed.

    ``builder`` is the builder a failed build ran on, if it got that far; ``refused``
    the builders that could not be used for it, and why.
    """

    def __init__(
        self, host: str, reason: str, builder: str | None = None, refused: Mapping[str, str] | None = None
    ) -> None:
        self.host = host
        self.reason = reason
        self.builder = builder
        self.refused: Mapping[str, str] = refused or {}
        super().__init__(f"build of host {host!r} failed: {reason}" if host else reason)


class NotReproducibleError(BuildError):
    """The reproducibility gate refused a host: a derivation built a second time gave
    other bytes (reconciler.core.reproducibility)."""


class SigningError(ReconcilerError):
    """gpg could not sign or the signing key is unusable."""


class VerificationError(ReconcilerError):
    """A signature, checksum or release check failed."""


class TufError(ReconcilerError):
    """The TUF metadata could not be loaded, verified or signed."""


class StateError(ReconcilerError):
    """The state directory, or the ledger in it, cannot be created or read."""


def ledger_error(where: str, message: str) -> StateError:
    """What sqlite said (``message``) of the ledger at ``where``, with what an operator
    can do about it: a full disk is not a damaged ledger, and moving a whole ledger
    away costs more."""
    if "full" in message:
        advice = "the disk is full: free space; the next pass records what this one could not"
    elif "malformed" in message or "not a database" in message:
        advice = "a damaged ledger: move it away to start afresh"
    else:
        advice = "a disk error, or a full disk"
    return StateError(f"{where}: {message} ({advice})")


class StoreError(ReconcilerError):
    """The artifact store refused or failed an operation."""


class IncompleteReleaseError(StoreError):
    """A release in the store that this build cannot complete: a blob it names is
    missing or damaged, and the file built again is other bytes (an AppImage is
    sealed anew). What it names can never be written, so the release is given up
    for a new version."""


class ObjectTooLargeError(StoreError):
    """An object larger than its reader's limit (``Store.get_bytes``), refused having
    read at most one byte past it: none of the daemon's own writes is that large, so
    someone else put it there (another daemon sharing the store, whoever can write to
    the bucket)."""


class LeaseError(StoreError):
    """A write to the store refused because this process does not hold the store's
    publisher lease (reconciler.core.lease)."""


class LeaseLostError(LeaseError):
    """This process held the publisher lease and no longer does: it writes nothing more."""


class LeaseHeldError(LeaseError):
    """Another daemon holds the publisher lease and renews it (a one-shot command)."""


class LogError(StoreError):
    """The store's transparency log cannot be appended to or trusted: its checkpoint or
    tiles do not match what this publisher signed, or a proof does not check out."""


class FetchKind(StrEnum):
    """What went wrong with a read, for a caller that answers each differently."""

    HTTP_STATUS = "http_status"  # the server answered with an error status (``FetchError.status``)
    TOO_LARGE = "too_large"  # more bytes than the limit
    TRUNCATED = "truncated"  # fewer bytes than announced or expected
    DEADLINE = "deadline"  # no complete answer within the request's deadline
    UNREACHABLE = "unreachable"  # no answer at all: name, connection, TLS, local file
    INTERRUPTED = "interrupted"  # the answer broke off or was not HTTP


class FetchError(ReconcilerError):
    """A store object could not be read, or its answer broke a limit.

    ``kind`` says which; ``status`` is the HTTP status of an error answer (else None).
    """

    def __init__(
        self, message: str, *, kind: FetchKind = FetchKind.UNREACHABLE, status: int | None = None
    ) -> None:
        self.kind = kind
        self.status = status
        super().__init__(message)
