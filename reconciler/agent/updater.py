"""The host side: pull this host's signed releases, verify, install, switch, check, roll back.

One poll reads ``hosts/<host>/latest.json`` with a conditional GET (an idle poll
downloads nothing), learns the newest version from it, then reads and verifies the
immutable signed ``releases/<N>.json`` against the pinned keys only. What the store
serves is judged by reconciler.core.trust: the release must name this host, be newer
than what runs (no rollback), not have failed here before and not be expired (no
freeze); the artifact must have the size, sha256 and signature the release says (no
tampering; no endless data either, the download stops at the size). It is installed
beside the old release, the ``current`` symlink is flipped by rename, the app is
activated and health-checked, and on failure ``current`` flips back and the old
release is activated again.

The store is read through a :class:`Fetcher`, time comes from a :class:`Clock` and
signatures are checked by a :class:`SignatureChecker` made from the pinned keys: all
three are injected, so a poll runs in memory in tests.

State directory:
    releases/<N>/<artifact>, releases/<N>/release.json   installed releases
    current -> releases/<N>                              what runs
    state.json                                          version, previous, failed, validators
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from prometheus_client import write_to_textfile

from reconciler import log
from reconciler.adapters import fetch
from reconciler.adapters.gpg import read_keys
from reconciler.adapters.http import Server
from reconciler.agent import health
from reconciler.agent.config import AgentConfig, HealthConfig
from reconciler.agent.metrics import AgentMetrics, PollResult
from reconciler.agent.state import AgentState
from reconciler.agent.supervisor import App
from reconciler.agent.verify import METADATA_LIMIT, SIGNATURE_LIMIT
from reconciler.core.layout import latest_path, release_path
from reconciler.core.release import Release, parse_release
from reconciler.core.trust import Downloaded, Pinned, RefusalError, SignatureVerdict, TrustedState
from reconciler.errors import FetchError, VerificationError
from reconciler.ports import Clock, Fetcher, SignatureChecker

# The long-running agent looks at its app and its poll timer this often.
TICK = 1.0


def _verdict(check: Callable[[], str]) -> SignatureVerdict:
    try:
        return SignatureVerdict.good(check())
    except VerificationError as exc:
        return SignatureVerdict.bad(str(exc))


class Agent:
    def __init__(
        self,
        cfg: AgentConfig,
        metrics: AgentMetrics | None = None,
        *,
        fetcher: Fetcher,
        clock: Clock,
        checker: Callable[[Sequence[bytes]], SignatureChecker],
        probe: Callable[[HealthConfig], str],
    ) -> None:
        """The composition root (reconciler.wiring.open_agent) hands in the adapters."""
        self.cfg = cfg
        self.metrics = metrics or AgentMetrics()
        self.fetcher = fetcher
        self.clock = clock
        self._checker = checker
        self._probe = probe
        self.releases = cfg.state_dir / "releases"
        self.current = cfg.state_dir / "current"
        self.releases.mkdir(parents=True, exist_ok=True)
        self.state_file = cfg.state_dir / "state.json"
        self.state = AgentState.load(self.state_file)
        self.app = App(cfg.host, self.clock.monotonic) if cfg.supervise else None
        # Trust is pinned here, once: signatures are checked against these keys only,
        # never against a key the store serves.
        self._keys = read_keys(list(cfg.keys))
        if self.state.version:
            self.metrics.running_version.labels(cfg.host).set(self.state.version)

    def _url(self, key: str) -> str:
        return fetch.join(self.cfg.store, key)

    def _count(self, n: int) -> None:
        self.metrics.downloaded.inc(n)

    def artifact(self, version: int) -> Path:
        """The installed artifact of ``version``."""
        d = self.releases / str(version)
        release = parse_release((d / "release.json").read_bytes(), str(d / "release.json"))
        art = release.artifact(self.cfg.format)
        assert art is not None
        return d / art.name

    def _pinned(self) -> Pinned:
        return Pinned(self.cfg.host, self.cfg.format, self.state.version, frozenset(self.state.failed))

    # -- one poll ---------------------------------------------------------------

    def poll(self) -> PollResult:
        """Look for a newer release and switch to it; return the poll's result."""
        try:
            result = self._poll()
        except RefusalError as exc:
            result = PollResult.REFUSED
            self.metrics.refusals.labels(exc.reason).inc()
            log.event("agent_refused", logging.WARNING, host=self.cfg.host, reason=exc.reason, error=str(exc))
        except (FetchError, VerificationError, OSError) as exc:
            # Nothing is switched; the same update is tried again at the next poll.
            result = PollResult.ERROR
            log.event("agent_poll_failed", logging.ERROR, host=self.cfg.host, error=str(exc))
        self.metrics.polls.labels(result).inc()
        self.metrics.last_poll.set(self.clock.now().timestamp())
        if self.cfg.metrics_file is not None:
            write_to_textfile(str(self.cfg.metrics_file), self.metrics.registry)
        return result

    def _poll(self) -> PollResult:
        got = self.fetcher.get(
            self._url(latest_path(self.cfg.host)),
            METADATA_LIMIT,
            self.state.validators,
            self.cfg.timeout,
            self._count,
        )
        if got is None:
            return PollResult.IDLE
        trusted = TrustedState(self._pinned(), self.clock.now())
        latest = trusted.update_latest(got.data)
        if not latest.new:
            self._remember(got.validators)
            return PollResult.CURRENT
        if self.state.defer(latest.version):
            self.state.save(self.state_file)
            log.event(
                "agent_deferred",
                host=self.cfg.host,
                version=latest.version,
                failures=self.state.retry_failures,
                polls_left=self.state.retry_skip,
            )
            return PollResult.DEFERRED
        try:
            release = self._trusted_release(trusted)
        except RefusalError:
            # A refusal is final for this latest.json; a new one gets a new look.
            self._remember(got.validators)
            raise
        try:
            self._install(trusted, release)
        except (RefusalError, FetchError, VerificationError, OSError):
            self.state.download_failed(latest.version)
            self.state.save(self.state_file)
            raise
        result = self._switch(release.version)
        self._remember(got.validators)
        return result

    def _remember(self, validators: fetch.Validators) -> None:
        self.state.validators = validators
        self.state.save(self.state_file)

    def _trusted_release(self, trusted: TrustedState) -> Release:
        """releases/<N>.json, checked against the pinned keys only (never the store's)."""
        assert trusted.latest is not None
        key = release_path(self.cfg.host, trusted.latest.version)
        try:
            sig = self.fetcher.get(
                self._url(key + ".asc"), SIGNATURE_LIMIT, timeout=self.cfg.timeout, count=self._count
            )
        except FetchError as exc:
            return trusted.update_release(b"", SignatureVerdict.missing(str(exc)))
        meta = self.fetcher.get(self._url(key), METADATA_LIMIT, timeout=self.cfg.timeout, count=self._count)
        assert sig is not None and meta is not None  # unconditional reads always answer
        with self._checker(self._keys) as checker:
            verdict = _verdict(lambda: checker.verify_bytes(meta.data, sig.data, key))
        return trusted.update_release(meta.data, verdict)

    def _install(self, trusted: TrustedState, release: Release) -> None:
        """Download, check and unpack ``release`` into releases/<N>, beside the old one."""
        art = release.artifact(self.cfg.format)
        assert art is not None  # the trusted release has one
        final = self.releases / str(release.version)
        work = Path(tempfile.mkdtemp(prefix=f".{release.version}.", dir=self.releases))
        try:
            where, dest = self._url(art.blob), work / art.name
            digest = self.fetcher.download(where, dest, art.size, self.cfg.timeout, self._count)
            trusted.update_artifact(Downloaded(where, dest.stat().st_size, digest))
            sig = self.fetcher.get(
                where + ".asc", SIGNATURE_LIMIT, timeout=self.cfg.timeout, count=self._count
            )
            assert sig is not None
            with self._checker(self._keys) as checker:
                verdict = _verdict(lambda: checker.verify(dest, sig.data, where))
            trusted.update_artifact_signature(verdict)
            dest.chmod(0o555)
            (work / "release.json").write_bytes(release.to_json())
            if final.exists():
                shutil.rmtree(final)
            os.replace(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        log.event("agent_installed", host=self.cfg.host, version=release.version, artifact=art.name)

    def _point_current(self, version: int) -> None:
        """Flip ``current`` to releases/<version> with one rename: never missing, never half."""
        tmp = self.current.with_name("current.tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path("releases") / str(version))
        os.replace(tmp, self.current)

    def _switch(self, version: int) -> PollResult:
        old = self.state.version
        self._point_current(version)
        failure = self._activate(version)
        if failure is None:
            self.state.previous, self.state.version = old, version
            self.state.save(self.state_file)
            self.metrics.updates.inc()
            self.metrics.running_version.labels(self.cfg.host).set(version)
            log.event("agent_switched", host=self.cfg.host, version=version, previous=old)
            self._prune()
            return PollResult.UPDATED
        self.state.failed.append(version)
        self.metrics.rollbacks.inc()
        log.event(
            "agent_rolled_back",
            logging.ERROR,
            host=self.cfg.host,
            version=version,
            back_to=old,
            reason=failure,
        )
        if old:
            self._point_current(old)
            again = self._activate(old)
            if again is not None:
                log.event(
                    "agent_rollback_unhealthy", logging.ERROR, host=self.cfg.host, version=old, reason=again
                )
        else:
            self.current.unlink(missing_ok=True)
            if self.app is not None:
                self.app.stop()
        self.state.save(self.state_file)
        return PollResult.ROLLED_BACK

    def _activate(self, version: int) -> str | None:
        """Start ``version`` and check it; the reason it is unhealthy, or None."""
        if self.app is not None:
            self.app.stop()
            self.app.crashes = 0
            self.app.start(self.current / self.artifact(version).name)
        if self.cfg.activate is not None:
            env = {
                **os.environ,
                "RECONCILER_VERSION": str(version),
                "RECONCILER_RELEASE_DIR": str(self.releases / str(version)),
                "RECONCILER_ARTIFACT": str(self.current / self.artifact(version).name),
            }
            try:
                proc = subprocess.run(
                    self.cfg.activate, env=env, capture_output=True, text=True, timeout=self.cfg.timeout
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                return f"activation command failed: {exc}"
            if proc.returncode != 0:
                tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
                return f"activation command exited {proc.returncode}: {tail[0]}"
        if self.cfg.health is None:
            return None
        app = self.app
        alive = app.running if app is not None else lambda: True
        return health.wait_healthy(self.cfg.health, self.clock, alive, self._probe)

    def _prune(self) -> None:
        """Keep the newest ``keep`` releases, and always the current and previous ones."""
        installed = sorted(int(d.name) for d in self.releases.iterdir() if d.name.isdigit())
        keep = set(installed[-self.cfg.keep :]) | {self.state.version, self.state.previous}
        for v in installed:
            if v not in keep:
                shutil.rmtree(self.releases / str(v), ignore_errors=True)

    # -- the long-running agent -------------------------------------------------

    def run(self, stopping: threading.Event) -> None:
        """Poll every interval until ``stopping``; with ``supervise``, keep the app running."""
        server = None
        if self.cfg.listen is not None:
            server = Server(self.cfg.listen, self.metrics.registry, lambda: (True, "ok"), self._ready)
            server.start()
        log.event("agent_start", host=self.cfg.host, store=self.cfg.store, version=self.state.version)
        try:
            next_poll = 0.0
            while not stopping.is_set():
                if self.app is not None and self.state.version and not self.app.running():
                    if self.app.proc is not None:
                        self.app.exited()
                    if self.app.restart_due():
                        self.app.start(self.current / self.artifact(self.state.version).name)
                if self.clock.monotonic() >= next_poll:
                    self.poll()
                    next_poll = self.clock.monotonic() + self.cfg.poll_interval
                stopping.wait(TICK)
        finally:
            if self.app is not None:
                self.app.stop()
            if server is not None:
                server.stop()
            log.event("agent_stop", host=self.cfg.host)

    def _ready(self) -> tuple[bool, str]:
        return (True, "ok") if self.state.version else (False, "no release installed yet")
