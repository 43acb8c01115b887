"""Notifications: what each target is sent (reconciler.core.notify), when it is tried
again, the rate limit, the configuration, and the requests with their credentials
(reconciler.daemon.notify.Target)."""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.config import load_config
from reconciler.core.events import Event, EventType
from reconciler.core.notify import (
    Backoff,
    Message,
    Notice,
    Provider,
    RateLimit,
    Route,
    notice_of,
    render,
    retryable,
)
from reconciler.daemon.notify import Target
from reconciler.errors import ConfigError

NOW = 1_700_000_000.0
SHA = "0123456789abcdef0123456789abcdef01234567"
ALL = frozenset(Notice)


def published(recovered: bool = False, host: str = "web-1") -> Event:
    return Event(
        EventType.HOST_PUBLISHED,
        NOW,
        host,
        SHA,
        3,
        12.0,
        data={"recovered": recovered, "latency": 30.0, "artifacts": "a.aci"},
        id=7,
    )


FAILED = Event(
    EventType.HOST_FAILED, NOW, "web-2", SHA, seconds=4.0, error="build failed: <!channel> & co", id=8
)
UNTRUSTED = Event(
    EventType.COMMIT_UNTRUSTED, NOW, commit=SHA, error="not signed", data={"reason": "unsigned"}
)


def test_each_event_is_the_notice_a_target_asked_for() -> None:
    assert notice_of(published(), ALL) == Notice.PUBLISHED
    assert notice_of(published(recovered=True), ALL) == Notice.RECOVERED
    # A recovery is a publication too, for a target that wants only those ...
    assert notice_of(published(recovered=True), frozenset({Notice.PUBLISHED})) == Notice.PUBLISHED
    # ... and a target that wants only recoveries hears of no other publication.
    assert notice_of(published(), frozenset({Notice.RECOVERED})) is None
    adopted = Event(EventType.HOST_ADOPTED, NOW, "web-1", SHA, 3)
    assert notice_of(adopted, ALL) == Notice.PUBLISHED
    assert notice_of(FAILED, ALL) == Notice.FAILED
    assert notice_of(Event(EventType.HOST_INVALID, NOW, "web-1", SHA, error="x"), ALL) == Notice.FAILED
    assert notice_of(UNTRUSTED, ALL) == Notice.UNTRUSTED
    assert notice_of(UNTRUSTED, frozenset({Notice.FAILED})) is None
    for kind in (EventType.PASS_STARTED, EventType.PASS_FINISHED, EventType.HOST_BUILT, EventType.SUSPENDED):
        assert notice_of(Event(kind, NOW, "web-1", SHA), ALL) is None


def body(msg: Message | None) -> Any:
    assert msg is not None
    return json.loads(msg.body)


def test_a_webhook_gets_the_event_as_json() -> None:
    msg = render(Route(Provider.WEBHOOK, ALL), published())
    assert msg is not None and msg.path == "" and msg.notice == Notice.PUBLISHED
    doc = body(msg)
    assert doc["notice"] == "published"
    assert doc["event"]["id"] == 7 and doc["event"]["host"] == "web-1" and doc["event"]["version"] == 3
    assert doc["event"]["commit"] == SHA and doc["event"]["data"]["latency"] == 30.0
    assert doc["text"] == "[reconciler] published: web-1 published version 3 from 0123456789ab in 12.0s"
    assert render(Route(Provider.WEBHOOK, frozenset({Notice.FAILED})), published()) is None


def test_slack_gets_text_and_blocks_with_its_control_characters_escaped() -> None:
    doc = body(render(Route(Provider.SLACK, ALL, target_url="https://fleet.example/hosts/web-2"), FAILED))
    assert doc["text"] == (
        "[reconciler] FAILED: web-2 failed at 0123456789ab in 4.0s: build failed: &lt;!channel&gt; &amp; co"
    )
    section, context = doc["blocks"]
    assert section["type"] == "section" and section["text"]["type"] == "mrkdwn"
    assert section["text"]["text"].startswith("*FAILED*: web-2 failed")
    assert "<!channel>" not in section["text"]["text"]
    assert section["text"]["text"].endswith("<https://fleet.example/hosts/web-2|details>")
    assert context["type"] == "context" and "`0123456789ab`" in context["elements"][0]["text"]
    assert f"<!date^{int(NOW)}^" in context["elements"][0]["text"]


