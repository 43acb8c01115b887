"""reconciler.daemon.preflight on fakes: each check one line, failures collected, what stops a start."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from reconciler import wiring
from reconciler.adapters.nix import builds_through_daemon
from reconciler.config import Config, NixConfig, RepoConfig, SigningConfig, StoreConfig
from reconciler.core.builders import Builder
from reconciler.daemon import preflight
from reconciler.daemon.preflight import CheckName
from reconciler.errors import ConfigError, ReconcilerError
from tests.fakes import MemoryStore


def config(tmp_path: Path, sandbox: bool = True) -> Config:
    return Config(
        path=tmp_path / "reconciler.yaml",
        repo=RepoConfig(url="/nonexistent/repo"),
        store=StoreConfig(type="filesystem", path=tmp_path / "store"),
        state_dir=tmp_path / "state",
        signing=SigningConfig(gnupghome=tmp_path / "gnupg", key="K"),
        nix=NixConfig(sandbox=sandbox),
    )


def test_the_store_check_writes_reads_and_deletes_a_probe_no_reader_looks_at() -> None:
    store = MemoryStore()
    assert preflight.check_store(store).startswith("wrote, read and deleted memory:///.reconciler-check-")
    assert store.objects == {} and len(store.writes) == 1
    store.full = True
    (result,) = preflight.run([(CheckName.STORE, lambda: preflight.check_store(store))])
    assert not result.ok
    assert result.line().startswith("store: FAILED: cannot write .reconciler-check-")
    assert result.line().endswith(": No space left on device")


def test_the_state_dir_check_names_the_key_and_the_reason(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    assert preflight.check_state_dir(cfg) == f"{tmp_path / 'state'} is writable"
    assert list((tmp_path / "state").iterdir()) == []
    (tmp_path / "file").write_text("")
    bad = Config(**{**cfg.__dict__, "state_dir": tmp_path / "file" / "state"})
    with pytest.raises(ConfigError, match=r"state_dir: .*/file/state: Not a directory"):
        preflight.check_state_dir(bad)


def test_an_unsandboxed_nix_fails_the_check_unless_the_config_accepts_it(tmp_path: Path) -> None:
    assert preflight.sandbox_verdict(config(tmp_path), True) == "builds run in Nix's sandbox"
    with pytest.raises(ConfigError, match=r"nix\.sandbox: Nix builds unsandboxed here"):
        preflight.sandbox_verdict(config(tmp_path), False)
    assert preflight.sandbox_verdict(config(tmp_path, sandbox=False), False).startswith(
        "off (nix.sandbox: false)"
    )


def fails(why: str) -> str:
    raise ReconcilerError(why + "\nsecond line")


def crashes() -> str:
    raise RuntimeError("a bug\nover two lines")


def test_every_check_runs_and_each_result_is_one_line() -> None:
    results = preflight.run(
        [
            (CheckName.CONFIG, lambda: "fine"),
            (CheckName.SIGNING, lambda: fails("no secret key")),
            (CheckName.STORE, lambda: crashes()),
            (CheckName.GIT, lambda: "reachable"),
        ]
    )
    assert [r.line() for r in results] == [
        "config: ok: fine",
        "signing: FAILED: no secret key | second line",
        "store: FAILED: unexpected error: RuntimeError('a bug\\nover two lines')",
        "git: ok: reachable",
    ]


def test_a_start_stops_at_any_failure_but_an_unreachable_repository() -> None:
    preflight.at_start([(CheckName.CONFIG, lambda: "fine"), (CheckName.GIT, lambda: fails("unreachable"))])
    with pytest.raises(ReconcilerError) as err:
        preflight.at_start(
            [
                (CheckName.SIGNING, lambda: fails("no secret key")),
                (CheckName.GIT, lambda: fails("unreachable")),
                (CheckName.STORE, lambda: fails("read-only")),
            ]
        )
    assert str(err.value) == "preflight: signing: no secret key | second line (also failed: store)"


def test_nix_hands_builds_to_a_daemon_as_nix_remote_or_the_stores_permissions_say(tmp_path: Path) -> None:
    (tmp_path / "db").mkdir()
    for remote in ("daemon", "unix:///run/nix/socket"):
        assert builds_through_daemon({"NIX_REMOTE": remote}, tmp_path)
    assert not builds_through_daemon({"NIX_REMOTE": "local"}, tmp_path)
    # auto (unset): the daemon when this user cannot write the store's database.
    assert not builds_through_daemon({}, tmp_path)
    assert builds_through_daemon({}, tmp_path / "elsewhere")


def test_a_builders_key_is_this_users_to_read_only_when_it_builds_without_a_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With NIX_REMOTE=daemon (deploy/'s unit and the chart) the root nix-daemon builds
    over its own builders and reads their key; the reconciler's user cannot, and its
    container does not even mount it. A start must not refuse that."""
    key = tmp_path / "root-only" / "builder_ed25519"
    b1 = Builder("b1", "ssh-ng://nixbuilder@build-1.example.com", str(key), "ssh-ed25519 AAAA")
    cfg = replace(config(tmp_path), builders=(b1,))
    config_check = dict(wiring.preflight(cfg))[CheckName.CONFIG]
    monkeypatch.setenv("NIX_REMOTE", "daemon")
    assert config_check() == f"{cfg.path} is valid"
    monkeypatch.setenv("NIX_REMOTE", "local")
    with pytest.raises(ConfigError) as err:
        config_check()
    assert (err.value.key, err.value.reason) == ("builders[0].ssh_key", f"{key} does not exist")
