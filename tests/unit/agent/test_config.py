"""Unit tests of the agent's config file: defaults, relative paths, errors naming the key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from reconciler.agent.config import load_agent_config
from reconciler.errors import ConfigError


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
    assert cfg.zsync is True
    assert load_agent_config(write(tmp_path, store="store", zsync=False)).zsync is False
    assert cfg.require_provenance is False
    assert load_agent_config(write(tmp_path, require_provenance=True)).require_provenance is True


@pytest.mark.parametrize(
    ("data", "key", "reason"),
    [
        ({"host": "Web_1"}, "host", "must be a host name"),
        ({"keys": None}, "keys", "must list the publisher's public key file(s): trust is pinned here"),
        ({"keys": []}, "keys", "must list the publisher's public key file(s): trust is pinned here"),
        ({"store": None}, "store", "is required: a URL or a directory"),
        ({"format": "tar"}, "format", "must be one of aci, appimage"),
        # Several blobs each: not what the agent installs.
        ({"format": "oci"}, "format", "must be one of aci, appimage"),
        ({"format": "aci-thin"}, "format", "must be one of aci, appimage"),
        (
            {"health": {"url": "http://x/", "command": "true"}},
            "health",
            "needs exactly one of url or command",
        ),
        ({"health": {"url": "ftp://x/"}}, "health.url", "must be an http(s) URL"),
        ({"health": {"url": "http://x/", "retries": 3}}, "health.retries", "unknown key"),
        ({"keep": 1}, "keep", "must be an integer of at least 2"),
        ({"supervise": True, "format": "aci"}, "supervise", "runs an AppImage; set format: appimage"),
        (
            {"supervise": True, "activate": "systemctl restart app"},
            "activate",
            "cannot be used with supervise: true",
        ),
        ({"poll_interval": "soon"}, "poll_interval", "must be a duration"),
        ({"colour": "blue"}, "colour", "unknown key"),
        ({"zsync": "yes"}, "zsync", "must be true or false"),
        ({"require_provenance": "yes"}, "require_provenance", "must be true or false"),
        ({"require_log": "yes"}, "require_log", "must be true or false"),
        ({"log_witnesses": ["w.asc"]}, "log_witnesses", "needs require_log: true"),
        ({"require_log": True, "log_witnesses": {"w": 1}}, "log_witnesses", "must list"),
        ({"require_log": True, "log_origin": "two words"}, "log_origin", "must be a log's origin"),
    ],
)
def test_config_errors_name_the_key(tmp_path: Path, data: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_agent_config(write(tmp_path, **data))
    assert err.value.path == str(tmp_path / "agent.yaml")
    assert err.value.key == key
    assert err.value.reason.startswith(reason), err.value.reason


def test_the_log_is_off_unless_required_and_witnesses_are_paths(tmp_path: Path) -> None:
    assert load_agent_config(write(tmp_path)).require_log is False
    cfg = load_agent_config(
        write(tmp_path, require_log=True, log_witnesses="w.asc", log_origin="fleet.example/log")
    )
    assert (cfg.require_log, cfg.log_witnesses, cfg.log_origin) == (
        True,
        (tmp_path / "w.asc",),
        "fleet.example/log",
    )
