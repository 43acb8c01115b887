"""Unit tests for the agent's pure parts: the release check, the version peek, the config."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from reconciler.agent import (
    MAX_POLLS_BETWEEN_TRIES,
    AgentState,
    RefusalError,
    check_release,
    load_agent_config,
    peek_version,
)
from reconciler.core.release import Artifact, Release
from reconciler.errors import ConfigError

NOW = datetime(2026, 11, 24, 12, 0, tzinfo=UTC)


def release(host: str = "web-1", version: int = 5, expires: datetime = NOW + timedelta(days=1)) -> Release:
    art = Artifact("appimage", f"{host}-{version}-x86_64.AppImage", 10, "a" * 64)
    return Release(host, version, "c" * 40, "/nix/store/x.drv", NOW - timedelta(hours=1), expires, (art,))


def refusal(r: Release, running: int = 4, fmt: str = "appimage") -> tuple[str, str]:
    with pytest.raises(RefusalError) as err:
        check_release(r, "web-1", running, fmt, NOW)
    return err.value.reason, str(err.value)


def test_a_newer_unexpired_release_for_this_host_passes() -> None:
    check_release(release(), "web-1", 4, "appimage", NOW)


def test_each_attack_has_its_own_reason() -> None:
    assert refusal(release(host="web-2")) == ("wrong-host", "release is for host 'web-2', this is 'web-1'")
    assert refusal(release(), running=5) == ("rollback", "version 5 is not newer than the running 5")
    assert refusal(release(version=3)) == ("rollback", "version 3 is not newer than the running 4")
    assert refusal(release(expires=NOW)) == ("expired", "release 5 expired at 2026-11-24T12:00:00+00:00")
    assert refusal(release(), fmt="aci") == ("no-artifact", "release 5 has no aci artifact")


@given(st.integers(1, 10**6), st.integers(0, 10**6))
def test_only_strictly_newer_versions_pass(version: int, running: int) -> None:
    if version > running:
        check_release(release(version=version), "web-1", running, "appimage", NOW)
    else:
        assert refusal(release(version=version), running=running)[0] == "rollback"


def test_peek_version() -> None:
    assert peek_version(b'{"version": 7}', "latest.json") == 7
    for bad in (b"", b"[]", b'{"version": "7"}', b'{"version": 0}', b'{"version": true}', b"[" * 100000):
        with pytest.raises(RefusalError) as err:
            peek_version(bad, "latest.json")
        assert err.value.reason == "malformed"


@given(st.binary(max_size=200))
def test_peek_version_answers_a_version_or_refuses(data: bytes) -> None:
    try:
        version = peek_version(data, "x")
    except RefusalError as exc:
        assert exc.reason == "malformed"
    else:
        assert isinstance(version, int) and version >= 1


def write(tmp_path: Path, **data: Any) -> Path:
    base: dict[str, Any] = {
        "host": "web-1",
        "store": "https://store.example/",
        "keys": ["k.asc"],
        "state_dir": "s",
    }
    base.update(data)
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in base.items() if v is not None}))
    return path


def test_config_defaults_and_relative_paths(tmp_path: Path) -> None:
    cfg = load_agent_config(write(tmp_path, store="store", activate="systemctl restart app"))
    assert cfg.store == str(tmp_path / "store")
    assert cfg.keys == (tmp_path / "k.asc",)
    assert cfg.state_dir == tmp_path / "s"
    assert (cfg.format, cfg.poll_interval, cfg.keep, cfg.supervise) == ("appimage", 60.0, 3, False)
    assert cfg.activate == ("/bin/sh", "-c", "systemctl restart app")
    assert cfg.health is None


@pytest.mark.parametrize(
    ("data", "key", "reason"),
    [
        ({"host": "Web_1"}, "host", "must be a host name"),
        ({"keys": None}, "keys", "must list the publisher's public key file(s): trust is pinned here"),
        ({"keys": []}, "keys", "must list the publisher's public key file(s): trust is pinned here"),
        ({"store": None}, "store", "is required: a URL or a directory"),
        ({"format": "tar"}, "format", "must be one of aci, appimage"),
        (
            {"health": {"url": "http://x/", "command": "true"}},
            "health",
            "needs exactly one of url or command",
        ),
        ({"health": {"url": "ftp://x/"}}, "health.url", "must be an http(s) URL"),
        ({"health": {"url": "http://x/", "retries": 3}}, "health.retries", "unknown key"),
        ({"keep": 1}, "keep", "must be an integer of at least 2"),
        ({"supervise": True, "format": "aci"}, "supervise", "runs an AppImage; set format: appimage"),
        ({"poll_interval": "soon"}, "poll_interval", "must be a duration"),
        ({"colour": "blue"}, "colour", "unknown key"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, data: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_agent_config(write(tmp_path, **data))
    assert err.value.path == str(tmp_path / "agent.yaml")
    assert err.value.key == key
    assert err.value.reason.startswith(reason), err.value.reason


def tries(state: AgentState, version: int, polls: int) -> list[int]:
    """The polls (0-based) at which ``version`` is downloaded when every try fails."""
    out = []
    for poll in range(polls):
        if not state.defer(version):
            out.append(poll)
            state.download_failed(version)
    return out


def test_failed_downloads_are_tried_at_doubling_distances_up_to_a_cap() -> None:
    state = AgentState()
    assert tries(state, 2, 40) == [0, 1, 3, 7, 15, 31]
    state = AgentState()
    at = tries(state, 2, 1000)
    assert max(b - a for a, b in itertools.pairwise(at)) == MAX_POLLS_BETWEEN_TRIES


def test_a_new_version_is_tried_at_once_and_starts_its_own_count(tmp_path: Path) -> None:
    state = AgentState()
    tries(state, 2, 20)
    assert state.retry_skip > 0
    assert not state.defer(3)
    state.download_failed(3)
    assert (state.retry_version, state.retry_failures, state.retry_skip) == (3, 1, 0)
    # The count survives a restart (a timer running --once is a new process each poll).
    state.download_failed(3)
    state.save(tmp_path / "state.json")
    again = AgentState.load(tmp_path / "state.json")
    assert (again.retry_version, again.retry_failures, again.retry_skip) == (3, 2, 1)
    assert again.defer(3) and not again.defer(3)