@pytest.mark.parametrize("provider", [Provider.GITHUB, Provider.GITEA])
def test_github_and_gitea_get_a_commit_status_per_host(provider: Provider) -> None:
    route = Route(
        provider, ALL, repository="acme/fleet", context="deploy", target_url="https://fleet.example/"
    )
    msg = render(route, published())
    assert msg is not None and msg.path == f"/repos/acme/fleet/statuses/{SHA}"
    assert body(msg) == {
        "state": "success",
        "context": "deploy/web-1",
        "description": "web-1 published version 3 from 0123456789ab in 12.0s",
        "target_url": "https://fleet.example/",
    }
    assert body(render(route, FAILED))["state"] == "failure"
    assert body(render(route, FAILED))["context"] == "deploy/web-2"
    # A refused commit is no host's: the status is the fleet's.
    assert body(render(route, UNTRUSTED))["state"] == "error"
    assert body(render(route, UNTRUSTED))["context"] == "deploy"
    assert body(render(route, published(recovered=True)))["state"] == "success"


def test_gitlab_gets_a_commit_status_on_its_project() -> None:
    route = Route(Provider.GITLAB, ALL, repository="infra/fleet")
    msg = render(route, FAILED)
    assert msg is not None and msg.path == f"/projects/infra%2Ffleet/statuses/{SHA}"
    assert body(msg) == {"state": "failed", "name": "reconciler/web-2", "description": FAILED_DESCRIPTION}
    assert body(render(route, UNTRUSTED))["state"] == "failed"
    assert body(render(route, published()))["state"] == "success"


FAILED_DESCRIPTION = "web-2 failed at 0123456789ab in 4.0s: build failed: <!channel> & co"


def test_a_commit_status_description_is_cut_and_needs_a_commit() -> None:
    route = Route(Provider.GITHUB, ALL, repository="acme/fleet")
    long = Event(EventType.HOST_FAILED, NOW, "web-1", SHA, error="x" * 500)
    description = body(render(route, long))["description"]
    assert len(description) == 140 and description.endswith("…")
    assert render(route, Event(EventType.HOST_FAILED, NOW, "web-1", None, error="x")) is None


def test_tries_back_off_doubling_to_the_cap_then_give_up() -> None:
    b = Backoff(attempts=5, initial=1.0, max=5.0)
    assert [b.delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 5.0, None]
    # A server's Retry-After is honoured, but never past the cap.
    assert b.delay(1, retry_after=3.0) == 3.0
    assert b.delay(1, retry_after=3600.0) == 5.0
    assert b.delay(3, retry_after=0.5) == 4.0
    assert Backoff(attempts=1).delay(1) is None


def test_only_what_may_pass_is_tried_again() -> None:
    assert retryable(None) and retryable(429) and retryable(500) and retryable(503) and retryable(408)
    assert not retryable(400) and not retryable(401) and not retryable(404) and not retryable(422)


def test_the_rate_limit_lets_a_burst_through_then_spaces_the_rest() -> None:
    t = 1000.0  # a fake monotonic clock
    bucket = RateLimit.full(6, t)  # six a minute: one every ten seconds
    waits = []
    for _ in range(8):
        bucket, wait = bucket.take(t)
        waits.append(wait)
    assert waits == [0.0] * 6 + [10.0, 20.0]
    # Two were promised beyond the bucket: after 20 s it is empty, after 30 s one is back.
    t += 30
    bucket, wait = bucket.take(t)
    assert wait == 0.0
    bucket, wait = bucket.take(t)
    assert wait == pytest.approx(10.0)
    # A long quiet fills the bucket up to its size, not beyond.
    t += 3600
    for _ in range(6):
        bucket, wait = bucket.take(t)
        assert wait == 0.0
    assert bucket.take(t)[1] == pytest.approx(10.0)


# -- configuration ----------------------------------------------------------------------

BASE: dict[str, Any] = {
    "repo": {"url": "repo"},
    "store": {"path": "store"},
    "state_dir": "state",
    "signing": {"gnupghome": "gnupg", "key": "K"},
}


def load(tmp_path: Path, **top: Any) -> Any:
    path = tmp_path / "reconciler.yaml"
    path.write_text(yaml.safe_dump({**BASE, **top}))
    return load_config(path)


