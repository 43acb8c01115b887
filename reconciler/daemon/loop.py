"""`reconciler run`: reconcile on every poll interval or trigger, and serve the endpoints."""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

from reconciler import log
from reconciler.adapters.http import GetHandler, PostHandler, Request, Response, Server
from reconciler.config import Config
from reconciler.core.events import EventType, QueryError, parse_query
from reconciler.daemon.reconciler import Reconciler
from reconciler.daemon.triggers import RepoWatcher, Unauthorized, Wakeup, authenticate, concerns
from reconciler.errors import ConfigError, ReconcilerError

# A refused webhook is recorded in the event history at most this often (seconds), with
# the number of refusals since: anyone who reaches the port can send them, and must not
# push the rest of the history out.
REFUSALS_RECORDED_EVERY = 60.0


class Daemon:
    """`reconciler run`: reconcile on every poll interval and serve the endpoints."""

    def __init__(self, cfg: Config, reconciler: Reconciler) -> None:
        self.cfg = cfg
        self.reconciler = reconciler
        self.stopping = threading.Event()
        self._observed = False
        self._last_error: str | None = None
        self.metrics = self.reconciler.metrics
        t = cfg.triggers
        self.wakeup = Wakeup(quiet=t.debounce, max_delay=max(2.0, 10 * t.debounce))
        post: dict[str, PostHandler] = {}
        self._webhook_secret = b""
        if t.webhook_secret_file is not None:
            try:
                self._webhook_secret = t.webhook_secret_file.read_bytes().strip()
            except OSError as exc:
                raise ConfigError(
                    str(cfg.path), "triggers.webhook_secret_file", exc.strerror or str(exc)
                ) from None
            if not self._webhook_secret:
                raise ConfigError(str(cfg.path), "triggers.webhook_secret_file", "the file is empty")
            post["/webhook"] = self.webhook
        self._refusals = threading.Lock()
        self._refusal_recorded: float | None = None
        self._refusals_suppressed = 0
        # Read-only JSON; the fleet page's access control (a Server guard) covers these.
        get: dict[str, GetHandler] = {"/api/events": self.api_events}
        self.server = Server(cfg.listen, self.metrics.registry, self.healthy, self.ready, post, get)
        self.watcher = RepoWatcher(Path(cfg.repo.url), self.wakeup) if cfg.repo.is_local and t.watch else None

    def webhook(self, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
        """POST /webhook: a forge's push event, authenticated, wakes the loop."""
        try:
            push = authenticate(headers, body, self._webhook_secret)
        except Unauthorized as exc:
            self.metrics.webhook_requests.labels("unauthorized").inc()
            log.event("webhook_refused", logging.WARNING, reason=str(exc))
            self._record_refusal(str(exc))
            return 401, "text/plain", b"unauthorized\n"
        if not concerns(push, self.cfg.repo.branch):
            self.metrics.webhook_requests.labels("ignored").inc()
            return 200, "text/plain", b"ignored: not a push to the tracked branch\n"
        self.metrics.webhook_requests.labels("accepted").inc()
        log.event("webhook_push", forge=push.forge, ref=push.ref)
        self.wakeup.notify("webhook")
        return 202, "text/plain", b"accepted\n"

    def _record_refusal(self, reason: str) -> None:
        with self._refusals:
            now = self.reconciler.clock.monotonic()
            last = self._refusal_recorded
            if last is not None and now - last < REFUSALS_RECORDED_EVERY:
                self._refusals_suppressed += 1
                return
            suppressed, self._refusals_suppressed = self._refusals_suppressed, 0
            self._refusal_recorded = now
        self.reconciler.record_event(EventType.WEBHOOK_REFUSED, error=reason, suppressed=suppressed)

    def api_events(self, request: Request) -> Response:
        """GET /api/events?host=&type=&since=&until=&after=&before=&limit=: the event
        history as JSON (reconciler.core.events.parse_query)."""
        try:
            q = parse_query(request.query, self.reconciler.clock.now().timestamp())
        except QueryError as exc:
            return 400, "application/json", json.dumps({"error": str(exc)}).encode() + b"\n"
        events = [e.to_json() for e in self.reconciler.history(q)]
        return 200, "application/json", json.dumps({"events": events}).encode() + b"\n"

    def healthy(self) -> tuple[bool, str]:
        return (not self.stopping.is_set()), ("stopping" if self.stopping.is_set() else "ok")

    def ready(self) -> tuple[bool, str]:
        """Ready once a pass has observed the repository; a later fetch error keeps
        it ready, because what it published is still served."""
        if self._observed:
            return True, "ok"
        return False, self._last_error or "first reconcile not finished"

    def run(self) -> None:
        # Before anything listens or builds: a Nix that would build unsandboxed
        # stops the start (unless the config accepts it).
        self.reconciler.check_sandbox()
        self.server.start()
        log.event(
            "daemon_start",
            listen=f"{self.cfg.listen}",
            port=self.server.port,
            repo=self.cfg.repo.url,
            poll_interval=self.cfg.poll_interval,
        )
        if self.watcher is not None:
            self.watcher.start()
        try:
            while not self.stopping.is_set():
                try:
                    self.reconciler.reconcile()
                    self._observed = True
                except ReconcilerError as exc:
                    self._last_error = str(exc)
                    log.event("reconcile_failed", logging.ERROR, error=str(exc))
                except Exception as exc:
                    # A bug must not stop the daemon: log it and try again next interval.
                    self._last_error = f"internal error: {exc!r}"
                    log.event("reconcile_crashed", logging.ERROR, error=repr(exc))
                reasons = self.wakeup.wait(self.cfg.poll_interval)
                # A burst of triggers is one pass; it is counted under what started it.
                self.metrics.wakeups.labels(reasons[0] if reasons else "poll").inc()
        finally:
            if self.watcher is not None:
                self.watcher.stop()
            self.server.stop()
            self.reconciler.close()
            log.event("daemon_stop")

    def stop(self) -> None:
        self.stopping.set()
        self.reconciler.stop()
        self.wakeup.notify("stop")
