"""What the agent keeps across restarts: ``state.json`` in its state directory.

A timer running ``--once`` is a new process every poll, so everything a later poll
must know (what runs, what failed here, the download backoff, the validators of the
last tuf/timestamp.json, the switch under way) is here, written by rename and synced:
a host that loses power keeps the old state or the new, whole.
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
# A switch the agent did not live to finish (killed, or the host went down, while the
# release started or was checked) is tried again, up to this many times in all; then
# its artifact counts as failed, as if it had failed its check: a release that takes
# the host down with it must not be started at every boot.
MAX_SWITCH_TRIES = 2


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
    # The switch under way, written before ``current`` moves and cleared once it is
    # decided: the release's version, its artifact's sha256, its TUF entry's sha256,
    # and how many switches to that artifact were begun.
    switching_version: int = 0
    switching: str = ""
    switching_entry: str = ""
    switching_tries: int = 0

    def begin_switch(self, version: int, artifact: str, entry: str) -> None:
        """Note a switch to ``version`` (its artifact's and TUF entry's sha256)."""
        tries = self.switching_tries if artifact == self.switching else 0
        self.switching_version, self.switching, self.switching_entry = version, artifact, entry
        self.switching_tries = tries + 1

    def end_switch(self) -> None:
        self.switching_version, self.switching, self.switching_entry, self.switching_tries = 0, "", "", 0

    def refuse(self, artifact: str, entry: str) -> None:
        """``artifact`` failed here: it is not started again, and the TUF entry that
        named it is not looked at again."""
        self.failed.append(artifact)
        self.settled = entry

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
            switching_version=int(doc.get("switching_version", 0)),
            switching=str(doc.get("switching", "")),
            switching_entry=str(doc.get("switching_entry", "")),
            switching_tries=int(doc.get("switching_tries", 0)),
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
            "switching_version": self.switching_version,
            "switching": self.switching,
            "switching_entry": self.switching_entry,
            "switching_tries": self.switching_tries,
        }
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w") as f:
            f.write(json.dumps(doc, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        # The rename itself, made durable.
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
