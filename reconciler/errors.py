"""The project's exception hierarchy.

Every error a user can cause carries enough context (file, key, host, reason) for
the CLI to print one line that says what to fix.
"""

from __future__ import annotations

from enum import StrEnum


class ReconcilerError(Exception):
    """Base of every error the reconciler raises on purpose."""


class ConfigError(ReconcilerError):
    """A configuration or definition file is invalid.

    ``path`` is the file, ``key`` the dotted key inside it (empty for the whole file).
    """

    def __init__(self, path: str, key: str, reason: str) -> None:
        self.path = path
        self.key = key
        self.reason = reason
        where = f"{path}: {key}" if key else path
        super().__init__(f"{where}: {reason}")


class SourceError(ReconcilerError):
    """The config repository could not be fetched or read."""


class BuildError(ReconcilerError):
    """Nix evaluation or a host build failed."""

    def __init__(self, host: str, reason: str) -> None:
        self.host = host
        self.reason = reason
        super().__init__(f"build of host {host!r} failed: {reason}" if host else reason)


class SigningError(ReconcilerError):
    """gpg could not sign or the signing key is unusable."""


class VerificationError(ReconcilerError):
    """A signature, checksum or release check failed."""


class StoreError(ReconcilerError):
    """The artifact store refused or failed an operation."""


class FetchKind(StrEnum):
    """How a read of a store object failed."""

    HTTP_STATUS = "http-status"  # the server answered with an error status
    TOO_LARGE = "too-large"  # more bytes than the limit
    TRUNCATED = "truncated"  # fewer bytes than announced or expected
    DEADLINE = "deadline"  # the whole read took longer than allowed
    UNREACHABLE = "unreachable"  # no answer: connection, DNS, file system
    INTERRUPTED = "interrupted"  # the answer broke off midway


class FetchError(ReconcilerError):
    """A store object could not be read, or its answer broke a limit; ``kind`` says
    how, ``status`` is the HTTP status when the server answered with one."""

    def __init__(
        self, message: str, *, kind: FetchKind = FetchKind.UNREACHABLE, status: int | None = None
    ) -> None:
        self.kind = kind
        self.status = status
        super().__init__(message)