def test_notification_targets_are_read_with_defaults(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        events={"keep": 500, "max_age": "7d"},
        notifications=[
            {"type": "webhook", "url": "https://hooks.example/r", "secret_file": "hook.key"},
            {"type": "slack", "name": "chat", "url_file": "slack.url", "on": ["failed", "recovered"]},
            {"type": "github", "repository": "acme/fleet", "token_file": "gh.token", "context": "ci/deploy"},
            {
                "type": "gitlab",
                "url": "https://gitlab.example/api/v4",
                "repository": "42",
                "token_file": "gl.token",
                "timeout": "30s",
                "retry": {"attempts": 3, "initial": 0.5, "max": "2m"},
                "max_per_minute": 10,
                "queue": 50,
            },
        ],
    )
    assert (cfg.events.keep, cfg.events.max_age) == (500, 7 * 86400)
    hook, chat, gh, gl = cfg.notifications
    assert (
        hook.name == "webhook-1"
        and hook.url == "https://hooks.example/r"
        and hook.secret_file == tmp_path / "hook.key"
    )
    assert hook.route == Route(Provider.WEBHOOK, frozenset(Notice))
    assert (hook.timeout, hook.backoff, hook.max_per_minute, hook.queue) == (10.0, Backoff(), 60, 1000)
    assert chat.name == "chat" and chat.url is None and chat.url_file == tmp_path / "slack.url"
    assert chat.route.on == {Notice.FAILED, Notice.RECOVERED}
    assert (
        gh.url == "https://api.github.com"
        and gh.route.repository == "acme/fleet"
        and gh.route.context == "ci/deploy"
    )
    assert gl.url == "https://gitlab.example/api/v4" and gl.timeout == 30.0
    assert gl.backoff == Backoff(attempts=3, initial=0.5, max=120.0) and (gl.max_per_minute, gl.queue) == (
        10,
        50,
    )
    # The URL may be a credential: it is not in the config's repr (what a traceback would show).
    assert "hooks.example" not in repr(hook)


def test_defaults_keep_a_month_of_history_and_notify_nobody(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    assert (cfg.events.keep, cfg.events.max_age, cfg.notifications) == (100_000, 30 * 86400, ())


@pytest.mark.parametrize(
    ("entry", "key", "reason"),
    [
        ({"type": "pager"}, "type", "must be one of webhook, slack, github, gitea, gitlab"),
        ({"type": "webhook"}, "url", "is required (or url_file)"),
        ({"type": "gitea", "repository": "a/b", "token_file": "t"}, "url", "is required (or url_file)"),
        ({"type": "webhook", "url": "ftp://x"}, "url", "must be an http:// or https:// URL"),
        ({"type": "webhook", "url": "https://x", "url_file": "u"}, "url", "give url or url_file, not both"),
        ({"type": "webhook", "url": "https://x", "colour": 1}, "colour", "unknown key"),
        ({"type": "webhook", "url": "https://x", "on": ["deployed"]}, "on", "must list some of"),
        ({"type": "webhook", "url": "https://x", "on": []}, "on", "must list some of"),
        (
            {"type": "github", "repository": "acme/fleet"},
            "token_file",
            "is required for a github commit status",
        ),
        ({"type": "github", "token_file": "t"}, "repository", "must be the repository as owner/name"),
        ({"type": "github", "token_file": "t", "repository": "a/b/c"}, "repository", "owner/name"),
        ({"type": "gitlab", "token_file": "t", "repository": "../x"}, "repository", "a project id or path"),
        (
            {"type": "slack", "url": "https://x", "repository": "a/b"},
            "repository",
            "only for commit statuses",
        ),
        ({"type": "slack", "url": "https://x", "token_file": "t"}, "token_file", "use url_file"),
        ({"type": "slack", "url": "https://x", "secret_file": "s"}, "secret_file", "only for a webhook"),
        ({"type": "webhook", "url": "https://x", "name": "Ops Hook"}, "name", "lowercase"),
        ({"type": "webhook", "url": "https://x", "timeout": "1h"}, "timeout", "at most 300 seconds"),
        ({"type": "webhook", "url": "https://x", "retry": {"attempts": 0}}, "retry.attempts", "from 1 to 20"),
        ({"type": "webhook", "url": "https://x", "retry": {"tries": 2}}, "retry.tries", "unknown key"),
        ({"type": "webhook", "url": "https://x", "max_per_minute": 0}, "max_per_minute", "from 1 to 10000"),
        ({"type": "webhook", "url": "https://x", "queue": True}, "queue", "from 1 to 100000"),
        ({"type": "webhook", "url": "https://x", "target_url": "javascript:x"}, "target_url", "http://"),
        ({"type": "github", "token_file": "t", "repository": "a/b", "context": "a b"}, "context", "letters"),
    ],
)
def test_a_bad_notification_target_names_its_key(
    tmp_path: Path, entry: dict[str, Any], key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, notifications=[entry])
    assert exc.value.key == f"notifications[0].{key}"
    assert reason in exc.value.reason


def test_targets_need_distinct_names_and_the_history_a_sane_size(tmp_path: Path) -> None:
    two = [{"type": "webhook", "url": "https://x", "name": "ops"}] * 2
    with pytest.raises(ConfigError, match="two targets are named 'ops'"):
        load(tmp_path, notifications=two)
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, events={"keep": 0})
    assert exc.value.key == "events.keep"
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, events={"max_age": "forever"})
    assert exc.value.key == "events.max_age"


