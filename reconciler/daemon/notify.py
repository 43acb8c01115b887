"""Delivering notifications (reconciler.core.notify) off the pass.

Each target has a thread of its own and a bounded queue: a pass only appends to the
queues (what it records returns at once), and a target that is down or hangs delays
no other. A thread sends its messages in order, each request within the target's
``timeout`` (connecting to the answer's headers), waiting for the rate limit before
each and retrying what may pass (no answer, 429, 5xx) on the backoff schedule; a
message it gives up on, or that a full queue pushes out, is dropped. Every outcome
is counted in ``reconciler_notifications_total{target,result}``.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter

from reconciler import log
from reconciler.adapters import fetch
from reconciler.adapters.eventlog import EventLog
from reconciler.config import NotificationConfig
from reconciler.core.events import Event, EventQuery
from reconciler.core.notify import Message, Provider, RateLimit, render, retryable
from reconciler.errors import ConfigError, FetchError

# How long a process that ends waits for its queued notifications to go out.
FLUSH_TIMEOUT = 10.0
RESULTS = ("sent", "failed", "dropped")

Post = Callable[[str, bytes, dict[str, str], float, str], fetch.Posted]


def notifications_counter(registry: CollectorRegistry, targets: Sequence[str]) -> Counter:
    counter = Counter(
        "reconciler_notifications",
        "Notification requests by target and result: sent (delivered), failed (a try that"
        " failed; it may be retried), dropped (given up after its tries, refused, pushed out"
        " of a full queue, or left at shutdown).",
        ["target", "result"],
        registry=registry,
    )
    for t in targets:
        for r in RESULTS:
            counter.labels(t, r)
    return counter


def _read(path: Path, config: Path, key: str) -> str:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError(str(config), key, f"cannot read {path}: {why}") from None
    if not value:
        raise ConfigError(str(config), key, f"{path} is empty")
    return value


@dataclass(frozen=True)
class _Request:
    url: str
    body: bytes
    headers: dict[str, str]

    def __repr__(self) -> str:  # the URL and headers may hold credentials
        return f"_Request({len(self.body)} bytes)"


class Target:
    """A target with its URL and credentials read from their files (``config`` names
    the reconciler.yaml for errors)."""

    def __init__(self, cfg: NotificationConfig, config: Path, index: int) -> None:
        at = f"notifications[{index}]"
        self.cfg = cfg
        self.name = cfg.name
        if cfg.url_file is not None:
            url = _read(cfg.url_file, config, f"{at}.url_file")
        else:
            assert cfg.url is not None  # load_config gives one or the other
            url = cfg.url
        if not url.startswith(("http://", "https://")) or any(c.isspace() for c in url):
            raise ConfigError(str(config), f"{at}.url_file", "must hold an http:// or https:// URL")
        self._url = url
        self._token = None if cfg.token_file is None else _read(cfg.token_file, config, f"{at}.token_file")
        self._secret = (
            None if cfg.secret_file is None else _read(cfg.secret_file, config, f"{at}.secret_file")
        )

    def __repr__(self) -> str:
        return f"Target({self.name!r})"

    def same(self, other: Target) -> bool:
        """Whether ``other`` sends the same way: its settings and what its files held."""
        return (self.cfg, self._url, self._token, self._secret) == (
            other.cfg,
            other._url,
            other._token,
            other._secret,
        )

    def request(self, msg: Message) -> _Request:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        provider = self.cfg.route.provider
        if provider == Provider.GITHUB:
            headers["Accept"] = "application/vnd.github+json"
            headers["X-GitHub-Api-Version"] = "2022-11-28"
        if self._token is not None:
            if provider == Provider.GITLAB:
                headers["PRIVATE-TOKEN"] = self._token
            elif provider == Provider.GITEA:
                headers["Authorization"] = f"token {self._token}"
            else:
                headers["Authorization"] = f"Bearer {self._token}"
        if provider == Provider.WEBHOOK:
            headers["X-Reconciler-Notice"] = msg.notice.value
            if self._secret is not None:
                # As GitHub signs its webhooks: the receiver checks the body came from us.
                mac = hmac.new(self._secret.encode(), msg.body, hashlib.sha256).hexdigest()
                headers["X-Reconciler-Signature-256"] = f"sha256={mac}"
        return _Request(self._url.rstrip("/") + msg.path if msg.path else self._url, msg.body, headers)


class _Sender:
    """One target's queue and the thread that empties it."""

    def __init__(self, target: Target, post: Post, counter: Counter) -> None:
        self.target = target
        self._post = post
        cfg = target.cfg
        self._sent = counter.labels(target.name, "sent")
        self._failed = counter.labels(target.name, "failed")
        self._dropped = counter.labels(target.name, "dropped")
        self._queue: collections.deque[tuple[Event, Message]] = collections.deque()
        self._cond = threading.Condition()
        self._limit = RateLimit.full(cfg.max_per_minute, time.monotonic())
        self._thread: threading.Thread | None = None
        # Set by close(): deliver what is queued until then, and no later.
        self._deadline: float | None = None

    def submit(self, event: Event, msg: Message) -> None:
        with self._cond:
            if self._deadline is not None:
                self._drop(event, msg, "the daemon is stopping")
                return
            if len(self._queue) >= self.target.cfg.queue:
                self._drop(*self._queue.popleft(), "the queue is full")
            self._queue.append((event, msg))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"notify-{self.target.name}", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    def close(self, deadline: float) -> None:
        with self._cond:
            self._deadline = deadline
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(max(0.0, deadline - time.monotonic()))
        # What a request still running at the deadline kept waiting is not sent: that
        # request ends at its own deadline, and is not tried again.
        with self._cond:
            while self._queue:
                self._drop(*self._queue.popleft(), "the daemon stopped before it was sent")

    def _drop(self, event: Event, msg: Message, why: str) -> None:
        self._dropped.inc()
        log.event(
            "notification_dropped",
            logging.ERROR,
            target=self.target.name,
            notice=msg.notice,
            about=event.type,
            host=event.host,
            reason=why,
        )

    def _wait(self, seconds: float) -> bool:
        """Sleep ``seconds``; False at once if close()'s deadline comes before their end."""
        end = time.monotonic() + seconds
        with self._cond:
            while True:
                if self._deadline is not None and self._deadline < end:
                    return False
                now = time.monotonic()
                if now >= end:
                    return True
                self._cond.wait(end - now)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    if self._deadline is not None:
                        return
                    self._cond.wait()
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    while self._queue:
                        self._drop(*self._queue.popleft(), "the daemon stopped before it was sent")
                    return
                event, msg = self._queue.popleft()
            try:
                self._deliver(event, msg)
            except Exception as exc:  # a bug here must not end the target's deliveries
                self._drop(event, msg, f"internal error: {exc!r}")

    def _deliver(self, event: Event, msg: Message) -> None:
        cfg = self.target.cfg
        req = self.target.request(msg)
        failed = 0
        while True:
            self._limit, wait = self._limit.take(time.monotonic())
            if wait > 0 and not self._wait(wait):
                self._drop(event, msg, "the daemon stopped before it was sent")
                return
            status: int | None = None
            retry_after: float | None = None
            try:
                answer = self._post(req.url, req.body, req.headers, cfg.timeout, self.target.name)
                status, retry_after = answer.status, answer.retry_after
                error = f"HTTP {status}"
            except FetchError as exc:
                error = str(exc)
            if status is not None and 200 <= status < 300:
                self._sent.inc()
                log.event(
                    "notification_sent",
                    target=self.target.name,
                    notice=msg.notice,
                    about=event.type,
                    host=event.host,
                    status=status,
                )
                return
            failed += 1
            self._failed.inc()
            delay = cfg.backoff.delay(failed, retry_after) if retryable(status) else None
            log.event(
                "notification_failed",
                logging.WARNING,
                target=self.target.name,
                notice=msg.notice,
                about=event.type,
                host=event.host,
                attempt=failed,
                error=error,
                retry_in=None if delay is None else round(delay, 3),
            )
            if delay is None:
                why = f"gave up after {failed} tries" if retryable(status) else f"refused ({error})"
                self._drop(event, msg, why)
                return
            if not self._wait(delay):
                self._drop(event, msg, "the daemon stopped before it was sent")
                return


