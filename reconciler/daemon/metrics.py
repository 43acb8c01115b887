"""Prometheus metrics of the daemon, on a registry of its own."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from reconciler.core.formats import Kind
from reconciler.core.lease import Role
from reconciler.core.model import COMMIT_KEY, LAST_SUCCESS_KEY, Status
from reconciler.core.reproducibility import CheckResult
from reconciler.daemon.gate import Refusal
from reconciler.ports import Ledger

if TYPE_CHECKING:
    from reconciler.daemon.lease import PublisherLease
    from reconciler.daemon.tuf import TufRepository

# Builds of real hosts take seconds to minutes; reconciles of an unchanged fleet
# take well under a second.
BUILD_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
RECONCILE_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
STAGE_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# From a push to a published release: seconds when all is well, hours when a build waits.
LATENCY_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)
# fetch, parse and evaluate happen once per pass; build, sign and publish once per
# host release (publish includes the signing it waits for).
# metadata: bringing the TUF metadata up to date, once per pass.
BUILDER_RESULTS = ("success", "failure", "unreachable")
# check: the reproducibility gate's second build (reproducibility.check), once per host release.
STAGES = ("fetch", "parse", "evaluate", "build", "check", "attest", "sign", "publish", "log", "metadata")


class LedgerCollector(Collector):
    """Per-host figures read from the ledger when Prometheus scrapes (client_python's
    custom collector), so /metrics says what the ledger says, however a pass ended."""

    def __init__(self, ledger: Ledger, branch: str) -> None:
        self._ledger = ledger
        self._branch = branch

    def collect(self) -> Iterator[Metric]:
        version = GaugeMetricFamily(
            "reconciler_host_published_version", "Published release version per host.", labels=["host"]
        )
        # A series per host that is not as its definition says, and only for those:
        # 10,000 healthy hosts cost nothing here.
        failing = GaugeMetricFamily(
            "reconciler_host_failing",
            "1 per host whose last build or publication failed (status failed) or whose"
            " definition is invalid (status invalid); what it published before stays served.",
            labels=["host", "status"],
        )
        invalid = 0
        for name, hs in sorted(self._ledger.hosts().items()):
            if hs.serving:
                version.add_metric([name], hs.version)
            if hs.status in (Status.FAILED, Status.INVALID):
                failing.add_metric([name, hs.status], 1)
            invalid += hs.status == Status.INVALID
        yield version
        yield failing
        # Read at each scrape: `reconciler suspend` writes the ledger from another process.
        suspended = self._ledger.suspensions()
        hosts = GaugeMetricFamily(
            "reconciler_host_suspended",
            "1 per host an operator suspended by itself (reconciler suspend HOST): passes leave"
            " it as it is, and what it published stays served.",
            labels=["host"],
        )
        for name in sorted(suspended.hosts):
            hosts.add_metric([name], 1)
        yield hosts
        yield GaugeMetricFamily(
            "reconciler_fleet_suspended",
            "1 while an operator has suspended the whole fleet (reconciler suspend): passes fetch"
            " and build nothing, and only re-sign the TUF metadata.",
            value=0 if suspended.fleet is None else 1,
        )
        yield GaugeMetricFamily(
            "reconciler_invalid_hosts",
            "Host definitions that failed validation or evaluation.",
            value=invalid,
        )
        # From the ledger, so that a restart neither resets them nor loses the labels.
        yield GaugeMetricFamily(
            "reconciler_last_successful_reconcile_timestamp_seconds",
            "Unix time of the last reconcile pass whose builds, publications and metadata"
            " update all succeeded (0: none yet).",
            value=float(self._ledger.get_meta(LAST_SUCCESS_KEY) or 0),
        )
        commit = self._ledger.get_meta(COMMIT_KEY)
        if commit is not None:
            info = InfoMetricFamily("reconciler_source", "The config repository commit last reconciled.")
            info.add_metric([], {"commit": commit, "branch": self._branch})
            yield info


class TufCollector(Collector):
    """Each TUF role's version and expiry, read from the repository at scrape time."""

    def __init__(self, repo: TufRepository) -> None:
        self._repo = repo

    def collect(self) -> Iterator[Metric]:
        md = self._repo.md
        expiry = GaugeMetricFamily(
            "reconciler_tuf_expiry_timestamp_seconds",
            "Unix time at which the newest signed metadata of each TUF role expires.",
            labels=["role"],
        )
        version = GaugeMetricFamily(
            "reconciler_tuf_version", "Version of each TUF role's newest metadata.", labels=["role"]
        )
        if md is not None:
            for role, m in (
                ("root", md.root),
                ("targets", md.targets),
                ("snapshot", md.snapshot),
                ("timestamp", md.timestamp),
            ):
                expiry.add_metric([role], m.signed.expires.timestamp())
                version.add_metric([role], m.signed.version)
            if md.bins:
                expiry.add_metric(["bins"], min(b.signed.expires for b in md.bins.values()).timestamp())
        yield expiry
        yield version


