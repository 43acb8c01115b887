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
    """The request's signature or token is missing or wrong. The message is one line
    for the sender (the 401's body) naming the header; it never holds a header's value,
    the secret or a digest made with it."""


# Per forge: its event header, and the header carrying its credential.
GITLAB = ("X-Gitlab-Event", "X-Gitlab-Token")
GITEA = ("X-Gitea-Event", "X-Gitea-Signature")
GITHUB = ("X-GitHub-Event", "X-Hub-Signature-256")


def authenticate(headers: Mapping[str, str], body: bytes, secret: bytes) -> Push:
    """Identify the forge from its headers and check the request against ``secret``
    (HMAC-SHA256 of the body for GitHub and Gitea, a shared token for GitLab)."""
    h = {k.lower(): v for k, v in headers.items()}

    def credential(forge: str, header: str, what: str) -> bytes:
        given = h.get(header.lower())
        if given is None:
            raise Unauthorized(f"{forge}: missing {header} header ({what})")
        return _octets(given)

    if GITLAB[0].lower() in h:
        token = credential("gitlab", GITLAB[1], "the secret token set on the webhook")
        if not hmac.compare_digest(token, secret):
            raise Unauthorized(f"gitlab: {GITLAB[1]} is not the webhook secret")
        return Push("gitlab", _ref(body), h[GITLAB[0].lower()])
    expected = hmac.new(secret, body, hashlib.sha256).hexdigest()
    mismatch = "does not match the body: signed with another secret, or the body changed"
    if GITEA[0].lower() in h:
        # Gitea also sends X-Hub-Signature-256; its own header is the hex digest.
        given = credential("gitea", GITEA[1], "HMAC-SHA256 of the body with the webhook secret")
        if not hmac.compare_digest(given, expected.encode()):
            raise Unauthorized(f"gitea: {GITEA[1]} {mismatch}")
        return Push("gitea", _ref(body), h[GITEA[0].lower()])
    if GITHUB[0].lower() in h:
        given = credential("github", GITHUB[1], "sha256=HMAC of the body with the webhook secret")
        if not hmac.compare_digest(given, b"sha256=" + expected.encode()):
            raise Unauthorized(f"github: {GITHUB[1]} {mismatch}")
        return Push("github", _ref(body), h[GITHUB[0].lower()])
    events = ", ".join(event for event, _ in (GITHUB, GITEA, GITLAB))
    raise Unauthorized(f"not a GitHub, Gitea or GitLab webhook: no {events} header")


def authorization(headers: Mapping[str, str]) -> tuple[str, str] | None:
    """The scheme (lower case) and the credential of the request's Authorization
    header, None without one."""
    given = {k.lower(): v for k, v in headers.items()}.get("authorization")
    if given is None:
        return None
    scheme, _, credential = given.strip().partition(" ")
    return scheme.lower(), credential.strip()


def check_bearer(headers: Mapping[str, str], token: bytes) -> None:
    """Whether the request carries ``Authorization: Bearer <token>`` (POST /reconcile,
    and the fleet page's guard with web.token_file); compared in constant time, so the
    answer's timing tells nothing of the token."""
    given = authorization(headers)
    if given is None:
        raise Unauthorized("no Authorization header (send Authorization: Bearer TOKEN)")
    scheme, credential = given
    if scheme != "bearer":
        raise Unauthorized("the Authorization header is not a Bearer token")
    if not hmac.compare_digest(_octets(credential), token):
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


# How long POST /reconcile holds a request that asks to wait for its pass (seconds).
MAX_WAIT = 6 * 3600.0


def preferred_wait(headers: Mapping[str, str]) -> float | None:
    """The seconds ``Prefer: wait=N`` (RFC 7240) asks an answer within, capped at
    MAX_WAIT: `reconciler reconcile-now --wait` waits for the pass it asked for. None
    without it (or with another preference only): answer at once."""
    h = {k.lower(): v for k, v in headers.items()}
    for pref in h.get("prefer", "").split(","):
        name, _, value = pref.strip().partition("=")
        if name.strip().lower() == "wait":
            try:
                seconds = float(value.strip().strip('"'))
            except ValueError:
                return None
            return min(max(seconds, 0.0), MAX_WAIT) if seconds == seconds else None
    return None
