"""What the agent keeps across restarts: ``state.json`` in its state directory.

A timer running ``--once`` is a new process every poll, so everything a later poll
must know (what runs, what failed here, the download backoff, the validators of the
last tuf/timestamp.json) is here, written by rename.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from reconciler.adapters import fetch
from reconciler.errors import ReconcilerError

# A release whose download keeps failing is tried at polls 1, 2, 4, 8 ... apart, at
# most this many apart: a tampered or unreachable blob is not fetched every poll.
MAX_POLLS_BETWEEN_TRIES = 64
# state.json keeps the newest failed artifacts, this many: one older than these is
# tried again if a store offers it again in a release newer than the running one.
FAILED_KEPT = 20


@dataclass
class AgentState:
    version: int = 0
    previous: int = 0
    # The sha256 of artifacts that failed their activation or health check here.
    failed: list[str] = field(default_factory=list)
    stale: bool = False  # the store's metadata had expired at the last poll
    # The sha256 of the last TUF entry refused or rolled back: not looked at again.
    settled: str = ""
    validators: fetch.Validators = field(default_factory=fetch.Validators)
    # The version whose download failed ``retry_failures`` times in a row, and how
    # many polls to let pass before the next try.
    retry_version: int = 0
    retry_failures: int = 0
    retry_skip: int = 0

    def download_failed(self, version: int) -> None:
        """Count a failed download of ``version`` and space the next try out."""
        if version != self.retry_version:
            self.retry_version, self.retry_failures = version, 0
        self.retry_failures += 1
        self.retry_skip = min(2 ** (self.retry_failures - 1), MAX_POLLS_BETWEEN_TRIES) - 1

    def defer(self, version: int) -> bool:
        """Whether this poll lets ``version`` be (one poll of its backoff used up)."""
        if version != self.retry_version or self.retry_skip <= 0:
            return False
        self.retry_skip -= 1
        return True

    @classmethod
    def load(cls, path: Path) -> AgentState:
        try:
            doc = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError) as exc:
            raise ReconcilerError(f"{path}: unreadable agent state ({exc})") from None
        return cls(
            version=int(doc.get("version", 0)),
            previous=int(doc.get("previous", 0)),
            # Before TUF, failures were kept by version number: those are dropped.
            failed=[v for v in doc.get("failed", []) if isinstance(v, str)],
            stale=bool(doc.get("stale", False)),
            settled=str(doc.get("settled", "")),
            validators=fetch.Validators(**doc.get("validators", {})),
            retry_version=int(doc.get("retry_version", 0)),
            retry_failures=int(doc.get("retry_failures", 0)),
            retry_skip=int(doc.get("retry_skip", 0)),
        )

    def save(self, path: Path) -> None:
        doc = {
            "version": self.version,
            "previous": self.previous,
            "failed": self.failed[-FAILED_KEPT:],
            "stale": self.stale,
            "settled": self.settled,
            "validators": self.validators.to_json(),
            "retry_version": self.retry_version,
            "retry_failures": self.retry_failures,
            "retry_skip": self.retry_skip,
        }
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(doc, indent=2) + "\n")
        os.replace(tmp, path)
