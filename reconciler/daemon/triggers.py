"""What wakes the daemon before its poll interval: webhooks and filesystem events.

Bursts (a push of many refs, a webhook retried, a checkout touching many files)
are debounced into one reconcile: the loop wakes once the triggers have been
quiet for ``quiet`` seconds, or ``max_delay`` after the first of them.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from reconciler import log


class Reason(StrEnum):
    """Why the loop woke (Wakeup.notify), the label of reconciler_wakeups_total."""

    POLL = "poll"  # the poll interval passed
    WEBHOOK = "webhook"
    FILESYSTEM = "filesystem"
    MANUAL = "manual"  # POST /reconcile (`reconciler reconcile-now`): a pass at once, backoff ignored
    RELOAD = "reload"  # SIGHUP: read the config again; no pass of its own
    STOP = "stop"


class Wakeup:
    """A debounced wake-up: ``notify`` from any thread, ``wait`` in the loop."""

    def __init__(self, quiet: float = 0.2, max_delay: float = 2.0) -> None:
        self.quiet = quiet
        self.max_delay = max_delay
        self._cond = threading.Condition()
        self._reasons: list[str] = []
        self._first = 0.0
        self._last = 0.0

    def notify(self, reason: str) -> None:
        with self._cond:
            now = time.monotonic()
            if not self._reasons:
                self._first = now
            self._last = now
            self._reasons.append(reason)
            self._cond.notify_all()

    def wait(self, timeout: float) -> list[str]:
        """Wait up to ``timeout`` for triggers; return their reasons once they settle
        (empty on timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._reasons:
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                self._cond.wait(left)
            while True:
                now = time.monotonic()
                settle = min(self._last + self.quiet, self._first + self.max_delay)
                if now >= settle:
                    break
                self._cond.wait(settle - now)
            reasons, self._reasons = self._reasons, []
            return reasons


# -- webhooks ----------------------------------------------------------------------


@dataclass(frozen=True)
class Push:
    forge: str  # github | gitea | gitlab
    ref: str | None  # refs/heads/<branch>, None for events without one (GitHub's ping)
    event: str


class Unauthorized(Exception):  # noqa: N818 -- a verdict, not a failure of ours
    """The request's signature or token is missing or wrong."""


def authenticate(headers: Mapping[str, str], body: bytes, secret: bytes) -> Push:
    """Identify the forge from its headers and check the request against ``secret``
    (HMAC-SHA256 of the body for GitHub and Gitea, a shared token for GitLab)."""
    h = {k.lower(): v for k, v in headers.items()}
    if "x-gitlab-event" in h:
        token = h.get("x-gitlab-token", "")
        if not hmac.compare_digest(_octets(token), secret):
            raise Unauthorized("gitlab: wrong or missing X-Gitlab-Token")
        return Push("gitlab", _ref(body), h["x-gitlab-event"])
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    if "x-gitea-event" in h:
        # Gitea also sends X-Hub-Signature-256; its own header is the hex digest.
        given = h.get("x-gitea-signature", "")
        if not hmac.compare_digest(_octets(given), expected.encode()):
            raise Unauthorized("gitea: wrong or missing X-Gitea-Signature")
        return Push("gitea", _ref(body), h["x-gitea-event"])
    if "x-github-event" in h:
        given = h.get("x-hub-signature-256", "")
        if not hmac.compare_digest(_octets(given), b"sha256=" + expected.encode()):
            raise Unauthorized("github: wrong or missing X-Hub-Signature-256")
        return Push("github", _ref(body), h["x-github-event"])
    raise Unauthorized("not a GitHub, Gitea or GitLab webhook (no event header)")


def check_bearer(headers: Mapping[str, str], token: bytes) -> None:
    """Whether the request carries ``Authorization: Bearer <token>`` (POST /reconcile);
    compared in constant time, so the answer's timing tells nothing of the token."""
    h = {k.lower(): v for k, v in headers.items()}
    given = h.get("authorization")
    if given is None:
        raise Unauthorized("no Authorization header (send Authorization: Bearer TOKEN)")
    scheme, _, credential = given.strip().partition(" ")
    if scheme.lower() != "bearer":
        raise Unauthorized("the Authorization header is not a Bearer token")
    if not hmac.compare_digest(_octets(credential.strip()), token):
        raise Unauthorized("wrong token")


def _octets(header: str) -> bytes:
    """A header value as bytes to compare: compare_digest raises on a str with
    non-ASCII characters, and a client's wrong credential must be only wrong."""
    return header.encode("utf-8", "surrogatepass")


def _ref(body: bytes) -> str | None:
    try:
        ref = json.loads(body).get("ref")
    except (ValueError, AttributeError):
        return None
    return ref if isinstance(ref, str) else None


def concerns(push: Push, branch: str) -> bool:
    """Whether ``push`` may have moved ``branch`` (pings and other refs do not)."""
    return push.ref == f"refs/heads/{branch}"


# -- a repository on local disk ---------------------------------------------------------


class RepoWatcher:
    """Watch a local repository's refs with watchdog and notify ``wakeup`` on change."""

    def __init__(self, repo: Path, wakeup: Wakeup) -> None:
        git_dir = repo / ".git" if (repo / ".git").is_dir() else repo
        self._observer = Observer()
        handler = _RefHandler(wakeup)
        # A commit or push moves a ref (refs/heads/..., packed-refs) and the reflog.
        self._observer.schedule(handler, str(git_dir), recursive=True)
        self.path = git_dir

    def start(self) -> None:
        """Start watching; if the repository cannot be watched (yet), polling remains."""
        try:
            self._observer.start()
        except OSError as exc:
            log.event("watch_failed", logging.WARNING, path=str(self.path), error=exc.strerror or str(exc))
            return
        log.event("watching", path=str(self.path))

    def stop(self) -> None:
        if self._observer.is_alive():
            self._observer.stop()
            self._observer.join(10)


WRITES = frozenset({"created", "modified", "moved", "deleted", "closed"})


class _RefHandler(FileSystemEventHandler):
    def __init__(self, wakeup: Wakeup) -> None:
        self.wakeup = wakeup

    def on_any_event(self, event: FileSystemEvent) -> None:
        # Only writes: opening and reading refs (as the daemon's own fetch does) must
        # not wake it, or every pass would start the next.
        if event.event_type not in WRITES:
            return
        for path in (str(event.src_path), str(getattr(event, "dest_path", "") or "")):
            if "/refs/heads/" in path or path.endswith(("packed-refs", "/HEAD")):
                self.wakeup.notify("filesystem")
                return
