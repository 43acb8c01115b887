"""`reconciler run`: reconcile on every poll interval or trigger, and serve the endpoints."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from reconciler import log
from reconciler.adapters.eventlog import EventLog
from reconciler.adapters.http import GetHandler, PostHandler, Request, Response, Server
from reconciler.config import Config, TriggerConfig, load_config, reload
from reconciler.core.events import EventType, QueryError, parse_query
from reconciler.core.model import Action
from reconciler.daemon import preflight
from reconciler.daemon.notify import Notifier, NotifyingLog, Target
from reconciler.daemon.reconciler import Reconciler, ReconcileResult
from reconciler.daemon.triggers import (
    Reason,
    RepoWatcher,
    Unauthorized,
    Wakeup,
    authenticate,
    check_bearer,
    concerns,
    preferred_wait,
)
from reconciler.daemon.web import SECURITY_HEADERS, Access, FleetPage, read_users
from reconciler.errors import ConfigError, ReconcilerError, internal_error, ledger_error

# A refused webhook or reconcile request is logged (and a webhook recorded in the event
# history) at most this often (seconds) for each of the two, with the number of
# refusals since: anyone who reaches the port can send them, and must neither flood the
# log nor push the rest of the history out.
REFUSALS_RECORDED_EVERY = 60.0
# The loop's wait for the next pass is this long at most at a time (seconds): a signal
# handler waits for it at worst (_wait).
SIGNAL_SLICE = 1.0
# Results of the newest passes kept for requests waiting on them (reconcile-now --wait).
RESULTS_KEPT = 64
# Requests that wait for their pass at once: each holds one of the HTTP listener's
# places for as long as the pass takes, which can be hours. Past these, a request is
# accepted without waiting, and says so.
MAX_WAITING = 8


def read_secret(cfg: Config, key: str, path: Path | None) -> bytes:
    """The secret in the file at ``path`` (the config's ``key``), stripped; empty if
    none is configured. An unreadable or empty file is the config's error."""
    if path is None:
        return b""
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(str(cfg.path), key, exc.strerror or str(exc)) from None
    if not secret:
        raise ConfigError(str(cfg.path), key, "the file is empty")
    return secret


def _secrets(cfg: Config) -> tuple[bytes, bytes]:
    """The webhook secret and the reconcile token (empty when not configured)."""
    t: TriggerConfig = cfg.triggers
    return (
        read_secret(cfg, "triggers.webhook_secret_file", t.webhook_secret_file),
        read_secret(cfg, "triggers.reconcile_token_file", t.reconcile_token_file),
    )


def access(cfg: Config) -> Access:
    """Who may read the fleet page and the JSON APIs (reconciler.daemon.web)."""
    w = cfg.web
    return Access(
        cfg.listen,
        cfg.path,
        read_secret(cfg, "web.token_file", w.token_file),
        read_users(w.basic_auth_file, cfg.path),
    )


class Daemon:
    """`reconciler run`: reconcile on every poll interval and serve the endpoints."""

    def __init__(self, cfg: Config, reconciler: Reconciler, checks: Sequence[preflight.Check] = ()) -> None:
        """``checks``: what must hold before the daemon listens or builds (preflight)."""
        self.cfg = cfg
        self.reconciler = reconciler
        self.checks = checks
        self.stopping = threading.Event()
        self._observed = False
        self._last_error: str | None = None
        self._reload = threading.Event()
        # Passes numbered from 1 as they start; each one's result once it finished, for
        # POST /reconcile requests that wait for the pass they asked for.
        self._passes = threading.Condition()
        self._started = 0
        self._finished = 0
        self._results: dict[int, tuple[bool, str]] = {}
        self._waiting = 0  # requests waiting for their pass (under _passes)
        self.metrics = self.reconciler.metrics
        t = cfg.triggers
        self.wakeup = Wakeup(quiet=t.debounce, max_delay=max(2.0, 10 * t.debounce))
        # Either may be configured, changed or dropped by a reload: each route answers
        # 404, as an unknown one does, while its secret is not configured.
        self._webhook_secret, self._reconcile_token = _secrets(cfg)
        post: dict[str, PostHandler] = {"/webhook": self.webhook, "/reconcile": self.reconcile_now}
        self._refusals = threading.Lock()
        # Event name -> when it was last logged, and the refusals not logged since.
        self._refusals_seen: dict[str, tuple[float, int]] = {}
        # The fleet page and the read-only JSON, behind the page's access control.
        self.access = access(cfg)
        self.page = FleetPage(reconciler)
        get: dict[str, GetHandler] = {"/api/events": self.api_events, **self.page.routes()}
        self.server = Server(
            cfg.listen,
            self.metrics.registry,
            self.healthy,
            self.ready,
            post,
            get,
            # Through the attribute: a reload puts the credentials read again there.
            guard=lambda request: self.access.guard(request),
            get_headers=SECURITY_HEADERS,
            challenge=self.access.challenge,
        )
        if reconciler.lease is not None:
            # A standby's pass runs as soon as the holder's lease lapses or is released.
            reconciler.lease.on_wake = lambda: self.wakeup.notify("lease")
        self.watcher = RepoWatcher(Path(cfg.repo.url), self.wakeup) if cfg.repo.is_local and t.watch else None

    def webhook(self, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
        """POST /webhook: a forge's push event, authenticated, wakes the loop."""
        if not self._webhook_secret:
            return 404, "text/plain", b"not found\n"
        try:
            push = authenticate(headers, body, self._webhook_secret)
        except Unauthorized as exc:
            self.metrics.webhook_requests.labels("unauthorized").inc()
            self._refused("webhook_refused", str(exc))
            # Why, so that whoever sets the hook up sees what to fix (no secret in it).
            return 401, "text/plain", f"unauthorized: {exc}\n".encode()
        if not concerns(push, self.cfg.repo.branch):
            self.metrics.webhook_requests.labels("ignored").inc()
            return 200, "text/plain", b"ignored: not a push to the tracked branch\n"
        self.metrics.webhook_requests.labels("accepted").inc()
        log.event("webhook_push", forge=push.forge, ref=push.ref)
        self.wakeup.notify("webhook")
        return 202, "text/plain", b"accepted\n"

    def _refused(self, event: str, reason: str) -> None:
        """A refused request: logged as ``event``, and a refused webhook recorded in the
        history, at most once per REFUSALS_RECORDED_EVERY, with how many were not since
        (the metrics count every one)."""
        with self._refusals:
            now = self.reconciler.clock.monotonic()
            seen = self._refusals_seen.get(event)
            if seen is not None and now - seen[0] < REFUSALS_RECORDED_EVERY:
                self._refusals_seen[event] = (seen[0], seen[1] + 1)
                return
            suppressed = seen[1] if seen is not None else 0
            self._refusals_seen[event] = (now, 0)
        log.event(event, logging.WARNING, reason=reason, suppressed=suppressed)
        if event == EventType.WEBHOOK_REFUSED:
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

    def reconcile_now(self, headers: dict[str, str], body: bytes) -> tuple[int, str, bytes]:
        """POST /reconcile with the reconcile token (`reconciler reconcile-now`): a pass
        at once, or right after the one running; hosts in backoff are retried."""
        token = self._reconcile_token
        if not token:
            return 404, "text/plain", b"not found\n"
        try:
            check_bearer(headers, token)
        except Unauthorized as exc:
            self.metrics.reconcile_requests.labels("unauthorized").inc()
            self._refused("reconcile_request_refused", str(exc))
            return 401, "text/plain", f"unauthorized: {exc}\n".encode()
        if self.reconciler.state.suspensions().fleet is not None:
            self.metrics.reconcile_requests.labels("suspended").inc()
            return 409, "text/plain", b"the fleet is suspended: reconciler resume first\n"
        self.metrics.reconcile_requests.labels("accepted").inc()
        wait = preferred_wait(headers)
        with self._passes:
            # Every pass numbered up to now had started before this request: the one
            # that answers it is the next to start, after the wakeup below.
            target = self._started + 1
        log.event("reconcile_requested", waits=wait is not None)
        self.wakeup.notify(Reason.MANUAL)
        if wait is None:
            return 202, "text/plain", b"accepted: a pass starts now, or right after the one running\n"
        with self._passes:
            if self._waiting >= MAX_WAITING:
                why = f"not waited for, {MAX_WAITING} requests wait already"
                return 202, "text/plain", f"accepted: pass {target} starts now or next; {why}\n".encode()
            self._waiting += 1
            try:
                self._passes.wait_for(lambda: self._finished >= target or self.stopping.is_set(), wait)
            finally:
                self._waiting -= 1
            result = self._results.get(target)
        if result is None:
            if self.stopping.is_set():
                return 503, "text/plain", f"the daemon stopped before pass {target} finished\n".encode()
            return 202, "text/plain", f"accepted: pass {target} did not finish within {wait:g}s\n".encode()
        ok, line = result
        return 200, "text/plain", f"{'ok' if ok else 'failed'}: pass {target}: {line}\n".encode()

    @property
    def waiting(self) -> int:
        """Requests waiting for their pass now (POST /reconcile with Prefer: wait)."""
        with self._passes:
            return self._waiting

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
        # Before anything listens or builds: a wrong key, an unwritable store or a Nix
        # that would build unsandboxed (unless the config accepts it) stops the start.
        preflight.at_start(self.checks)
        self.reconciler.check_sandbox()
        self.server.start()
        log.event(
            "daemon_start",
            listen=f"{self.cfg.listen}",
            port=self.server.port,
            repo=self.cfg.repo.shown_url,
            poll_interval=self.cfg.poll_interval,
        )
        if self.access.closed:
            log.event(
                "web_closed",
                logging.WARNING,
                listen=self.cfg.listen,
                reason="not a loopback address: set web.token_file or web.basic_auth_file to serve the "
                "fleet page and /api/",
            )
        if self.watcher is not None:
            self.watcher.start()
        try:
            forced = False
            while not self.stopping.is_set():
                self._pass(forced)
                reasons = self._wait()
                forced = Reason.MANUAL in reasons
                # A burst of triggers is one pass; it is counted under what started it.
                self.metrics.wakeups.labels(reasons[0] if reasons else Reason.POLL).inc()
        finally:
            if self.watcher is not None:
                self.watcher.stop()
            self.server.stop()
            self.reconciler.close()
            log.event("daemon_stop")

    def _pass(self, forced: bool) -> None:
        """One pass; ``forced`` (reconcile-now) retries hosts in backoff at once."""
        with self._passes:
            self._started += 1
            number = self._started
        outcome = (False, "the pass did not finish")
        try:
            result = self.reconciler.reconcile(respect_backoff=not forced)
            self._observed = True
            outcome = (result.ok, describe(result))
        except (ReconcilerError, sqlite3.Error) as exc:
            # sqlite's own: the ledger failed past its opening (a full disk, a bad page).
            said = str(
                exc
                if isinstance(exc, ReconcilerError)
                else ledger_error(str(self.cfg.state_dir / "state.db"), str(exc))
            )
            self._last_error = said
            log.event("reconcile_failed", logging.ERROR, error=said)
            outcome = (False, said)
        except Exception as exc:
            # A bug must not stop the daemon: log it and try again next interval.
            self._last_error = f"internal error: {internal_error(exc)}"
            log.event("reconcile_crashed", logging.ERROR, error=internal_error(exc))
            outcome = (False, self._last_error)
        finally:
            with self._passes:
                self._finished = number
                self._results[number] = outcome
                self._results.pop(number - RESULTS_KEPT, None)
                self._passes.notify_all()

    def _wait(self) -> list[str]:
        """Wait for the poll interval or a trigger; what woke the loop for a pass (empty:
        the interval passed). A reload is done here, between passes, and wakes no pass:
        the interval goes on from the last pass, at its new length."""
        last_pass = time.monotonic()
        while True:
            left = last_pass + self.cfg.poll_interval - time.monotonic()
            # In slices: a signal's handler (SIGHUP's reload, SIGTERM's stop) runs in
            # this thread, and a wait the signal did not interrupt would hold it until
            # the interval's end. Seen: a SIGHUP sent just after a pass, reloaded 30 s
            # later, when the SIGTERM came.
            reasons = self.wakeup.wait(min(max(0.0, left), SIGNAL_SLICE))
            if self._reload.is_set():
                self._reload.clear()
                self.reload()
            if not reasons and left > SIGNAL_SLICE and not self.stopping.is_set():
                continue
            passes = [r for r in reasons if r != Reason.RELOAD]
            if passes or not reasons or self.stopping.is_set():
                return passes

    def request_reload(self) -> None:
        """From a signal handler (SIGHUP): read the config again between passes."""
        self._reload.set()
        self.wakeup.notify(Reason.RELOAD)

    def reload(self) -> None:
        """Read the config file again. A valid one takes effect from the next pass, as
        far as it can without a restart (config.RELOADABLE); the rest is logged as
        needing one. An invalid one is logged, and the config in use stays."""
        try:
            new = load_config(self.cfg.path)
            secrets = _secrets(new)
            # Read now: a target whose URL or token file cannot be read refuses the reload.
            targets = [Target(n, new.path, i) for i, n in enumerate(new.notifications)]
            merged, applied, restart = reload(self.cfg, new)
            # The page's token and passwords are read again from the files in use (a
            # change of their paths needs a restart): rotating a leaked token and
            # sending SIGHUP must shut the old one out, as it does the triggers'.
            guard = access(merged)
        except ConfigError as exc:
            log.event("config_reload_failed", logging.ERROR, file=exc.path, key=exc.key, reason=exc.reason)
            return
        except ReconcilerError as exc:
            log.event("config_reload_failed", logging.ERROR, file=str(self.cfg.path), key="", reason=str(exc))
            return
        if restart:
            log.event("config_reload_needs_restart", logging.WARNING, keys=",".join(restart))
        self.cfg = merged
        self.reconciler.cfg = merged
        t = merged.triggers
        self.wakeup.quiet, self.wakeup.max_delay = t.debounce, max(2.0, 10 * t.debounce)
        # Re-read even when the paths did not change: a rotated secret is a new file content.
        self._webhook_secret, self._reconcile_token = secrets
        renotified = self._retarget(targets)
        if renotified and "notifications" not in applied:
            applied.append("notifications")  # the same settings, a file's content changed
        if self.reconciler.lease is not None:
            # The next renewal writes the new duration; until then the lease is held for
            # the one last written (core.lease.Held), and standbys read it from the record.
            self.reconciler.lease.settings = merged.lease
        self.access = guard
        log.event("config_reloaded", file=str(self.cfg.path), changed=",".join(applied) or "nothing")

    def _retarget(self, targets: list[Target]) -> bool:
        """Notify ``targets`` from now on; whether that changed anything."""
        events = self.reconciler.events
        if isinstance(events, NotifyingLog):
            old = events.notifier.targets
            if len(old) == len(targets) and all(a.same(b) for a, b in zip(old, targets, strict=True)):
                return False
            events.notifier.retarget(targets)
            return True
        if not targets or not isinstance(events, EventLog):
            return False
        # The first targets of a daemon started without any.
        self.reconciler.events = NotifyingLog(events, Notifier(targets, self.metrics.registry))
        return True

    def stop(self) -> None:
        self.stopping.set()
        with self._passes:
            self._passes.notify_all()
        self.reconciler.stop()
        self.wakeup.notify(Reason.STOP)


def describe(result: ReconcileResult) -> str:
    """A pass in one line, for a request that waited for it."""
    if result.fleet_suspended:
        return "the fleet is suspended: nothing was reconciled"
    plan = result.plan
    if result.standby:
        return f"commit {plan.commit[:12]}: standby, another daemon holds the publisher lease and publishes"
    failed = sorted(o.host for o in result.outcomes if not o.ok)
    invalid, backoff = len(plan.with_action(Action.INVALID)), len(plan.with_action(Action.BACKOFF))
    line = (
        f"commit {plan.commit[:12]}: {sum(o.ok for o in result.outcomes)} published, {len(failed)} failed"
        f", {invalid} invalid, {backoff} in backoff"
    )
    if failed:
        line += f" (failed: {', '.join(failed[:5])}{', ...' if len(failed) > 5 else ''})"
    if result.metadata_error is not None:
        line += f"; TUF metadata: {result.metadata_error}"
    return line
