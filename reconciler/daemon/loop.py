"""`reconciler run`: reconcile on every poll interval or trigger, and serve the endpoints."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from reconciler import log
from reconciler.adapters.http import PostHandler, Server
from reconciler.config import Config
from reconciler.daemon.reconciler import Reconciler
from reconciler.daemon.triggers import RepoWatcher, Unauthorized, Wakeup, authenticate, concerns
from reconciler.errors import ConfigError, ReconcilerError


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
        self.server = Server(cfg.listen, self.metrics.registry, self.healthy, self.ready, post)
        if reconciler.lease is not None:
            # A standby's pass runs as soon as the holder's lease lapses or is released.
            reconciler.lease.on_wake = lambda: self.wakeup.notify("lease")
        self.watcher = RepoWatcher(Path(cfg.repo.url), self.wakeup) if cfg.repo.is_local and t.watch else None

    def webhook(self, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
        """POST /webhook: a forge's push event, authenticated, wakes the loop."""
        try:
            push = authenticate(headers, body, self._webhook_secret)
        except Unauthorized as exc:
            self.metrics.webhook_requests.labels("unauthorized").inc()
            log.event("webhook_refused", logging.WARNING, reason=str(exc))
            return 401, "text/plain", b"unauthorized\n"
        if not concerns(push, self.cfg.repo.branch):
            self.metrics.webhook_requests.labels("ignored").inc()
            return 200, "text/plain", b"ignored: not a push to the tracked branch\n"
        self.metrics.webhook_requests.labels("accepted").inc()
        log.event("webhook_push", forge=push.forge, ref=push.ref)
        self.wakeup.notify("webhook")
        return 202, "text/plain", b"accepted\n"

    def healthy(self) -> tuple[bool, str]:
        return (not self.stopping.is_set()), ("stopping" if self.stopping.is_set() else "ok")

    def ready(self) -> tuple[bool, str]:
        """Ready once a pass has observed the repository; a later fetch error keeps
        it ready, because what it published is still served. A standby is ready too
        (a Deployment of two rolls out), and says it is one."""
        if self._observed:
            lease = self.reconciler.lease
            if lease is not None and not lease.held:
                return True, lease.status().describe()
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