class LeaseCollector(Collector):
    """Whether this daemon publishes (holds the store's publisher lease), read when
    Prometheus scrapes; without a lease (lease.enabled: false) it always does."""

    def __init__(self, lease: PublisherLease | None) -> None:
        self._lease = lease

    def collect(self) -> Iterator[Metric]:
        status = self._lease.status() if self._lease is not None else None
        yield GaugeMetricFamily(
            "reconciler_publisher_active",
            "1 while this daemon holds the store's publisher lease and publishes; 0 on a standby.",
            value=1 if status is None or status.role is Role.ACTIVE else 0,
        )
        if status is not None and status.term is not None:
            yield GaugeMetricFamily(
                "reconciler_lease_term",
                "The newest term of the store's publisher lease this daemon has seen (it grows at"
                " every change of holder).",
                value=status.term,
            )


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.reconcile_runs = Counter(
            "reconciler_reconcile_runs", "Reconcile passes by result.", ["result"], registry=r
        )
        self.reconcile_duration = Histogram(
            "reconciler_reconcile_duration_seconds",
            "Duration of a reconcile pass.",
            buckets=RECONCILE_BUCKETS,
            registry=r,
        )
        self.host_builds = Counter("reconciler_host_builds", "Host builds by result.", ["result"], registry=r)
        self.build_duration = Histogram(
            "reconciler_build_duration_seconds",
            "Duration of one host build.",
            buckets=BUILD_BUCKETS,
            registry=r,
        )
        self.artifacts_published = Counter(
            "reconciler_artifacts_published", "Artifacts published by format.", ["format"], registry=r
        )
        self.signing_failures = Counter("reconciler_signing_failures", "gpg signing failures.", registry=r)
        self.untrusted_commits = Counter(
            "reconciler_untrusted_commits",
            "Head commits not built: signature missing or not trusted, or not a descendant"
            " of the last reconciled commit.",
            ["reason"],
            registry=r,
        )
        self.webhook_requests = Counter(
            "reconciler_webhook_requests", "Webhook requests by result.", ["result"], registry=r
        )
        self.reconcile_requests = Counter(
            "reconciler_reconcile_requests",
            "POST /reconcile requests (reconciler reconcile-now) by result.",
            ["result"],
            registry=r,
        )
        self.wakeups = Counter(
            "reconciler_wakeups", "Reconcile passes by what started them.", ["trigger"], registry=r
        )
        self.gc_deleted = Counter(
            "reconciler_gc_deleted_objects", "Store objects deleted by garbage collection.", registry=r
        )
        self.metadata_failures = Counter(
            "reconciler_tuf_failures",
            "Passes whose TUF metadata could not be brought up to date (agents see no update).",
            registry=r,
        )
        self.publish_failures = Counter(
            "reconciler_publish_failures", "Releases the store refused or failed to take.", registry=r
        )
        self.git_fetch_errors = Counter(
            "reconciler_git_fetch_errors", "Failed fetches of the config repository.", registry=r
        )
        self.build_queue_depth = Gauge(
            "reconciler_build_queue_depth", "Host builds waiting or running.", registry=r
        )
        self.build_sandbox = Gauge(
            "reconciler_build_sandbox",
            "1 when a probe build found Nix building in its sandbox, 0 when builds run unsandboxed"
            " (allowed only by nix.sandbox: false).",
            registry=r,
        )
        self.builder_sandbox = Gauge(
            "reconciler_builder_sandbox",
            "Per remote builder: 1 when a probe build found it building in Nix's sandbox, 0 when"
            " it builds unsandboxed or could not be probed yet (builds go only to builders at 1,"
            " unless nix.sandbox: false).",
            ["builder"],
            registry=r,
        )
        self.stage_duration = Histogram(
            "reconciler_stage_duration_seconds",
            "Duration of one stage of a reconcile pass or of a host's release.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            registry=r,
        )
        self.commit_to_published = Histogram(
            "reconciler_commit_to_published_seconds",
            "From a commit's committer time to a host's release built from it being published.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        # Per remote builder (core.builders.LOCAL: this machine). result: success,
        # failure (the build failed there), unreachable (Nix could not use it).
        self.builder_builds = Counter(
            "reconciler_builder_builds",
            "Host builds per builder by result.",
            ["builder", "result"],
            registry=r,
        )
        self.builder_build_duration = Histogram(
            "reconciler_builder_build_duration_seconds",
            "Duration of one host build that ran on the builder.",
            ["builder"],
            buckets=BUILD_BUCKETS,
            registry=r,
        )
        self.reproducibility_checks = Counter(
            "reconciler_reproducibility_checks",
            "Host releases the reproducibility gate built a second time, by result: passed (signed"
            " and published), mismatch (other bytes: refused, nothing published), failed (the"
            " second build could not run: refused).",
            ["result"],
            registry=r,
        )
        for check in CheckResult:
            self.reproducibility_checks.labels(check)
        for stage in STAGES:
            self.stage_duration.labels(stage)
        for result in ("accepted", "ignored", "unauthorized"):
            self.webhook_requests.labels(result)
        for trigger in ("poll", "webhook", "filesystem", "manual", "lease"):
            self.wakeups.labels(trigger)
        for result in ("accepted", "unauthorized", "suspended"):
            self.reconcile_requests.labels(result)
        for result in ("success", "failure"):
            self.reconcile_runs.labels(result)
            self.host_builds.labels(result)
        # A pass of a standby: it planned and published nothing.
        self.reconcile_runs.labels("standby")
        for fmt in Kind:
            self.artifacts_published.labels(fmt)
        for reason in Refusal:
            self.untrusted_commits.labels(reason)

    def known_builders(self, names: Iterable[str]) -> None:
        """Export every builder's series from the start, zero until it builds."""
        for name in names:
            for result in BUILDER_RESULTS:
                self.builder_builds.labels(name, result)
            self.builder_build_duration.labels(name)

    # What an observation counts and times (reconciler.daemon.observer.ObserveMetrics).

    def stage(self, stage: str, seconds: float) -> None:
        self.stage_duration.labels(stage).observe(seconds)

    def fetch_failed(self) -> None:
        self.git_fetch_errors.inc()

    def commit_refused(self, reason: Refusal) -> None:
        self.untrusted_commits.labels(reason).inc()

    def watch(self, ledger: Ledger, tuf: TufRepository | None, branch: str) -> None:
        """Serve the ledger's per-host figures (LedgerCollector) and the TUF roles'
        (TufCollector) from now on."""
        self.registry.register(LedgerCollector(ledger, branch))
        if tuf is not None:
            self.registry.register(TufCollector(tuf))

    def watch_lease(self, lease: PublisherLease | None) -> None:
        """Serve reconciler_publisher_active and reconciler_lease_term from now on."""
        self.registry.register(LeaseCollector(lease))
