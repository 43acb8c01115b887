"""Notifications: which events a target is told about, and what it is sent. Pure.

A target (reconciler.yaml's ``notifications``) is a generic webhook (the event as
JSON), a Slack-compatible incoming webhook (text and blocks), or a commit status on
GitHub, Gitea or GitLab. The daemon delivers off the pass (reconciler.daemon.notify)
with the retry schedule and rate limit defined here.
"""

from __future__ import annotations

import json
import urllib.parse
from dataclasses import dataclass
from enum import StrEnum

from reconciler.core.events import Event, EventType, describe, short

# A commit status's description: GitHub keeps at most 140 characters.
STATUS_DESCRIPTION = 140


class Notice(StrEnum):
    """What a target can be told about (its ``on`` list)."""

    PUBLISHED = "published"  # a host published (or adopted) a new release
    FAILED = "failed"  # a host's build or publication failed, or its definition became invalid
    UNTRUSTED = "untrusted"  # the commit gate refused a head commit
    RECOVERED = "recovered"  # a host published after it had failed or was invalid


class Provider(StrEnum):
    WEBHOOK = "webhook"
    SLACK = "slack"
    GITHUB = "github"
    GITEA = "gitea"
    GITLAB = "gitlab"

    @property
    def commit_status(self) -> bool:
        return self in (Provider.GITHUB, Provider.GITEA, Provider.GITLAB)


def notice_of(event: Event, wanted: frozenset[Notice]) -> Notice | None:
    """The notice ``event`` is for a target that wants ``wanted``, or None. A recovery
    is also a publication: a target that wants either hears of it once."""
    found: tuple[Notice, ...] = ()
    if event.type in (EventType.HOST_PUBLISHED, EventType.HOST_ADOPTED):
        found = (Notice.RECOVERED, Notice.PUBLISHED) if event.data.get("recovered") else (Notice.PUBLISHED,)
    elif event.type in (EventType.HOST_FAILED, EventType.HOST_INVALID):
        found = (Notice.FAILED,)
    elif event.type == EventType.COMMIT_UNTRUSTED:
        found = (Notice.UNTRUSTED,)
    return next((n for n in found if n in wanted), None)


@dataclass(frozen=True)
class Route:
    """A target's settings that decide what it is sent (its URL and secrets are the
    daemon's: they are neither rendered nor logged)."""

    provider: Provider
    on: frozenset[Notice]
    repository: str | None = None  # commit statuses: owner/name (GitLab: a project id or path)
    context: str = "reconciler"  # commit statuses: the status's name, per host: CONTEXT/HOST
    target_url: str | None = None  # a link the message carries (a fleet page, a dashboard)


@dataclass(frozen=True)
class Message:
    """One request to a target: POST ``path`` (appended to the target's URL; empty
    for a webhook) with the JSON ``body``."""

    notice: Notice
    path: str
    body: bytes


def render(route: Route, event: Event) -> Message | None:
    """What ``route``'s target is sent for ``event``; None if nothing (it does not want
    the event, or a commit status without a commit)."""
    notice = notice_of(event, route.on)
    if notice is None:
        return None
    if route.provider == Provider.WEBHOOK:
        return _json(
            notice, "", {"notice": notice.value, "text": text(notice, event), "event": event.to_json()}
        )
    if route.provider == Provider.SLACK:
        return _json(notice, "", slack(notice, event, route.target_url))
    if event.commit is None or route.repository is None:
        return None
    context = route.context if event.host is None else f"{route.context}/{event.host}"
    description = describe(event)
    if len(description) > STATUS_DESCRIPTION:
        description = description[: STATUS_DESCRIPTION - 1] + "…"
    sha = urllib.parse.quote(event.commit, safe="")
    body: dict[str, object]
    if route.provider == Provider.GITLAB:
        # POST /projects/:id/statuses/:sha; a project path is one URL-encoded segment.
        path = f"/projects/{urllib.parse.quote(route.repository, safe='')}/statuses/{sha}"
        body = {"state": GITLAB_STATE[notice], "name": context, "description": description}
    else:
        # GitHub and Gitea: POST /repos/{owner}/{repo}/statuses/{sha}
        owner, _, repo = route.repository.partition("/")
        path = (
            f"/repos/{urllib.parse.quote(owner, safe='')}/{urllib.parse.quote(repo, safe='')}/statuses/{sha}"
        )
        body = {"state": GITHUB_STATE[notice], "context": context, "description": description}
    if route.target_url is not None:
        body["target_url"] = route.target_url
    return _json(notice, path, body)