class Notifier:
    """Hands each event to the targets that want it (reconciler.core.notify.render)."""

    def __init__(
        self, targets: Sequence[Target], registry: CollectorRegistry, post: Post = fetch.post
    ) -> None:
        self._counter = notifications_counter(registry, [t.name for t in targets])
        self._post = post
        self._senders = [_Sender(t, post, self._counter) for t in targets]

    @property
    def targets(self) -> list[Target]:
        return [s.target for s in self._senders]

    def retarget(self, targets: Sequence[Target]) -> None:
        """Send to ``targets`` from now on (a reload). A target unchanged keeps its queue
        and its thread; the others' queues are delivered for at most FLUSH_TIMEOUT in the
        background, so that the daemon's loop does not wait for them."""
        keep = {s.target.name: s for s in self._senders}
        senders = []
        for t in targets:
            old = keep.get(t.name)
            if old is not None and old.target.same(t):
                senders.append(keep.pop(t.name))
            else:
                for r in RESULTS:
                    self._counter.labels(t.name, r)
                senders.append(_Sender(t, self._post, self._counter))
        self._senders = senders
        gone = list(keep.values())
        if gone:
            deadline = time.monotonic() + FLUSH_TIMEOUT

            def retire() -> None:
                for s in gone:
                    s.close(deadline)

            threading.Thread(target=retire, name="notify-retired", daemon=True).start()

    def submit(self, events: Sequence[Event]) -> None:
        """Queue what ``events`` give each target; returns at once."""
        for sender in self._senders:
            for e in events:
                msg = render(sender.target.cfg.route, e)
                if msg is not None:
                    sender.submit(e, msg)

    def close(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Send what is queued for at most ``timeout`` seconds, then drop the rest."""
        deadline = time.monotonic() + timeout
        for s in self._senders:
            s.close(deadline)


class NotifyingLog:
    """The event history that also notifies: what the pass records (ports.EventLog)
    is written to ``history``, then, with the ids it was given, queued for ``notifier``."""

    def __init__(self, history: EventLog, notifier: Notifier) -> None:
        self._history = history
        self.notifier = notifier

    def record(self, *events: Event) -> None:
        self.notifier.submit(self._history.append(*events))

    def query(self, q: EventQuery) -> list[Event]:
        return self._history.query(q)

    def close(self) -> None:
        self.notifier.close()
        self._history.close()
