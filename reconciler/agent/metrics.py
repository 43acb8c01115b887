"""The agent's Prometheus metrics, and the results a poll counts."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge

from reconciler.core.trust import Reason


class PollResult(StrEnum):
    """What one poll did; the value is the metric label."""

    IDLE = "idle"  # tuf/timestamp.json unchanged since the last poll: nothing downloaded
    CURRENT = "current"  # it names what runs (or nothing, for a host that runs a release)
    UNPUBLISHED = "unpublished"  # it names nothing for this host, and nothing is installed
    DEFERRED = "deferred"  # its download failed before; this poll is part of the backoff
    UPDATED = "updated"  # switched to a new release, and it is healthy
    REFUSED = "refused"  # a trust rule refused it
    STALE = "stale"  # the newest metadata the store offers has expired: frozen
    ROLLED_BACK = "rolled-back"  # switched, unhealthy, switched back
    ERROR = "error"  # the store could not be read; nothing changed


class DownloadMethod(StrEnum):
    """How an artifact came; the value is the metric label."""

    ZSYNC = "zsync"  # the blocks the running release lacked, by zsync
    FULL = "full"  # the whole blob


class AgentMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.polls = Counter(
            "reconciler_agent_polls", "Polls of the store by result.", ["result"], registry=r
        )
        self.refusals = Counter(
            "reconciler_agent_refusals", "Releases refused, by reason.", ["reason"], registry=r
        )
        self.updates = Counter("reconciler_agent_updates", "Releases switched to and healthy.", registry=r)
        self.rollbacks = Counter(
            "reconciler_agent_rollbacks",
            "Releases rolled back after a failed activation or health check.",
            registry=r,
        )
        self.running_version = Gauge(
            "reconciler_agent_running_version", "Release version this host runs.", ["host"], registry=r
        )
        self.last_poll = Gauge(
            "reconciler_agent_last_poll_timestamp_seconds",
            "Unix time of the last completed poll.",
            registry=r,
        )
        self.downloaded = Counter(
            "reconciler_agent_downloaded_bytes", "Bytes of metadata and artifacts downloaded.", registry=r
        )
        self.artifact_downloads = Counter(
            "reconciler_agent_artifact_downloads",
            "Artifacts downloaded and found to be what the release names, by method.",
            ["method"],
            registry=r,
        )
        self.stale = Gauge(
            "reconciler_agent_metadata_stale",
            "1 while the store's newest TUF metadata has expired (a freeze, or a stopped "
            "publisher): this host keeps running its release and sees no update.",
            registry=r,
        )
        self.metadata_expiry = Gauge(
            "reconciler_agent_metadata_expiry_timestamp_seconds",
            "Unix time at which the trusted TUF timestamp expires.",
            registry=r,
        )
        # Every series from the start at 0: increase() sees the first refusal as a
        # rise, which a series born at 1 never shows (AgentRefusals would not fire).
        for result in PollResult:
            self.polls.labels(result)
        for method in DownloadMethod:
            self.artifact_downloads.labels(method)
        for reason in Reason:
            self.refusals.labels(reason)

    def counters(self) -> dict[str, float]:
        """Every counter sample as ``name{labels}`` -> value, for carry_over."""
        out: dict[str, float] = {}
        for metric in self.registry.collect():
            if metric.type != "counter":
                continue
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    out[_sample_key(sample.name, sample.labels)] = sample.value
        return out

    def carry_over(self, totals: Mapping[str, float]) -> None:
        """Start the counters at ``totals`` (what counters() gave in an earlier run).

        An agent run by a timer (``--once`` with ``metrics_file``) is a new process per
        poll: without this every counter in the textfile would restart at each run and
        a refusal in every run would look like no increase at all."""
        for counter, labelled in (
            (self.polls, True),
            (self.refusals, True),
            (self.updates, False),
            (self.rollbacks, False),
            (self.downloaded, False),
            (self.artifact_downloads, True),
        ):
            for metric in counter.collect():
                for sample in metric.samples:
                    if not sample.name.endswith("_total"):
                        continue
                    value = totals.get(_sample_key(sample.name, sample.labels), 0.0)
                    if value > 0:
                        child = counter.labels(**sample.labels) if labelled else counter
                        child.inc(value)


def _sample_key(name: str, labels: Mapping[str, str]) -> str:
    return name + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"
