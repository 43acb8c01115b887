"""The host side: pull this host's releases with TUF's protections, install, switch,
check, roll back.

One poll reads the store's ``tuf/timestamp.json`` with a conditional GET (an idle poll
downloads nothing). When it changed, python-tuf's ngclient (reconciler.agent.tufclient)
brings the host's TUF metadata up to date and hands over the verified entry for
``hosts/<host>/latest.json``: the release number N and the length and sha256 of
``releases/<N>.json``. What follows is judged by reconciler.core.trust: the release file
must be those bytes and release N of this host, newer than what runs (no rollback),
unexpired, with an artifact that did not fail here before; with ``require_provenance``
its provenance must be the DSSE envelope the release names, signed by a pinned key, of
exactly this release; the artifact must have the
size and sha256 the release says (no tampering; no endless data either, the download
stops at the size). With a release already installed, a store served over http and
the artifact's zsync control file beside its blob, only the blocks the running
release lacks are fetched (Debian's zsync, under the same deadline as a download);
whatever zsync builds is checked like a download, and anything wrong with it means a
full download instead. It is installed beside the old release, the ``current`` symlink is
flipped by rename, the app is activated and health-checked, and on failure ``current``
flips back and the old release is activated again.

The store is read through a :class:`Fetcher` (every request bounded in size and time),
time comes from a :class:`Clock`, and the pinned keys become TUF keys through
``pinned_keys``: all injected, so a poll runs in memory in tests.

State directory:
    releases/<N>/<artifact>, releases/<N>/release.json   installed releases
    current -> releases/<N>                              what runs
    tuf/                                                 ngclient's trusted metadata
    state.json                                          version, previous, failed, validators,
                                                         the switch under way
    agent.lock                                           held by the one agent running here
    app.pid                                              the app started (supervise)
    log-checkpoint                                       the log's last head seen (require_log)

With ``require_log``, a release must also be in the store's transparency log, in a
history that extends the one this host saw before (reconciler.agent.logcheck).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path

from prometheus_client import write_to_textfile
from securesystemslib.signer import Key
from tuf.api.metadata import TargetFile

from reconciler import log
from reconciler.adapters import fetch, zsync
from reconciler.adapters.gpg import read_keys
from reconciler.adapters.http import Server
from reconciler.agent import health
from reconciler.agent.config import AgentConfig, HealthConfig
from reconciler.agent.logcheck import LogClient
from reconciler.agent.metrics import AgentMetrics, DownloadMethod, PollResult
from reconciler.agent.state import MAX_SWITCH_TRIES, AgentState
from reconciler.agent.supervisor import App
from reconciler.agent.tufclient import StaleError, TufClient
from reconciler.core import tufroles
from reconciler.core import zsync as control
from reconciler.core.layout import AttestationKind, release_path, zsync_path
from reconciler.core.provenance import ATTESTATION_LIMIT
from reconciler.core.release import Artifact, Release, parse_release
from reconciler.core.trust import Downloaded, Expected, Pinned, Reason, RefusalError, TrustedState
from reconciler.core.tufrepo import entry_version, target_path
from reconciler.errors import (
    ConfigError,
    FetchError,
    FetchKind,
    ReconcilerError,
    VerificationError,
    internal_error,
)
from reconciler.ports import Clock, Fetcher

# A timestamp is a few hundred bytes; python-tuf allows 16 KiB.
TIMESTAMP_LIMIT = tufroles.TIMESTAMP_LIMIT

# The long-running agent looks at its app and its poll timer this often.
TICK = 1.0


class Agent:
    def __init__(
        self,
        cfg: AgentConfig,
        metrics: AgentMetrics | None = None,
        *,
        fetcher: Fetcher,
        clock: Clock,
        pinned_keys: Callable[[Sequence[bytes]], Sequence[Key]],
        probe: Callable[[HealthConfig], str],
    ) -> None:
        """The composition root (reconciler.wiring.open_agent) hands in the adapters."""
        self.cfg = cfg
        self.metrics = metrics or AgentMetrics()
        self.fetcher = fetcher
        self.clock = clock
        self._probe = probe
        self.releases = cfg.state_dir / "releases"
        self.current = cfg.state_dir / "current"
        try:
            self.releases.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                str(cfg.path), "state_dir", f"cannot create {self.releases}: {exc.strerror or exc}"
            ) from None
        self.state_file = cfg.state_dir / "state.json"
        self.state = AgentState.load(self.state_file)
        # The textfile's counters go on from where the last run left them.
        self.counters_file = cfg.state_dir / "counters.json"
        if cfg.metrics_file is not None:
            self.metrics.carry_over(_read_counters(self.counters_file))
        self.app = App(cfg.host, self.clock.monotonic, cfg.state_dir / "app.pid") if cfg.supervise else None
        # Held by a switch (stop, start, health check) and by the supervision of the
        # app between polls, which run in different threads.
        self._app_lock = threading.RLock()
        # Trust is pinned here, once: the first TUF root must be signed by these keys,
        # never by a key the store serves; read only when a first root is needed.
        keys = read_keys(list(cfg.keys))
        pinned: list[Sequence[Key]] = []

        def pinned_once() -> Sequence[Key]:
            if not pinned:
                pinned.append(pinned_keys(keys))
            return pinned[0]

        self._pinned_keys = pinned_once
        self.tuf = TufClient(
            fetcher,
            cfg.store,
            cfg.state_dir / "tuf",
            pinned_once,
            cfg.timeout,
            self._count,
        )
        if self.state.version:
            self.metrics.running_version.labels(cfg.host).set(self.state.version)
        self._told_unpublished = False
        self._log: LogClient | None = None
        # Set when the long-running agent is asked to stop (run): a health check under
        # way gives up, and its switch is abandoned, not judged.
        self._stopping = threading.Event()

    @property
    def log(self) -> LogClient | None:
        """The transparency log's check, with ``require_log``; its keys are read on
        first use."""
        if self.cfg.require_log and self._log is None:
            from reconciler.adapters.notes import OpenPgpNoteVerifier

            witnesses = (
                OpenPgpNoteVerifier(read_keys(list(self.cfg.log_witnesses)))
                if self.cfg.log_witnesses
                else None
            )
            self._log = LogClient(
                self._read,
                OpenPgpNoteVerifier(read_keys(list(self.cfg.keys))),
                witnesses,
                witnesses.fingerprints if witnesses is not None else frozenset(),
                self.cfg.state_dir / "log-checkpoint",
                self.cfg.log_origin,
            )
        return self._log

    def _read(self, key: str, limit: int) -> bytes | None:
        """A store object, None if the store has none."""
        try:
            got = self.fetcher.get(self._url(key), limit, timeout=self.cfg.timeout, count=self._count)
        except FetchError as exc:
            if exc.status in (403, 404):
                return None
            raise
        assert got is not None  # unconditional reads always answer
        return got.data

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
        return Pinned(
            self.cfg.host,
            self.cfg.format,
            self.state.version,
            frozenset(self.state.failed),
            require_provenance=self.cfg.require_provenance,
        )

    def _stale(self, why: str | None) -> None:
        """Note whether the store's metadata is stale (None: fresh); logged on change."""
        self.metrics.stale.set(1 if why else 0)
        if bool(why) != self.state.stale:
            self.state.stale = bool(why)
            self.state.save(self.state_file)
            if why:
                log.event(
                    "agent_stale", logging.WARNING, host=self.cfg.host, running=self.state.version, why=why
                )
            else:
                log.event("agent_fresh", host=self.cfg.host)

    # -- one poll ---------------------------------------------------------------

    def poll(self) -> PollResult:
        """Look for a newer release and switch to it; return the poll's result."""
        try:
            result = self._poll()
        except StaleError as exc:
            result = PollResult.STALE
            self._stale(str(exc))
        except RefusalError as exc:
            result = PollResult.REFUSED
            self.metrics.refusals.labels(exc.reason).inc()
            log.event("agent_refused", logging.WARNING, host=self.cfg.host, reason=exc.reason, error=str(exc))
        except _StopRequestedError:
            result = PollResult.ERROR  # logged where the switch was abandoned
        except (FetchError, VerificationError, OSError) as exc:
            # Nothing is switched; the same update is tried again at the next poll.
            result = PollResult.ERROR
            log.event("agent_poll_failed", logging.ERROR, host=self.cfg.host, error=str(exc))
        except Exception as exc:  # the loop must outlive a bug a store can trigger
            result = PollResult.ERROR
            log.event("agent_poll_crashed", logging.ERROR, host=self.cfg.host, error=internal_error(exc))
        self.metrics.polls.labels(result).inc()
        self.metrics.last_poll.set(self.clock.now().timestamp())
        if self.cfg.metrics_file is not None:
            _write_counters(self.counters_file, self.metrics.counters())
            write_to_textfile(str(self.cfg.metrics_file), self.metrics.registry)
        return result

    def _poll(self) -> PollResult:
        try:
            got = self.fetcher.get(
                self.tuf.timestamp_url, TIMESTAMP_LIMIT, self.state.validators, self.cfg.timeout, self._count
            )
        except FetchError as exc:
            if exc.status is not None and self.state.validators != fetch.Validators():
                # Refused as asked: the next read asks without them. A validator that
                # broke the request (one too long for the server's header limit, say)
                # would fail every poll from now on.
                self._remember(fetch.Validators())
            if exc.status != 404:
                raise
            # A bare 404 says nothing to someone setting up their first host.
            raise FetchError(
                f"the store {self.cfg.store} has no TUF metadata ({exc}): is `store` the root the "
                "daemon publishes to, and has it published anything yet?",
                kind=exc.kind,
                status=exc.status,
            ) from None
        if got is None:
            # Nothing changed in the store; what was trusted must still be in date.
            self._fresh()
            self._stale(None)
            return PollResult.IDLE
        # The timestamp's validators are remembered only once the refresh it starts is
        # through: after one garbled snapshot or bin, the next poll would be told "not
        # modified" and wait for a new timestamp, hours, with nothing stale to show.
        before = self.tuf.trusted_timestamp()
        info = self.tuf.target(target_path(self.cfg.host), got.data)
        after = self.tuf.trusted_timestamp()
        if before is not None and after is not None and after.signed.version == before.signed.version:
            self._fresh()  # the same timestamp sent whole: as stale as "not modified" is
        else:
            self._trusted_expiry()
        self._stale(None)
        if info is None:
            self._remember(got.validators)
            if self.state.version:
                return PollResult.CURRENT
            self._unpublished()
            return PollResult.UNPUBLISHED
        self._told_unpublished = False
        entry = info.hashes.get("sha256", "")
        if entry and entry == self.state.settled:
            # Refused or rolled back before: final for this entry; a new one gets a look.
            self._remember(got.validators)
            return PollResult.CURRENT
        trusted = TrustedState(self._pinned(), self.clock.now())
        try:
            latest = trusted.update_target(entry_version(info))
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
            release = self._trusted_release(trusted, info)
            if self.cfg.require_provenance:
                self._trusted_provenance(trusted, release)
            if self.log is not None:
                self.log.check(self.cfg.host, release.version, entry)
        except RefusalError as exc:
            if exc.reason is Reason.TAMPERED:
                # Bytes other than the signed ones are the store's or the network's
                # fault, not the release's: tried again, with the downloads' backoff.
                # Settled, one bad answer would keep the host off this release for good.
                version = entry_version(info)
                if version is not None:
                    self._download_failed(version)
            elif exc.reason is not Reason.NOT_IN_LOG:
                # A log that lags (a witness yet to co-sign, a mirror behind) gets
                # another look at the next poll; any other refusal is final for this entry.
                self.state.settled = entry
                self._remember(got.validators)
            raise
        try:
            self._install(trusted, release)
        except (RefusalError, FetchError, VerificationError, OSError):
            self._download_failed(latest.version)
            raise
        result = self._switch(release, entry)
        self._remember(got.validators)
        return result

    def _download_failed(self, version: int) -> None:
        """Count a failed try of ``version`` (the next is spaced out), kept across restarts."""
        self.state.download_failed(version)
        self.state.save(self.state_file)

    def _unpublished(self) -> None:
        """Say once (per process, and again after a release came) that this host has no
        release: the usual cause is a typo in ``host`` or a host the daemon has not built."""
        if self._told_unpublished:
            return
        self._told_unpublished = True
        log.event(
            "agent_unpublished",
            logging.WARNING,
            host=self.cfg.host,
            error=f"host {self.cfg.host} has no release in the store's TUF metadata (is the host name "
            "right? has the daemon published it?); nothing is installed",
        )

    def _fresh(self) -> None:
        """StaleError if the timestamp trusted now expired by this agent's clock."""
        expires = self._trusted_expiry()
        if expires is not None and expires <= self.clock.now():
            # The next read asks without validators, in case they are what keeps the
            # store's newer timestamp away ("not modified" since one of the future).
            self._remember(fetch.Validators())
            raise StaleError(f"the trusted TUF timestamp expired at {expires.isoformat()}")

    def _trusted_expiry(self) -> datetime | None:
        """When the trusted timestamp expires (also the metric), None before the first."""
        ts = self.tuf.trusted_timestamp()
        if ts is None:
            return None
        expires: datetime = ts.signed.expires
        self.metrics.metadata_expiry.set(expires.timestamp())
        return expires

    def _remember(self, validators: fetch.Validators) -> None:
        self.state.validators = validators
        self.state.save(self.state_file)

    def _trusted_release(self, trusted: TrustedState, info: TargetFile) -> Release:
        """releases/<N>.json, checked against the host's verified TUF entry."""
        assert trusted.latest is not None
        sha256 = info.hashes.get("sha256")
        if sha256 is None:
            raise RefusalError(Reason.MALFORMED, f"{info.path}: the entry has no sha256")
        key = release_path(self.cfg.host, trusted.latest.version)
        meta = self.fetcher.get(self._url(key), info.length, timeout=self.cfg.timeout, count=self._count)
        assert meta is not None  # unconditional reads always answer
        return trusted.update_release(meta.data, Expected(info.length, sha256))

    def _trusted_provenance(self, trusted: TrustedState, release: Release) -> None:
        """The provenance the trusted release names, checked against the pinned keys."""
        ref = release.attestation(AttestationKind.PROVENANCE)
        data = None
        if ref is not None:
            try:
                got = self.fetcher.get(
                    self._url(ref.path),
                    min(ref.size, ATTESTATION_LIMIT),
                    timeout=self.cfg.timeout,
                    count=self._count,
                )
            except FetchError as exc:
                if exc.kind is not FetchKind.TOO_LARGE:
                    raise
                # The release, which is trusted, says how long it is: other bytes.
                raise RefusalError(
                    Reason.TAMPERED, f"{ref.path}: larger than the {ref.size} bytes the release names"
                ) from None
            assert got is not None  # an unconditional read always answers
            data = got.data
        where = ref.path if ref is not None else release_path(self.cfg.host, release.version)
        attested = trusted.update_provenance(data, self._pinned_keys(), where)
        log.event(
            "agent_provenance",
            host=self.cfg.host,
            version=release.version,
            commit=release.commit,
            signed_by=attested.keyid,
        )

    def _install(self, trusted: TrustedState, release: Release) -> None:
        """Download, check and unpack ``release`` into releases/<N>, beside the old one."""
        art = release.artifact(self.cfg.format)
        assert art is not None  # the trusted release has one
        final = self.releases / str(release.version)
        work = Path(tempfile.mkdtemp(prefix=f".{release.version}.", dir=self.releases))
        try:
            where, dest = self._url(art.blob), work / art.name
            digest = self._zsync(art, dest)
            method = DownloadMethod.ZSYNC
            if digest is None:
                digest = self.fetcher.download(where, dest, art.size, self.cfg.timeout, self._count)
                method = DownloadMethod.FULL
            trusted.update_artifact(Downloaded(where, dest.stat().st_size, digest))
            self.metrics.artifact_downloads.labels(method).inc()
            dest.chmod(0o555)
            (work / "release.json").write_bytes(release.to_json())
            if final.exists():
                shutil.rmtree(final)
            os.replace(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        log.event(
            "agent_installed", host=self.cfg.host, version=release.version, artifact=art.name, method=method
        )

    def _zsync(self, art: Artifact, dest: Path) -> str | None:
        """Build ``dest`` with zsync from the running release; its sha256, or None
        when zsync cannot be used (logged when it was tried and failed)."""
        # Only AppImages have control files; zsync reads plain HTTP only.
        if (
            not self.cfg.zsync
            or art.format != "appimage"
            or not self.cfg.store.startswith("http://")
            or not zsync.available()
        ):
            return None
        seed = self._installed(self.state.version) if self.state.version else None
        if seed is None:
            return None
        where = self._url(zsync_path(art.blob))
        local = dest.with_name(dest.name + ".zsync")
        try:
            got = self.fetcher.get(
                where, control.size_limit(art.size), timeout=self.cfg.timeout, count=self._count
            )
            assert got is not None  # unconditional reads always answer
            # The store's control file, pointed at the blob the signed release names.
            local.write_bytes(control.parse(got.data, art.size, where).with_url(self._url(art.blob)))
            fetched = zsync.sync(seed, local, dest, self.cfg.timeout)
            self._count(fetched)
            with dest.open("rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
            if digest != art.sha256:
                raise VerificationError(f"zsync built other bytes than {art.blob} (sha256 {digest})")
        except (FetchError, VerificationError, OSError) as exc:
            dest.unlink(missing_ok=True)
            # No control file: a release from before them, or published without one.
            if not isinstance(exc, FetchError) or exc.status != 404:
                log.event(
                    "agent_zsync_failed",
                    logging.WARNING,
                    host=self.cfg.host,
                    artifact=art.name,
                    error=str(exc),
                )
            return None
        finally:
            for leftover in local, dest.with_name(dest.name + ".part"), dest.with_name(dest.name + ".zs-old"):
                leftover.unlink(missing_ok=True)
        log.event("agent_zsync", host=self.cfg.host, artifact=art.name, fetched=fetched, size=art.size)
        return digest

    def _point_current(self, version: int) -> None:
        """Flip ``current`` to releases/<version> with one rename: never missing, never half."""
        tmp = self.current.with_name("current.tmp")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(Path("releases") / str(version))
        os.replace(tmp, self.current)

    def _switch(self, release: Release, entry: str) -> PollResult:
        with self._app_lock:
            return self._switch_to(release, entry)

    def _switch_to(self, release: Release, entry: str) -> PollResult:
        """Switch to ``release`` (named by the TUF entry of sha256 ``entry``), or back.
        The switch is noted in the state before ``current`` moves and its outcome before
        anything else runs, so that an agent killed at any point finds out at its next
        start what it was doing (_recover)."""
        version = release.version
        old = self.state.version
        art = release.artifact(self.cfg.format)
        assert art is not None
        self.state.begin_switch(version, art.sha256, entry)
        self.state.save(self.state_file)
        self._point_current(version)
        try:
            failure = self._activate(version)
        except _StopRequestedError:
            # Told to stop before the check decided: the release is not to blame. The
            # switch is undone, and the next start makes it again.
            self.state.end_switch()
            self.state.save(self.state_file)
            if old:
                self._point_current(old)
            else:
                self.current.unlink(missing_ok=True)
            log.event(
                "agent_switch_abandoned", logging.WARNING, host=self.cfg.host, version=version, back_to=old
            )
            # Up through the poll, which then keeps nothing of this timestamp's: the next
            # start reads it again and takes the release.
            raise
        if failure is None:
            self.state.previous, self.state.version = old, version
            self.state.end_switch()
            self.state.save(self.state_file)
            self.metrics.updates.inc()
            self.metrics.running_version.labels(self.cfg.host).set(version)
            log.event("agent_switched", host=self.cfg.host, version=version, previous=old)
            self._prune()
            return PollResult.UPDATED
        # Kept before the old release is started again: a kill during the rollback
        # must not leave the failure to be found out once more.
        self.state.refuse(art.sha256, entry)
        self.state.end_switch()
        self.state.save(self.state_file)
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
            self._start_again(old)
        else:
            self.current.unlink(missing_ok=True)
            if self.app is not None:
                self.app.stop()
        return PollResult.ROLLED_BACK

    def _start_again(self, version: int) -> None:
        """Activate ``version`` again, a release given up for it (a rollback); said
        when it is not healthy either."""
        again = self._activate(version)
        if again is not None:
            log.event(
                "agent_rollback_unhealthy", logging.ERROR, host=self.cfg.host, version=version, reason=again
            )

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
        asked = [False]  # whether the stop was seen

        def down() -> str | None:
            # Told to stop: one probe more, at once (an app coming up may be well
            # now), then the check gives up.
            if self._stopping.is_set():
                if asked[0]:
                    raise _StopRequestedError
                asked[0] = True
            return app.failure() if app is not None else None

        return health.wait_healthy(self.cfg.health, self.clock, down, self._probe)

    def _prune(self) -> None:
        """Keep the newest ``keep`` releases, and always the current and previous ones."""
        installed = sorted(
            int(d.name) for d in self.releases.iterdir() if d.name.isascii() and d.name.isdigit()
        )
        keep = set(installed[-self.cfg.keep :]) | {self.state.version, self.state.previous}
        for v in installed:
            if v not in keep:
                shutil.rmtree(self.releases / str(v), ignore_errors=True)

    # -- one agent per state directory, and what a killed one left ------------------

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """This process's claim on the state directory while it polls or runs: a second
        agent on it would start a second app, and each would write over the other's
        state (one's rollback blamed the release for the other's port). Once claimed,
        what an agent killed before left behind is put right (_recover)."""
        path = self.cfg.state_dir / "agent.lock"
        with path.open("a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read(20).strip()
                raise ReconcilerError(
                    f"{self.cfg.state_dir} is in use by another agent (pid {holder or 'unknown'}); "
                    "one agent runs per state directory"
                ) from None
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            self._recover()
            yield

    def _recover(self) -> None:
        """Put right what an agent killed mid-way left: the app it started, downloads
        it did not finish, a switch it did not decide (tried again, up to
        MAX_SWITCH_TRIES begun in all; then its release counts as failed), and
        ``current`` where the state says the host runs."""
        if self.app is not None:
            self.app.stop_orphan()
        for leftover in self.releases.iterdir():
            if leftover.name.startswith(".") and leftover.is_dir():
                shutil.rmtree(leftover, ignore_errors=True)
        self.current.with_name("current.tmp").unlink(missing_ok=True)
        st = self.state
        if st.switching:
            final = st.switching_tries >= MAX_SWITCH_TRIES
            log.event(
                "agent_switch_interrupted",
                logging.WARNING,
                host=self.cfg.host,
                version=st.switching_version,
                tries=st.switching_tries,
                outcome="failed" if final else "tried again",
            )
            if final:
                st.refuse(st.switching, st.switching_entry)
                st.end_switch()
                self.metrics.rollbacks.inc()
            st.save(self.state_file)
        if st.version and self._installed(st.version) is None:
            # What runs cannot be started again from here: it is installed afresh, as
            # a first release is, from what the store names.
            log.event("agent_release_damaged", logging.WARNING, host=self.cfg.host, version=st.version)
            shutil.rmtree(self.releases / str(st.version), ignore_errors=True)
            # The timestamp is read whole again: unchanged, it still names that release.
            st.version, st.validators = 0, fetch.Validators()
            st.save(self.state_file)
        where = Path("releases") / str(st.version)
        if not st.version:
            self.current.unlink(missing_ok=True)
        elif not self.current.is_symlink() or Path(os.readlink(self.current)) != where:
            log.event("agent_current_restored", logging.WARNING, host=self.cfg.host, version=st.version)
            self._point_current(st.version)
            if self.cfg.activate is not None and not st.switching:
                # The command last ran for the release given up: it runs for this one
                # again, as a rollback's does. (One to be tried again is activated by the
                # switch that tries it.) A supervised app starts from ``current`` anyway.
                self._start_again(st.version)

    def _installed(self, version: int) -> Path | None:
        """Release ``version``'s artifact, if the release is installed whole: its
        release file reads, and its artifact is a file as large as the release says."""
        d = self.releases / str(version)
        try:
            art = parse_release((d / "release.json").read_bytes(), str(d / "release.json")).artifact(
                self.cfg.format
            )
            if art is None:
                return None
            found = (d / art.name).stat()
        except (OSError, VerificationError):
            return None
        return d / art.name if stat.S_ISREG(found.st_mode) and found.st_size == art.size else None

    # -- the long-running agent -------------------------------------------------

    def run(self, stopping: threading.Event) -> None:
        """Poll every interval until ``stopping``; with ``supervise``, keep the app
        running meanwhile: polls run in a thread of their own, so a slow store delays
        updates, never a restart of the app."""
        self._stopping = stopping
        with self.hold():
            self._run(stopping)

    def _run(self, stopping: threading.Event) -> None:
        server = None
        if self.cfg.listen is not None:
            server = Server(self.cfg.listen, self.metrics.registry, lambda: (True, "ok"), self._ready)
            server.start()
        if self.cfg.supervise:
            log.event(
                "agent_start",
                host=self.cfg.host,
                store=self.cfg.store,
                version=self.state.version,
                runs="supervise",
            )
        elif self.cfg.activate is not None:
            log.event(
                "agent_start",
                host=self.cfg.host,
                store=self.cfg.store,
                version=self.state.version,
                runs="activate",
            )
        else:
            log.event(
                "agent_start",
                logging.WARNING,
                host=self.cfg.host,
                store=self.cfg.store,
                version=self.state.version,
                runs="nothing",
                note="neither supervise nor activate is set: releases are installed, nothing runs them",
            )
        done = threading.Event()
        poller = threading.Thread(target=self._poll_loop, args=(stopping, done), name="poll", daemon=True)
        poller.start()
        try:
            while not stopping.is_set() and not done.is_set():
                self._supervise()
                stopping.wait(TICK)
        finally:
            stopping.set()
            # Every read has a deadline: a poll in flight ends within a few of them.
            poller.join(self.cfg.timeout * 4)
            with self._app_lock:
                if self.app is not None:
                    self.app.stop()
            if server is not None:
                server.stop()
            log.event("agent_stop", host=self.cfg.host)

    def _poll_loop(self, stopping: threading.Event, done: threading.Event) -> None:
        try:
            while not stopping.is_set():
                self.poll()
                stopping.wait(self.cfg.poll_interval)
        finally:
            done.set()

    def _supervise(self) -> None:
        """Restart the app when it exited (with backoff), unless a switch holds it."""
        if self.app is None or not self._app_lock.acquire(blocking=False):
            return
        try:
            if self.state.version and not self.app.running():
                if self.app.proc is not None:
                    self.app.exited()
                if self.app.restart_due():
                    self.app.start(self.current / self.artifact(self.state.version).name)
        finally:
            self._app_lock.release()

    def _ready(self) -> tuple[bool, str]:
        return (True, "ok") if self.state.version else (False, "no release installed yet")


class _StopRequestedError(Exception):
    """The agent was told to stop while a switch's health check was under way."""


def _read_counters(path: Path) -> dict[str, float]:
    """What _write_counters left; nothing (counters from 0) if it is missing or unreadable."""
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(doc, dict):
        return {}
    return {k: float(v) for k, v in doc.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _write_counters(path: Path, totals: Mapping[str, float]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(totals, sort_keys=True) + "\n")
    tmp.replace(path)
