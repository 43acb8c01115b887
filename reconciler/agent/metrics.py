"""The agent's Prometheus metrics, and the results a poll counts."""

from __future__ import annotations

from enum import StrEnum

from prometheus_client import CollectorRegistry, Counter, Gauge


class PollResult(StrEnum):
    """What one poll did; the value is the metric label."""

    IDLE = "idle"  # tuf/timestamp.json unchanged since the last poll: nothing downloaded
    CURRENT = "current"  # it names what runs, or nothing for this host
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
        for result in PollResult:
            self.polls.labels(result)
        for method in DownloadMethod:
            self.artifact_downloads.labels(method)
