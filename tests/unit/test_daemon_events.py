"""The daemon's share of the event history (reconciler.daemon.loop): refused webhooks, at
most one record a minute, and GET /api/events."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from reconciler.adapters.http import Request
from reconciler.config import TriggerConfig
from reconciler.core.events import EventType
from reconciler.daemon.loop import Daemon
from tests.conftest import reconciler_log
from tests.unit.test_daemon_pass import FLEET
from tests.unit.test_pass_events import EventWorld


def daemon(world: EventWorld, tmp_path: Path) -> Daemon:
    secret = tmp_path / "hook.secret"
    secret.write_text("s3cret\n")
    rec = world.reconciler()
    cfg = replace(
        rec.cfg, listen="127.0.0.1:0", triggers=TriggerConfig(webhook_secret_file=secret, watch=False)
    )
    return Daemon(cfg, rec)


def test_refused_webhooks_are_recorded_and_logged_at_most_once_a_minute_with_a_count(
    tmp_path: Path,
) -> None:
    world = EventWorld(tmp_path)
    d = daemon(world, tmp_path)
    try:
        forged = {"X-GitHub-Event": "push", "X-Hub-Signature-256": "sha256=00"}
        with reconciler_log() as out:
            for _ in range(4):
                assert d.webhook(forged, b"{}")[0] == 401
                world.clock.advance(10)
            world.clock.advance(30)  # a minute after the first
            assert d.webhook({"X-Gitlab-Event": "Push Hook"}, b"{}")[0] == 401
        logged = [ln for ln in out.getvalue().splitlines() if "event=webhook_refused" in ln]
        assert len(logged) == 2 and logged[1].endswith(" suppressed=3"), logged
        first, second = world.history.of(EventType.WEBHOOK_REFUSED)
        assert (
            first.data == {"suppressed": 0}
            and first.error is not None
            and "X-Hub-Signature-256" in first.error
        )
        assert (
            second.data == {"suppressed": 3} and second.error is not None and "X-Gitlab-Token" in second.error
        )
    finally:
        d.server.stop()


def test_the_history_is_served_as_json_and_a_bad_query_is_a_400(tmp_path: Path) -> None:
    world = EventWorld(tmp_path)
    world.nix.failing.add("web-2")
    commit = world.source.push(FLEET)
    d = daemon(world, tmp_path)
    try:
        d.reconciler.reconcile()

        def get(**query: list[str]) -> tuple[int, dict[str, Any]]:
            code, ctype, body = d.api_events(Request("/api/events", query, {}, "127.0.0.1"))
            assert ctype == "application/json"
            return code, json.loads(body)

        code, doc = get(host=["web-2"])
        assert code == 200
        (failed,) = doc["events"]
        assert failed["type"] == "host_failed" and failed["commit"] == commit and failed["host"] == "web-2"
        code, doc = get(type=["pass_started,pass_finished"], since=["1h"], limit=["1"])
        assert code == 200 and [e["type"] for e in doc["events"]] == ["pass_finished"]
        # Since an hour after the clock's now: nothing yet.
        assert get(since=[str(world.clock.t + 3600)]) == (200, {"events": []})
        assert get(limit=["lots"]) == (400, {"error": "limit: must be an integer from 1 to 10000"})
    finally:
        d.server.stop()