GITHUB_STATE = {
    Notice.PUBLISHED: "success",
    Notice.RECOVERED: "success",
    Notice.FAILED: "failure",
    # Not the commit's content failing: the commit was not built at all.
    Notice.UNTRUSTED: "error",
}
# GitLab has no "error": a refused commit is failed there too.
GITLAB_STATE = {
    Notice.PUBLISHED: "success",
    Notice.RECOVERED: "success",
    Notice.FAILED: "failed",
    Notice.UNTRUSTED: "failed",
}
_TITLE = {
    Notice.PUBLISHED: "published",
    Notice.RECOVERED: "recovered",
    Notice.FAILED: "FAILED",
    Notice.UNTRUSTED: "untrusted commit",
}


def text(notice: Notice, event: Event) -> str:
    """The message as plain text: `[reconciler] FAILED: web-1 failed at ...`."""
    return f"[reconciler] {_TITLE[notice]}: {describe(event)}"


def slack(notice: Notice, event: Event, link: str | None) -> dict[str, object]:
    """A Slack incoming-webhook payload (Mattermost and others take the same): ``text``
    for notifications and clients without blocks, a section and a context block."""
    line = _escape(describe(event))
    section = f"*{_TITLE[notice]}*: {line}"
    if link is not None:
        section += f" <{_escape(link)}|details>"
    facts = [f"commit `{short(event.commit)}`"] if event.commit else []
    facts.append(f"<!date^{int(event.time)}^{{date_short_pretty}} {{time_secs}}|{int(event.time)}>")
    return {
        "text": _escape(text(notice, event)),
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": section}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": " · ".join(facts)}]},
        ],
    }


def _escape(s: str) -> str:
    # Slack's three control characters: a host error must not become a mention or a link.
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _json(notice: Notice, path: str, body: object) -> Message:
    return Message(notice, path, json.dumps(body, separators=(",", ":"), sort_keys=True).encode())


@dataclass(frozen=True)
class Backoff:
    """When to try a message again: ``attempts`` tries in all, waiting ``initial``
    seconds after the first failure, doubling, at most ``max``."""

    attempts: int = 5
    initial: float = 1.0
    max: float = 60.0

    def delay(self, failed: int, retry_after: float | None = None) -> float | None:
        """After ``failed`` failed tries, how long before the next; None: give up. A
        server's Retry-After is honoured up to ``max``."""
        if failed >= self.attempts:
            return None
        wait: float = min(self.max, self.initial * 2.0 ** (failed - 1))
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max))
        return wait


def retryable(status: int | None) -> bool:
    """Whether a try that got ``status`` (None: no answer, or none in time) may succeed
    later: a server error, a rate limit or a timeout may pass; a refusal (a bad token,
    an unknown repository) will not."""
    return status is None or status in (408, 425, 429) or status >= 500


@dataclass(frozen=True)
class RateLimit:
    """A token bucket: ``per_minute`` messages a minute, as a burst of as many or spread.
    ``tokens`` at monotonic time ``at``; below zero, sends already promised."""

    per_minute: int
    tokens: float
    at: float

    @classmethod
    def full(cls, per_minute: int, now: float) -> RateLimit:
        return cls(per_minute, float(per_minute), now)

    def take(self, now: float) -> tuple[RateLimit, float]:
        """Take a token at ``now``: the new bucket, and how long to wait before sending."""
        rate = self.per_minute / 60.0
        tokens = min(float(self.per_minute), self.tokens + max(0.0, now - self.at) * rate) - 1
        wait = 0.0 if tokens >= 0 else -tokens / rate
        return RateLimit(self.per_minute, tokens, max(now, self.at)), wait
