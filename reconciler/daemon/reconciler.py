"""The reconcile loop, written as a controller: observe, diff, act, record.

observe: fetch the config repo, parse host definitions, evaluate the fleet in Nix;
diff:    compare each host's image derivation with the one it was published from;
act:     build, sign and publish the hosts that differ, in a bounded worker pool;
record:  persist the outcome in the state database and in metrics.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import shutil
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime
from enum import Enum
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from reconciler import __version__, log
from reconciler.config import Config
from reconciler.core import zsync
from reconciler.core.appc import discovery_page
from reconciler.core.appimage import update_information
from reconciler.core.builders import LOCAL, Sandbox
from reconciler.core.events import Event, EventQuery, EventType, Scalar, summary
from reconciler.core.formats import Kind
from reconciler.core.hosts import Host
from reconciler.core.layout import (
    PUBLISHER_KEY,
    discovery_page_path,
    latest_path,
    release_path,
    update_path,
    zsync_path,
)
from reconciler.core.model import (
    COMMIT_KEY,
    FETCH_ERROR_KEY,
    LAST_PASS_KEY,
    LAST_SUCCESS_KEY,
    SANDBOX_KEY,
    SOURCE_ERROR_KEY,
    Action,
    BuildOutput,
    FetchFailure,
    HostState,
    PassRecord,
    PassResult,
    Status,
    Suspensions,
    next_retry,
)
from reconciler.core.plan import HostPlan, Plan, retry_delay, suspended_fleet
from reconciler.core.provenance import BuildRecord, Reproducibility, ReproStatus
from reconciler.core.release import RELEASE_LIMIT, Artifact, Release, new_release, parse_release
from reconciler.core.reproducibility import CheckResult, refusal
from reconciler.core.tufroles import RoleName
from reconciler.core.versions import MAX_TAKEN, Adopt, Decision, Taken, decide, first_candidate
from reconciler.daemon import history
from reconciler.daemon.attest import attest
from reconciler.daemon.gate import CommitRefusedError
from reconciler.daemon.gc import collect
from reconciler.daemon.lease import PublisherLease
from reconciler.daemon.metrics import Metrics
from reconciler.daemon.observer import Observation, Observer
from reconciler.daemon.preflight import sandbox_verdict
from reconciler.daemon.publish import publish
from reconciler.errors import (
    BuildError,
    ConfigError,
    IncompleteReleaseError,
    LeaseLostError,
    NotReproducibleError,
    ReconcilerError,
    SigningError,
    StoreError,
    TufError,
    VerificationError,
)
from reconciler.ports import Clock, Ledger, Ports, Signer, Source, holds
from reconciler.ports import EventLog as EventLogPort
from reconciler.ports import Nix as NixPort

if TYPE_CHECKING:
    # Types only: python-tuf (and boto3 through securesystemslib) is imported by whoever
    # opens the repository (reconciler.wiring), never by a plan.
    from securesystemslib.signer import Signer as MetadataSigner
    from tuf.api.metadata import Metadata

    from reconciler.daemon.tlog import TransparencyLog
    from reconciler.daemon.tuf import KeyChange, Metadatas, TufRepository

# How a pass opens its TUF repository, given how to get the online signing key.
OpenTuf = Callable[[Callable[[], "MetadataSigner"]], "TufRepository"]
# How a pass opens the store's transparency log, given how to get the signing key.
OpenLog = Callable[[Callable[[], Signer]], "TransparencyLog"]


@dataclass(frozen=True)
class HostOutcome:
    """What acting on one host came to; recorded with the rest of the pass in
    Reconciler._record."""

    host: str
    ok: bool
    image: str  # the image derivation acted on
    version: int | None = None
    error: str | None = None
    artifacts: tuple[str, ...] = ()
    published_at: float | None = None  # unix time
    adopted: bool = False  # the release was in the store already (core.versions.Adopt)
    seconds: float | None = None  # acting on the host took this long
    build_seconds: float | None = None  # of which the build
    builder: str | None = None  # where Nix built it (None: nothing was built)


@dataclass(frozen=True)
class ReconcileResult:
    plan: Plan
    outcomes: tuple[HostOutcome, ...]

    # Why the TUF metadata could not be brought up to date, or None.
    metadata_error: str | None = None
    # Hosts to rebuild that were not started: the daemon was asked to stop, or lost
    # the publisher lease.
    interrupted: tuple[str, ...] = ()
    # The whole fleet is suspended: the pass fetched nothing and only kept the TUF
    # metadata fresh (the plan holds the recorded hosts, each suspended).
    fleet_suspended: bool = False
    # Another daemon holds the store's publisher lease: this pass observed and
    # planned, and built, signed and published nothing.
    standby: bool = False

    @property
    def ok(self) -> bool:
        """Every host is as its definition says: what `reconcile` exits 0 for."""
        return (
            self.succeeded
            and not self.fleet_suspended
            and not self.plan.with_action(Action.INVALID)
            and not self.plan.with_action(Action.BACKOFF)
        )

    @property
    def succeeded(self) -> bool:
        """Everything this pass tried worked: its builds, publications and the metadata.
        A host whose definition is invalid, or that waits out a backoff, does not fail
        the pass that leaves it alone (reconciler_host_failing says which hosts are)."""
        return self.metadata_error is None and all(o.ok for o in self.outcomes) and not self.interrupted


@dataclass(frozen=True)
class _Published:
    """What _build_and_publish did for a host, for its HostOutcome."""

    release: Release
    adopted: bool
    build_seconds: float
    builder: str | None


class Skipped(Enum):
    """Why a pass did not start a host it planned to rebuild."""

    STOPPING = "stopping"
    SUSPENDED = "suspended"


# Derivations the gate found reproducible, remembered by a daemon process (their output
# paths do not change): a host sharing them with one checked before is not built again
# for them. Bounded: an attacker's commits must not grow the daemon without limit.
REPRODUCED_CACHE = 4096


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class _Behind(NamedTuple):
    """A host the store has a newer release of than the ledger records."""

    version: int
    why: str  # the plan's reason for rebuilding it (and adopting that release)


class Reconciler:
    """The pass over its ports (reconciler.ports); reconciler.wiring builds one from a
    Config with the real adapters."""

    def __init__(
        self,
        cfg: Config,
        ports: Ports,
        metrics: Metrics | None = None,
        tuf: OpenTuf | None = None,
        lease: PublisherLease | None = None,
        tlog: OpenLog | None = None,
    ) -> None:
        """``tuf`` opens the store's TUF repository; without one the pass can plan
        but not publish. ``lease``: the store's publisher lease,
        which a pass holds before it writes (``ports.store`` checks it before every
        write, reconciler.daemon.lease.FencedStore); None: this is the only publisher.
        ``tlog`` opens the store's transparency log (writing through the same fenced
        store); without one, releases are published unlogged."""
        self.metrics = metrics or Metrics()
        self._events = ports.events
        # Observes and plans; holds the config and the ports the two halves share.
        self.observer = Observer(
            cfg, ports.source, ports.nix, ports.ledger, ports.gate, ports.clock, self.metrics, self._emit
        )
        self.store = ports.store
        self._open_signer = ports.signer
        self.packager = ports.packager
        self._sandbox_verdict: str | None = None
        self._signer: Signer | None = None
        self._pass_lock = threading.Lock()
        self._stopping = threading.Event()
        self._last_gc = self.clock.monotonic()
        self._key_published = False
        self._page_published = False
        self._store_recovered = False
        # The suspensions the last pass honoured, to log what changed since.
        self._suspensions = Suspensions()
        self._tuf = tuf(lambda: self.signer.metadata_signer()) if tuf is not None else None
        self.lease = lease
        # The hosts the store has a newer release of than the ledger records: after
        # this process won the lease from another daemon (_catch_up), or found its
        # ledger behind the TUF metadata (_check_listed). Host -> that version, and
        # why it is rebuilt.
        self._behind: dict[str, _Behind] = {}
        self._catching_up = False
        # Whether this process compared its ledger with the store's TUF metadata yet.
        self._listed_checked = False
        self.tlog = tlog(lambda: self.signer) if tlog is not None else None
        # The reproducibility gate's derivations found reproducible (insertion order: oldest first).
        self._reproduced: dict[str, None] = {}
        self._reproduced_lock = threading.Lock()
        self.metrics.watch(self.state, self._tuf, cfg.repo.branch)
        self.metrics.watch_lease(lease)
        self.metrics.known_builders([LOCAL, *(b.name for b in cfg.builders)])

    @property
    def cfg(self) -> Config:
        return self.observer.cfg

    @cfg.setter
    def cfg(self, cfg: Config) -> None:
        # A reload (reconciler.daemon.loop) reaches the observation too: retry.max.
        self.observer.cfg = cfg

    @property
    def nix(self) -> NixPort:
        return self.observer.nix

    @nix.setter
    def nix(self, nix: NixPort) -> None:
        self.observer.nix = nix

    @property
    def source(self) -> Source:
        return self.observer.source

    @property
    def state(self) -> Ledger:
        return self.observer.state

    @property
    def clock(self) -> Clock:
        return self.observer.clock

    @property
    def tuf(self) -> TufRepository:
        if self._tuf is None:
            raise ReconcilerError("this pass has no TUF repository: it can plan, not publish")
        return self._tuf

    @property
    def signer(self) -> Signer:
        if self._signer is None:
            try:
                self._signer = self._open_signer()
            except SigningError:
                self.metrics.signing_failures.inc()
                raise
        return self._signer

    def check_sandbox(self) -> str:
        """Refuse to build with a Nix that would build unsandboxed, unless the config
        opts out explicitly; once per process, by a probe build (a setting can be
        overridden by a Nix daemon, a probe cannot). What it found, in one line."""
        if self._sandbox_verdict is not None:
            return self._sandbox_verdict
        sandboxed = self.nix.probe_sandbox(self.cfg.signing.gnupghome)
        self.metrics.build_sandbox.set(1 if sandboxed else 0)
        self.state.set_meta(SANDBOX_KEY, "on" if sandboxed else "off")
        try:
            verdict = sandbox_verdict(self.cfg, sandboxed)
        except ConfigError:
            log.event("sandbox_missing", logging.ERROR)
            raise
        if sandboxed:
            log.event("sandbox_probe", sandbox="on")
        else:
            log.event("sandbox_off", logging.WARNING, reason="nix.sandbox: false in the config")
        self._sandbox_verdict = verdict
        return verdict

    def close(self) -> None:
        """Release the publisher lease (the next daemon takes over at once) and close."""
        if self.lease is not None:
            self.lease.close()
        self.observer.close()
        if self._events is not None:
            self._events.close()

    def record_event(
        self, type: EventType, host: str | None = None, error: str | None = None, **data: Scalar
    ) -> None:
        """Record an event in the history (and notify whoever wants it), now."""
        self._emit(Event(type, self.clock.now().timestamp(), host=host, error=error, data=data))

    def history(self, q: EventQuery) -> list[Event]:
        """The recorded events ``q`` asks for, oldest first (none without a history)."""
        return [] if self._events is None else self._events.query(q)

    @property
    def events(self) -> EventLogPort | None:
        """Where the pass records its events (and, through it, notifies)."""
        return self._events

    @events.setter
    def events(self, events: EventLogPort | None) -> None:
        # One assignment: a webhook's thread recording a refusal meanwhile uses the old
        # or the new one, never half of either.
        self._events = events

    def _emit(self, *events: Event) -> None:
        if self._events is not None:
            self._events.record(*events)

    # -- observe ---------------------------------------------------------------

    def observe(self) -> Observation:
        return self.observer.observe()

    def check_head(self, commit: str) -> None:
        """Build nothing from a head commit the commit gate refuses (reconciler.gate);
        every path that builds passes through here."""
        self.observer.check_head(commit)

    # -- diff ------------------------------------------------------------------

    def plan(self, respect_backoff: bool = True) -> tuple[Observation, Plan]:
        obs = self.observe()
        if self._catching_up:
            self._catch_up(obs)
        if not self._listed_checked:
            self._check_listed(obs)
        return obs, self._plan_of(obs, self.clock.now().timestamp() if respect_backoff else None)

    def _plan_of(self, obs: Observation, now: float | None) -> Plan:
        plan = self.observer.plan_of(obs, self._recorded(), now)
        behind = dict(self._behind)  # a pass may change it while the page plans
        if behind:
            plan = replace(
                plan,
                entries=tuple(
                    replace(e, reasons=(behind[e.host].why,))
                    if e.host in behind and e.action == Action.REBUILD
                    else e
                    for e in plan.entries
                ),
            )
        return plan

    def next_plan(self) -> Plan | None:
        """What the next pass would do if the head stays where the last pass found it:
        that pass's observation planned against the ledger as it is now (the fleet
        page). Nothing is fetched or evaluated, and no lock is taken: a pass running
        meanwhile is seen as far as it has recorded. None before any pass observed."""
        last = self.observer.last
        if last is None:
            return None
        return self._plan_of(last, self.clock.now().timestamp())

    def _recorded(self) -> Mapping[str, HostState]:
        """The ledger's hosts, with those another daemon published since (``_behind``)
        at the store's version and no known image: the plan rebuilds them, and the
        version decision adopts the release it finds (core.versions)."""
        hosts = dict(self.state.hosts())
        # A copy: the fleet page plans from another thread while a pass changes it.
        for name, (version, _) in dict(self._behind).items():
            prev = hosts.get(name)
            hosts[name] = (
                replace(prev, version=version, image=None)
                if prev is not None
                else HostState(name, version, None, None, Status.PUBLISHED, None, 0.0)
            )
        return hosts

    def _catch_up(self, obs: Observation) -> None:
        """After winning the lease from another daemon: which hosts of the fleet the
        store has a newer latest.json for than this ledger says. Once per takeover,
        one read per host; until each is published (adopted) again, the TUF metadata
        lists the store's version, never this ledger's older one."""
        recorded = self.state.hosts()
        behind = {}
        for name in sorted(obs.fleet.hosts):
            latest = self._in_store(name)
            prev = recorded.get(name)
            if latest is not None and latest.version > (prev.version if prev is not None else 0):
                why = f"published by another daemon (version {latest.version}) while this one stood by"
                behind[name] = _Behind(latest.version, why)
        self._behind = behind
        self._catching_up = False
        if behind:
            log.event("lease_catch_up", hosts=len(behind))

    def _check_listed(self, obs: Observation) -> None:
        """Once per process: the hosts of the fleet that the store's TUF metadata lists
        at a newer release than this ledger records, as after a ledger lost or restored
        from a backup, are caught up as after a takeover (_behind). Else a host whose
        build fails would drop out of the metadata, and one the old ledger knew at an
        older release would be listed at it: hosts would be offered a rollback."""
        if self._tuf is None:
            return
        try:
            listed = self._tuf.listed()
        except (TufError, StoreError, SigningError) as exc:
            log.event("tuf_failed", logging.ERROR, error=str(exc))
            return  # the pass's own sync says so too; compared again next pass
        self._listed_checked = True
        recorded = self.state.hosts()
        defined = obs.fleet.hosts.keys() | obs.fleet.invalid
        behind = {}
        for name, version in listed.items():
            prev = recorded.get(name)
            caught_up = self._behind.get(name)
            if name in defined and version > max(
                prev.version if prev is not None else 0, caught_up.version if caught_up is not None else 0
            ):
                behind[name] = _Behind(
                    version, f"the store lists version {version}, newer than this ledger records"
                )
        if behind:
            self._behind.update(behind)
            log.event("ledger_behind_store", logging.WARNING, hosts=len(behind), first=min(behind))

    # -- act and record --------------------------------------------------------

    def reconcile(self, respect_backoff: bool = True, standby: bool = True) -> ReconcileResult:
        """One pass. Raises only when nothing could be observed.

        Hosts whose last build failed wait out their backoff unless
        ``respect_backoff`` is false (an operator's one-shot pass retries at once).
        When another daemon holds the store's publisher lease, the pass observes and
        plans only (``standby``, the daemon), or waits for the lease to lapse and
        raises LeaseHeldError once its holder renews it (a one-shot command).
        """
        with self.exclusive():
            suspended = self._note_suspensions()
            if suspended.fleet is not None:
                started = self.clock.monotonic()
                result = self._fleet_suspended()
                self._record_pass(
                    PassResult.SUSPENDED, started, result.plan.commit or None, result.metadata_error
                )
                return result
            started = self.clock.monotonic()
            active = False
            try:
                self.check_sandbox()
                active = self._hold_lease(wait=not standby)
                if active:
                    try:
                        self._recover_store()
                    except StoreError as exc:
                        # Leftovers are invisible to readers: publish anyway, sweep next pass.
                        log.event("store_recover_failed", logging.WARNING, error=str(exc))
                result = self._reconcile(respect_backoff, active)
            except ReconcilerError as exc:
                self.metrics.reconcile_runs.labels("failure").inc()
                seconds = self.clock.monotonic() - started
                self._emit(history.pass_failed(exc, seconds, self.clock.now().timestamp()))
                commit = exc.commit if isinstance(exc, CommitRefusedError) else None
                self._record_pass(PassResult.FAILURE, started, commit, str(exc))
                # What was published stays fresh while the source cannot be read.
                if active and self._publishing and self.tuf.exists():
                    self.sync_metadata()
                raise
            finally:
                self.metrics.reconcile_duration.observe(self.clock.monotonic() - started)
            if result.standby:
                self.metrics.reconcile_runs.labels("standby").inc()
                self._record_pass(PassResult.STANDBY, started, result.plan.commit, None)
                assert self.lease is not None
                log.event(
                    "reconcile_standby",
                    commit=result.plan.commit,
                    rebuild=len(result.plan.with_action(Action.REBUILD)),
                    lease=self.lease.status().describe(),
                )
                return result
            self.metrics.reconcile_runs.labels("success" if result.succeeded else "failure").inc()
            if result.succeeded:
                self.state.set_meta(LAST_SUCCESS_KEY, repr(self.clock.now().timestamp()))
            self._record_pass(
                PassResult.SUCCESS if result.succeeded else PassResult.FAILURE,
                started,
                result.plan.commit,
                None if result.succeeded else _why_failed(result),
            )
            seconds = self.clock.monotonic() - started
            log.event(
                "reconcile_done",
                commit=result.plan.commit,
                ok=result.ok,
                rebuilt=sum(o.ok for o in result.outcomes),
                failed=sum(not o.ok for o in result.outcomes),
                invalid=len(result.plan.with_action(Action.INVALID)),
                seconds=round(seconds, 3),
            )
            self._emit(history.pass_finished(result, seconds, self.clock.now().timestamp()))
            interval = self.cfg.retention.interval
            if interval and self.clock.monotonic() - self._last_gc >= interval:
                try:
                    self._collect(dry_run=False, on_delete=lambda key: None)
                except StoreError as exc:
                    # What was published stands; collection is tried again next interval.
                    log.event("gc_failed", logging.ERROR, error=str(exc))
            return result

    def _record_pass(self, result: PassResult, started: float, commit: str | None, error: str | None) -> None:
        """The pass that ends now, for `reconciler status` (the last pass, its result)."""
        record = PassRecord(
            self.clock.now().timestamp(),
            result,
            round(self.clock.monotonic() - started, 3),
            commit,
            None if error is None else summary(error),
        )
        self.state.set_meta(LAST_PASS_KEY, record.to_json())

    def _note_suspensions(self) -> Suspensions:
        """The suspensions now in the ledger; each one begun or lifted since the last
        pass is logged (the CLI that wrote it logs too, but on the operator's terminal)."""
        now, before = self.state.suspensions(), self._suspensions
        if (now.fleet is None) != (before.fleet is None):
            log.event("fleet_suspended" if now.fleet is not None else "fleet_resumed")
        for host in sorted(now.hosts.keys() - before.hosts.keys()):
            log.event("host_suspended", host=host)
        for host in sorted(before.hosts.keys() - now.hosts.keys()):
            log.event("host_resumed", host=host)
        self._suspensions = now
        return now

    def _fleet_suspended(self) -> ReconcileResult:
        """A pass over a suspended fleet: nothing is fetched, built or recorded, but
        what was published stays served, so the TUF metadata is re-signed when due."""
        # Only the publisher signs: a standby's fleet is suspended as well, by the ledger
        # of its own state directory, and leaves the metadata to the lease's holder.
        publishing = self._hold_lease(wait=False) if self.tuf.exists() else False
        error = self.sync_metadata() if publishing else None
        plan = suspended_fleet(self.state.get_meta(COMMIT_KEY) or "", self.state.hosts())
        log.event("reconcile_suspended", hosts=len(plan.entries))
        return ReconcileResult(plan, (), metadata_error=error, fleet_suspended=True)

    @property
    def _publishing(self) -> bool:
        """Whether this process may write to the store: it holds the lease, or has none."""
        return self.lease is None or self.lease.held

    def _hold_lease(self, wait: bool) -> bool:
        """Acquire or renew the store's publisher lease (under the pass lock): whether
        this process publishes. ``wait``: see PublisherLease.acquire."""
        if self.lease is None:
            return True
        if not self.lease.acquire(wait=wait):
            return False
        handover, previous = self.lease.take_handover()
        if handover:
            # Another daemon may have written the store since this process last did:
            # its TUF metadata is read again, leftovers of its writes are swept, and
            # the next plan catches up with the hosts it published.
            self._catching_up = True
            self._store_recovered = False
            if self._tuf is not None:
                self._tuf.forget()
            log.event("lease_handover", previous=previous.name if previous is not None else "")
        return True

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        """Hold the pass lock: one pass or garbage collection at a time, in this
        process and, through a lock file in the state directory, in any other."""
        with self._pass_lock, (self.cfg.state_dir / "pass.lock").open("w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    @contextlib.contextmanager
    def leased(self) -> Iterator[None]:
        """The pass lock and the publisher lease, for a command that writes to the
        store outside a pass (`reconciler log cosign`): its writes are fenced too."""
        with self.exclusive():
            self._hold_lease(wait=True)
            yield

    def load_tuf(self) -> Metadatas:
        """The store's TUF metadata (`reconciler keys list`): only read, unless the store
        has none yet and it is created, which takes the publisher lease like a pass."""
        with self.exclusive():
            if not self.tuf.exists():
                self._hold_lease(wait=True)
            return self.tuf.load()

    def change_keys(
        self, role: RoleName, change: KeyChange, signers: Mapping[str, MetadataSigner]
    ) -> Metadata[Any]:
        """A TUF key change (reconciler.core.tufrepo), signed by ``signers``; under the
        pass lock, so no pass signs metadata meanwhile."""
        with self.exclusive():
            self._hold_lease(wait=True)
            changed = self.tuf.change_keys(role, change, signers)
            log.event("tuf_keys_changed", role=role, version=changed.signed.version)
            return changed

    def collect_garbage(self, dry_run: bool, on_delete: Callable[[str], None]) -> list[str]:
        """Delete releases beyond retention.keep and blobs nothing kept refers to."""
        with self.exclusive():
            if not dry_run:
                self._hold_lease(wait=True)
            keys = self._collect(dry_run, on_delete)
            if not dry_run:
                self._recover_store()
            return keys

    def _recover_store(self) -> None:
        """Remove what writes killed mid-way left in the store (temporary files,
        unfinished multipart uploads): once per process, under the pass lock.

        A store has one publisher (versions strictly increasing need that), and
        the pass lock keeps every other pass of it out, so nothing left over can
        belong to a write still running. A write that fails in a live process
        cleans up after itself.
        """
        if self._store_recovered:
            return
        # What a killed pass left while sealing AppImages (reconciler._build_and_publish).
        for work in self.cfg.state_dir.glob("publish-*"):
            shutil.rmtree(work, ignore_errors=True)
        removed = self.store.sweep()
        if removed:
            log.event("store_recovered", removed=len(removed), leftovers=",".join(removed))
        self._store_recovered = True

    def _collect(self, dry_run: bool, on_delete: Callable[[str], None]) -> list[str]:
        # Under the pass lock: a blob uploaded by a publish whose release file is not
        # written yet would look unreferenced.
        self._last_gc = self.clock.monotonic()
        keys = collect(self.store, self.cfg.retention.keep, dry_run, on_delete)
        if not dry_run:
            self.metrics.gc_deleted.inc(len(keys))
        log.event("gc_done", deleted=len(keys), dry_run=dry_run, keep=self.cfg.retention.keep)
        return keys

    def _reconcile(self, respect_backoff: bool, active: bool = True) -> ReconcileResult:
        obs, plan = self.plan(respect_backoff)
        if not active:
            return ReconcileResult(plan, (), standby=True)
        log.event(
            "reconcile_start",
            commit=obs.commit,
            hosts=len(obs.fleet.hosts),
            rebuild=len(plan.with_action(Action.REBUILD)),
        )
        todo = plan.with_action(Action.REBUILD)
        self._emit(history.pass_started(obs, len(todo), self.clock.now().timestamp()))
        self.metrics.build_queue_depth.set(len(todo))
        with ThreadPoolExecutor(max_workers=self.cfg.jobs, thread_name_prefix="build") as pool:
            acted = tuple(pool.map(lambda e: self._act(e, obs), todo))
        outcomes = tuple(o for o in acted if isinstance(o, HostOutcome))
        interrupted = tuple(e.host for e, o in zip(todo, acted, strict=True) if o is Skipped.STOPPING)
        if interrupted:
            why = "stopping" if self._publishing else "publisher lease lost"
            log.event("reconcile_interrupted", not_started=len(interrupted), reason=why)
        left = [e.host for e, o in zip(todo, acted, strict=True) if o is Skipped.SUSPENDED]
        if left:
            # Suspended while the pass waited to build them: left as they are.
            plan = plan.suspend(left, self.state.suspensions())
            for host in left:
                log.event("host_left_suspended", host=host)
        self._record(obs, plan, outcomes)
        for host in [o.host for o in outcomes if o.ok] + [e.host for e in plan.with_action(Action.REMOVED)]:
            self._behind.pop(host, None)
        if not self._publishing:
            # The lease was lost during the pass: its new holder brings the metadata up to date.
            lost = "the publisher lease was lost during the pass"
            return ReconcileResult(plan, outcomes, lost, interrupted)
        return ReconcileResult(plan, outcomes, self.sync_metadata(), interrupted)

    def stop(self) -> None:
        """Start no further build: a pass in progress finishes the builds it started,
        records them and ends. The hosts it did not start are rebuilt by the next.
        (As when the publisher lease is lost during a pass.)"""
        self._stopping.set()

    def sync_metadata(self) -> str | None:
        """Make the TUF metadata list every host's published release (the ledger's)
        and re-sign what is due; why it could not, or None. Under the pass lock."""
        published = {name: hs.version for name, hs in self._recorded().items() if hs.serving}
        try:
            with self.metrics.stage_duration.labels("metadata").time():
                self.tuf.sync(published)
        except (TufError, StoreError, SigningError) as exc:
            if isinstance(exc, SigningError):
                self.metrics.signing_failures.inc()
            self.metrics.metadata_failures.inc()
            log.event("tuf_failed", logging.ERROR, error=str(exc))
            return str(exc)
        return None

    def _act(self, entry: HostPlan, obs: Observation) -> HostOutcome | Skipped:
        """Build, sign and publish one host; what came of it is recorded later, with
        the rest of the pass (a crash before that is met by adoption next pass).
        Skipped: not started, because the daemon is stopping or an operator suspended
        the host (or the fleet) since the pass began."""
        if self._stopping.is_set() or not self._publishing:
            self.metrics.build_queue_depth.dec()
            return Skipped.STOPPING
        # Read when the host's turn comes, not when the pass began: a suspension is
        # honoured by the pass that is running.
        if self.state.suspensions().covers(entry.host):
            self.metrics.build_queue_depth.dec()
            return Skipped.SUSPENDED
        host = obs.fleet.hosts[entry.host]
        assert entry.image is not None
        started = self.clock.monotonic()
        decision: Decision | None = None
        try:
            decision, drv = self._decide(host)
            try:
                done = self._build_and_publish(host, entry, obs.commit, decision, drv)
            except IncompleteReleaseError as exc:
                # An adopted release whose blob is lost: no build can complete it now.
                given_up = _version(decision)
                log.event(
                    "release_given_up", logging.WARNING, host=host.name, version=given_up, error=str(exc)
                )
                decision, drv = self._decide(host, after=given_up)
                done = self._build_and_publish(host, entry, obs.commit, decision, drv)
        except LeaseLostError:
            # Not published by this process: the lease's new holder publishes it.
            return Skipped.STOPPING
        except ReconcilerError as exc:
            return HostOutcome(
                host.name,
                ok=False,
                image=entry.image,
                version=None if decision is None else _version(decision),
                error=str(exc),
                seconds=self.clock.monotonic() - started,
            )
        finally:
            self.metrics.build_queue_depth.dec()
        return HostOutcome(
            host.name,
            ok=True,
            image=entry.image,
            version=done.release.version,
            artifacts=tuple(a.name for a in done.release.artifacts),
            published_at=self.clock.now().timestamp(),
            adopted=done.adopted,
            seconds=self.clock.monotonic() - started,
            build_seconds=done.build_seconds,
            builder=done.builder,
        )

    def _record(self, obs: Observation, plan: Plan, outcomes: tuple[HostOutcome, ...]) -> None:
        """Summarize the pass in one place: the ledger in one transaction, then, once
        it is committed, the logs and metrics that say what it holds."""
        states = self.state.hosts()
        retry = self.cfg.retry
        removed = [e.host for e in plan.entries if e.action == Action.REMOVED]
        backoff: dict[str, tuple[int, float]] = {}
        for o in outcomes:
            if not o.ok:
                prev = states.get(o.host)
                failures = prev.failures + 1 if prev is not None and prev.failed_image == o.image else 1
                backoff[o.host] = (
                    failures,
                    retry_delay(failures, retry.initial.total_seconds(), retry.max.total_seconds()),
                )
        now = self.clock.now().timestamp()
        with self.state.transaction():
            for entry in plan.entries:
                if entry.action == Action.INVALID:
                    self.state.record_failure(entry.host, Status.INVALID, entry.reasons[0])
                elif entry.action == Action.REMOVED:
                    self.state.record_failure(entry.host, Status.REMOVED, entry.reasons[0])
                elif entry.action == Action.UNCHANGED and states[entry.host].status != Status.PUBLISHED:
                    hs = states[entry.host]
                    self.state.record_published(
                        entry.host, hs.version, hs.image or "", hs.commit or obs.commit
                    )
            for o in outcomes:
                if o.ok:
                    assert o.version is not None
                    self.state.record_published(o.host, o.version, o.image, obs.commit)
                else:
                    failures, delay = backoff[o.host]
                    self.state.record_build_failure(
                        o.host, o.error or "", o.image, failures, now + delay, o.version
                    )
            self.state.set_meta(COMMIT_KEY, obs.commit)
        for host in removed:
            log.event("host_removed", host=host)
        self._emit(*history.host_events(obs.commit, obs.commit_time, plan, outcomes, states, backoff, now))
        for o in outcomes:
            if o.ok:
                assert o.published_at is not None
                self.metrics.commit_to_published.observe(max(0.0, o.published_at - obs.commit_time))
                artifacts = ",".join(o.artifacts)
                log.event(
                    "host_published", host=o.host, version=o.version, commit=obs.commit, artifacts=artifacts
                )
            else:
                failures, delay = backoff[o.host]
                log.event(
                    "host_failed",
                    logging.ERROR,
                    host=o.host,
                    error=o.error,
                    failures=failures,
                    retry_in=round(delay),
                )

    def _in_store(self, host: str, version: int | None = None) -> Release | None:
        """``host``'s release ``version`` in the store (its latest.json without one);
        None if there is none or it cannot be read (logged)."""
        key = latest_path(host) if version is None else release_path(host, version)
        data = self.store.get_bytes(key, RELEASE_LIMIT)
        if data is None:
            return None
        try:
            return parse_release(data, key)
        except VerificationError as exc:
            if version is not None:
                raise
            log.event("latest_unreadable", logging.WARNING, host=host, error=str(exc))
            return None

    def first_version(self, host: str) -> int:
        """The version number to try first for ``host``'s next release (core.versions)."""
        hs = self.state.hosts().get(host)
        latest = self._in_store(host)
        return first_candidate(hs.version if hs is not None else 0, latest.version if latest else None)

    def build(self, host: Host, version: int, gcroot: str | None = None) -> BuildOutput:
        """Build ``host`` as ``version``, kept from Nix's garbage collection under the
        root ``gcroot`` (default: the host's, which the published build holds)."""
        return self._realise(
            host, self.nix.instantiate(host, version, self.source.checkout), gcroot or host.name
        )

    def _realise(self, host: Host, drv: str, gcroot: str) -> BuildOutput:
        self.check_sandbox()
        self._check_builders()
        started = self.clock.monotonic()
        try:
            with self.metrics.stage_duration.labels("build").time():
                out = self.nix.realise(host, drv, self.source.checkout, gcroot, partial(_building, host.name))
        except BuildError as exc:
            self.metrics.host_builds.labels("failure").inc()
            self._record_builders(host, exc.builder, exc.refused, None, str(exc))
            raise
        seconds = self.clock.monotonic() - started
        self.metrics.host_builds.labels("success").inc()
        self.metrics.build_duration.observe(seconds)
        self._record_builders(host, out.builder, out.refused, seconds, None)
        return out

    def _check_builders(self) -> None:
        """Probe the sandbox of the remote builders due a probe (Nix.probe_builders),
        before a build: builds go only to those found building in it. What each probe
        found: the builder's sandbox gauge, its ledger row (``status``) and a log line."""
        for name, probe in sorted(self.nix.probe_builders(self.cfg.signing.gnupghome).items()):
            self.metrics.builder_sandbox.labels(name).set(1 if probe.sandbox is Sandbox.ON else 0)
            if probe.sandbox is Sandbox.ON:
                self.state.record_builder_probe(name, probe.sandbox.value, None)
                log.event("builder_sandbox", builder=name, sandbox=probe.sandbox.value)
            elif probe.sandbox is Sandbox.OFF:
                used = not self.cfg.nix.sandbox
                why = "builds outside Nix's sandbox (a probe build saw the machine's files)"
                why += ", used as nix.sandbox: false allows" if used else ": not used"
                self.state.record_builder_probe(name, probe.sandbox.value, f"sandbox probe: {why}")
                log.event(
                    "builder_unsandboxed", logging.WARNING if used else logging.ERROR, builder=name, used=used
                )
            else:
                # As a build Nix could not hand to it: `status` and BuilderUnreachable see it.
                self.state.record_builder_probe(name, probe.sandbox.value, None)
                self.metrics.builder_builds.labels(name, "unreachable").inc()
                self.state.record_builder(name, "unreachable", None, probe.error)
                log.event("builder_unreachable", logging.WARNING, builder=name, error=probe.error)

    def _record_builders(
        self,
        host: Host,
        builder: str | None,
        refused: Mapping[str, str],
        seconds: float | None,
        error: str | None,
    ) -> None:
        """Where a host's build ran and which builders could not take it: metrics, the
        ledger's per-builder rows (``status``) and a log line per refusal."""
        for name, why in sorted(refused.items()):
            self.metrics.builder_builds.labels(name, "unreachable").inc()
            self.state.record_builder(name, "unreachable", None, f"{host.name}: {why}")
            log.event("builder_unreachable", logging.WARNING, host=host.name, builder=name, error=why)
        if builder is None:
            return
        result = "success" if error is None else "failure"
        self.metrics.builder_builds.labels(builder, result).inc()
        if seconds is not None:
            self.metrics.builder_build_duration.labels(builder).observe(seconds)
        self.state.record_builder(
            builder, result, seconds, None if error is None else f"{host.name}: {error}"
        )
        log.event("host_built", host=host.name, builder=builder, result=result)

    def _decide(self, host: Host, after: int | None = None) -> tuple[Decision, str]:
        """The version decision for ``host`` and the derivation it is for: only
        instantiations, one per taken version; nothing is built. ``after``: a version
        given up (IncompleteReleaseError), taken like one of another build."""
        version = self.first_version(host.name) if after is None else after + 1
        if after is not None and self.tlog is not None:
            self.tlog.append_unpublished(host.name, after)
        for _ in range(MAX_TAKEN):
            drv = self.nix.instantiate(host, version, self.source.checkout)
            decision = decide(version, self._in_store(host.name, version), drv)
            if not isinstance(decision, Taken):
                return decision, drv
            if self.tlog is not None:
                # Left by a pass that died before logging it, perhaps: never published,
                # but signed, so the log must name it all the same.
                self.tlog.append_unpublished(host.name, version)
            version += 1
        raise BuildError(host.name, f"versions up to {version - 1} are taken by other releases")

    def _build_and_publish(
        self, host: Host, entry: HostPlan, commit: str, decision: Decision, drv: str
    ) -> _Published:
        """Build ``drv``, the derivation ``decision`` (_decide) is for, then sign and
        publish it as that decision says."""
        version = _version(decision)
        log.event("host_build", host=host.name, version=version, reasons="; ".join(entry.reasons))
        # An adopted release is built too: its artifacts are what publish() reads if a
        # blob is missing, and Nix finds the build it kept under the host's root.
        started = self.clock.now()
        build_started = self.clock.monotonic()
        out = self._realise(host, drv, host.name)
        build_seconds = self.clock.monotonic() - build_started
        finished = self.clock.now()
        # Before anything is signed: a host that does not build twice the same stops here.
        reproducibility = self._check_reproducible(host, out)
        signing = self.metrics.stage_duration.labels("sign")

        def sign_file(path: Path) -> bytes:
            with signing.time():
                return self.signer.sign_file(path)

        def sign_bytes(data: bytes) -> bytes:
            with signing.time():
                return self.signer.sign(data)

        try:
            work = tempfile.mkdtemp(prefix="publish-", dir=self.cfg.state_dir)
        except OSError as exc:
            raise BuildError(host.name, f"cannot prepare its artifacts for publishing: {exc}") from None
        try:
            if isinstance(decision, Adopt):
                # Published before, sealed then: the blobs are in the store already, and
                # it keeps the attestations it names.
                release, files = decision.release, out.files
                attestations: dict[str, bytes] = {}
            else:
                files = self._seal(host, out.files, Path(work), sign_bytes)
                # The attestations are about the files as published (sealed).
                release, attestations = self.attestations(
                    self._new_release(host, version, out.derivation, files, commit),
                    host,
                    out,
                    started,
                    finished,
                    reproducibility,
                )
            controls, update = self._zsync(release, files, adopted=isinstance(decision, Adopt))
            self._publish_key()
            self._publish_discovery_page()
            with self.metrics.stage_duration.labels("publish").time():
                publish(
                    self.store,
                    release,
                    files,
                    sign_file,
                    sign_bytes,
                    on_artifact=lambda fmt: self.metrics.artifacts_published.labels(fmt).inc(),
                    name_prefix=self.cfg.images.name_prefix,
                    zsync=controls,
                    update=update,
                    attestations=attestations,
                    log=self._log_release if self.tlog is not None else None,
                )
        except SigningError:
            self.metrics.signing_failures.inc()
            raise
        except LeaseLostError:
            raise
        except StoreError as exc:
            # A paused holder that resumes may first meet what the new holder wrote
            # (releases/N.json with other content) before a write of its own is fenced.
            if self._lease_lost():
                raise LeaseLostError(f"not published, the publisher lease is lost: {exc}") from None
            self.metrics.publish_failures.inc()
            raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return _Published(release, isinstance(decision, Adopt), build_seconds, out.builder)

    def _check_reproducible(self, host: Host, out: BuildOutput) -> Reproducibility:
        """The reproducibility gate (``reproducibility.check``): every derivation of the
        build's closure, but those found reproducible before, built a second time and
        compared bit for bit. Raises NotReproducibleError (the host publishes nothing)
        when one differs, BuildError when the second build cannot run."""
        if not self.cfg.reproducibility.check:
            return Reproducibility()
        checks = self.metrics.reproducibility_checks
        with self._reproduced_lock:
            skip = frozenset(self._reproduced)
        try:
            with self.metrics.stage_duration.labels("check").time():
                found = self.nix.check_reproducible(host, out.derivation, self.source.checkout, skip)
        except BuildError:
            checks.labels(CheckResult.FAILED).inc()
            raise
        if found.mismatches:
            checks.labels(CheckResult.MISMATCH).inc()
            log.event(
                "host_not_reproducible",
                logging.ERROR,
                host=host.name,
                where=found.where,
                derivations=",".join(m.derivation for m in found.mismatches),
            )
            raise NotReproducibleError(host.name, refusal(found.mismatches, found.where))
        checks.labels(CheckResult.PASSED).inc()
        with self._reproduced_lock:
            for drv in found.rebuilt:
                self._reproduced[drv] = None
            while len(self._reproduced) > REPRODUCED_CACHE:
                del self._reproduced[next(iter(self._reproduced))]
        log.event(
            "host_reproduced",
            host=host.name,
            where=found.where,
            derivations=len(found.derivations),
            rebuilt=len(found.rebuilt),
        )
        return Reproducibility(ReproStatus.PASSED, (found.where,), len(found.derivations))

    def _seal(
        self, host: Host, built: Mapping[str, Path], work: Path, sign: Callable[[bytes], bytes]
    ) -> dict[str, Path]:
        """The files to publish: the AppImage with its update information, the
        publisher's key, libappimage's digest and the signature embedded (the key never
        enters a build, so this happens here, after it); the others as built."""
        files = dict(built)
        if Kind.APPIMAGE not in files:
            return files
        source = files[Kind.APPIMAGE]
        public = self.cfg.store.public_url
        info = update_information(f"{public}/{update_path(host.name)}" if public else None)
        sealed = work / source.name
        try:
            self.packager.seal_appimage(source, sealed, info, self.signer.public_key(), sign)
        except (VerificationError, OSError) as exc:
            raise BuildError(host.name, f"cannot seal {source.name}: {exc}") from None
        files[Kind.APPIMAGE] = sealed
        return files

    def _zsync(
        self, release: Release, files: Mapping[str, Path], adopted: bool
    ) -> tuple[dict[str, bytes], bytes | None]:
        """The zsync control file of the AppImage, beside its blob (its URL relative:
        the blob's name), and the copy the AppImage's update information names, at
        the host's stable key (its URL absolute: ``store.public_url``)."""
        art = release.artifact(Kind.APPIMAGE)
        if art is None:
            return {}, None
        key = zsync_path(art.blob)
        controls: dict[str, bytes] = {}
        if adopted:
            # What was built now is not what was published (another signature): the
            # control file published then stands.
            control = self.store.get_bytes(key, zsync.size_limit(art.size))
        else:
            control = self.packager.zsync(files[Kind.APPIMAGE], art.name, art.sha256)
            controls[Kind.APPIMAGE] = control
        public = self.cfg.store.public_url
        if control is None or public is None:
            return controls, None
        try:
            update = zsync.parse(control, art.size, key).with_url(f"{public}/{art.blob}")
        except VerificationError as exc:
            raise StoreError(f"{key}: {exc}") from None
        return controls, update

    def _lease_lost(self) -> bool:
        """Whether this process turns out not to hold the publisher lease (any more)."""
        if self.lease is None:
            return False
        try:
            self.lease.check()
        except LeaseLostError:
            return True
        except StoreError:
            return False  # the store cannot tell; the original error stands
        return False

    def attestations(
        self,
        release: Release,
        host: Host,
        out: BuildOutput,
        started: datetime,
        finished: datetime,
        reproducibility: Reproducibility | None = None,
    ) -> tuple[Release, dict[str, bytes]]:
        """``release`` naming its provenance and SBOM, and their signed envelopes
        (reconciler.daemon.attest)."""
        with self.metrics.stage_duration.labels("attest").time():
            record = BuildRecord(
                repository=self.cfg.repo.shown_url,
                branch=self.cfg.repo.branch,
                commit=release.commit,
                host=host.name,
                derivation=out.derivation,
                inputs=self.nix.inputs(host, out.derivation),
                reconciler_version=__version__,
                builder=out.builder,
                builder_uri=next((b.uri for b in self.cfg.builders if b.name == out.builder), None),
                invocation_id=str(uuid.uuid4()),
                started=started,
                finished=finished,
                reproducibility=reproducibility or Reproducibility(),
            )
        with self.metrics.stage_duration.labels("sign").time():
            return attest(release, record, self.signer.sign_attestation)

    def _log_release(self, release: Release, meta: bytes) -> None:
        """Append the release to the transparency log, before latest.json moves."""
        assert self.tlog is not None
        with self.metrics.stage_duration.labels("log").time():
            self.tlog.append_release(release.host, release.version, meta)

    def _publish_key(self) -> None:
        """keys/publisher.asc, for people and tools (agents pin their own copy)."""
        if self._key_published:
            return
        key = self.signer.public_key()
        if not holds(self.store, PUBLISHER_KEY, key):
            self.store.put_bytes(PUBLISHER_KEY, key)
        self._key_published = True

    def _publish_discovery_page(self) -> None:
        """The page answering appc discovery for the image name prefix (core.appc)."""
        if self._page_published:
            return
        images = self.cfg.images
        page = discovery_page(images.name_prefix, images.store_url, PUBLISHER_KEY)
        key = discovery_page_path(images.name_prefix)
        if not holds(self.store, key, page):
            self.store.put_bytes(key, page)
        self._page_published = True

    def _new_release(
        self, host: Host, version: int, derivation: str, files: Mapping[str, Path], commit: str
    ) -> Release:
        artifacts = tuple(
            Artifact(format=fmt, name=path.name, size=path.stat().st_size, sha256=sha256_file(path))
            for fmt, path in sorted(files.items())
        )
        return new_release(
            host.name,
            version,
            commit,
            derivation,
            artifacts,
            now=self.clock.now(),
            lifetime=self.cfg.release_lifetime,
        )


def status(state: Ledger, now: float, max_wait: float) -> Mapping[str, object]:
    """What the daemon last recorded, as plain data for the CLI, at unix time ``now``
    (``max_wait``: retry.max, beyond which a recorded retry time is not believed)."""
    suspended = state.suspensions()
    last = PassRecord.from_json(state.get_meta(LAST_PASS_KEY))
    fetch = FetchFailure.from_json(state.get_meta(FETCH_ERROR_KEY))
    return {
        "commit": state.get_meta(COMMIT_KEY),
        "source_error": state.get_meta(SOURCE_ERROR_KEY) or None,
        "sandbox": state.get_meta(SANDBOX_KEY),
        "last_pass": None
        if last is None
        else {
            "at": last.at,
            "result": last.result.value,
            "seconds": last.seconds,
            "commit": last.commit,
            "error": last.error,
        },
        "last_success": float(state.get_meta(LAST_SUCCESS_KEY) or 0) or None,
        # Every pass since ``since`` failed to fetch: the hosts are as of ``commit``.
        "fetch_error": None
        if fetch is None
        else {"since": fetch.since, "at": fetch.at, "passes": fetch.passes, "error": fetch.error},
        # Unix times each was suspended at (reconciler suspend).
        "suspended": {"fleet": suspended.fleet, "hosts": dict(sorted(suspended.hosts.items()))},
        "hosts": {
            name: {
                "version": hs.version,
                "status": hs.status,
                "error": hs.error,
                "commit": hs.commit,
                # Unix time it has been in this status (and, published, at this version).
                "since": hs.updated,
                # A failed host: the version its failed attempt would have published (None:
                # it failed before one was decided), how many attempts failed in a row, and
                # when the daemon tries again (None: at its next pass).
                "attempt_version": hs.attempt_version if hs.status == Status.FAILED else None,
                "failures": hs.failures if hs.status == Status.FAILED else 0,
                "next_retry": next_retry(hs, now, max_wait),
                "suspended_since": suspended.since(name),
            }
            for name, hs in state.hosts().items()
        },
        "builders": {
            name: {
                "builds": b.builds,
                "failures": b.failures,
                "unreachable": b.unreachable,
                "last_build": b.last_build,
                "last_seconds": b.last_seconds,
                "last_error": b.last_error,
                "last_error_at": b.last_error_at,
                "sandbox": b.sandbox,
            }
            for name, b in state.builders().items()
        },
    }


def _version(decision: Decision) -> int:
    """The version a decision publishes: the release it adopts, or a new one."""
    return decision.release.version if isinstance(decision, Adopt) else decision.version


def _why_failed(result: ReconcileResult) -> str:
    """A failed pass in one line: which hosts failed, or the metadata."""
    failed = sorted(o.host for o in result.outcomes if not o.ok)
    parts = []
    if failed:
        parts.append(
            f"{len(failed)} host(s) failed: {', '.join(failed[:5])}{', ...' if len(failed) > 5 else ''}"
        )
    if result.metadata_error is not None:
        parts.append(f"TUF metadata: {result.metadata_error}")
    if result.interrupted:
        parts.append(f"{len(result.interrupted)} host(s) not started (stopping, or the lease was lost)")
    return "; ".join(parts) or "failed"


def _building(host: str, seconds: float, last: str | None) -> None:
    """A build still running: how long so far, and its last line (redacted by Nix's adapter)."""
    if last is None:
        log.event("host_building", host=host, seconds=round(seconds))
    else:
        log.event("host_building", host=host, seconds=round(seconds), last=last)