# -- requests, with the credentials read from their files --------------------------------


def target(tmp_path: Path, entry: dict[str, Any]) -> Target:
    cfg = load(tmp_path, notifications=[entry])
    return Target(cfg.notifications[0], cfg.path, 0)


def test_each_provider_is_sent_its_own_credentials(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("s3cret-token\n")
    (tmp_path / "hook.key").write_text("hmac-key\n")
    (tmp_path / "slack.url").write_text("https://hooks.slack.example/services/T0/B0/XYZ\n")
    msg = render(Route(Provider.GITHUB, ALL, repository="acme/fleet"), published())
    assert msg is not None

    gh = target(tmp_path, {"type": "github", "repository": "acme/fleet", "token_file": "token"})
    req = gh.request(msg)
    assert req.url == f"https://api.github.com/repos/acme/fleet/statuses/{SHA}"
    assert req.headers["Authorization"] == "Bearer s3cret-token"
    assert req.headers["Accept"] == "application/vnd.github+json"
    gitea = target(
        tmp_path,
        {
            "type": "gitea",
            "url": "https://gitea.example/api/v1/",
            "repository": "acme/fleet",
            "token_file": "token",
        },
    )
    req = gitea.request(msg)
    assert req.url == f"https://gitea.example/api/v1/repos/acme/fleet/statuses/{SHA}"
    assert req.headers["Authorization"] == "token s3cret-token"
    gl = target(tmp_path, {"type": "gitlab", "repository": "7", "token_file": "token"})
    assert gl.request(msg).headers["PRIVATE-TOKEN"] == "s3cret-token"
    assert "Authorization" not in gl.request(msg).headers

    hook = target(tmp_path, {"type": "webhook", "url": "https://hooks.example/in", "secret_file": "hook.key"})
    wmsg = render(Route(Provider.WEBHOOK, ALL), published())
    assert wmsg is not None
    req = hook.request(wmsg)
    assert req.url == "https://hooks.example/in" and req.headers["X-Reconciler-Notice"] == "published"
    expected = hmac.new(b"hmac-key", wmsg.body, hashlib.sha256).hexdigest()
    assert req.headers["X-Reconciler-Signature-256"] == f"sha256={expected}"
    assert "Authorization" not in req.headers

    slack = target(tmp_path, {"type": "slack", "url_file": "slack.url"})
    req = slack.request(wmsg)
    assert req.url == "https://hooks.slack.example/services/T0/B0/XYZ"
    # Neither the target nor its request shows a credential when printed.
    for shown in (repr(slack), repr(req), repr(gh), repr(gh.request(msg))):
        assert "XYZ" not in shown and "s3cret" not in shown and "hooks.slack" not in shown


def test_a_credential_file_that_cannot_be_read_names_its_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        target(tmp_path, {"type": "github", "repository": "a/b", "token_file": "missing"})
    assert exc.value.key == "notifications[0].token_file" and "cannot read" in exc.value.reason
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError) as exc:
        target(tmp_path, {"type": "slack", "url_file": "empty"})
    assert exc.value.key == "notifications[0].url_file" and "is empty" in exc.value.reason
    (tmp_path / "not-a-url").write_text("hooks.slack.example/x\n")
    with pytest.raises(ConfigError) as exc:
        target(tmp_path, {"type": "slack", "url_file": "not-a-url"})
    assert "http://" in exc.value.reason
