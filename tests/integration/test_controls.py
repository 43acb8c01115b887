"""An operator's controls of a running daemon: suspend and resume, reconcile-now (CLI and
POST /reconcile), reload on SIGHUP, JSON logs. A real daemon process on 127.0.0.1, real
git, Nix and gpg."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import (
    ConfigRepo,
    Signing,
    answer,
    cli,
    free_port,
    is_ready,
    latest_version,
    metric_value,
    stop_gpg_agent,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration

TOKEN = "reconcile-token-for-tests"
HOST = "name: {name}\nformats: [aci]\nfiles: {{etc/motd: {motd!r}}}\n"


def fleet(repo: ConfigRepo, motd: str) -> str:
    for name in ("a-1", "b-1"):
        repo.write(f"hosts/{name}.yaml", HOST.format(name=name, motd=f"{name} says {motd}\n"))
    return repo.commit(f"motd {motd}")


def post(url: str, headers: dict[str, str]) -> tuple[int, str]:
    return answer(url, b"", headers)


class Daemon:
    """`reconciler --log-format json run` on 127.0.0.1, polling only once an hour."""

    def __init__(self, tmp_path: Path, repo: ConfigRepo, signing: Signing, **extra: Any) -> None:
        (tmp_path / "token").write_text(TOKEN + "\n")
        self.settings: dict[str, Any] = {
            "poll_interval": 3600,
            "triggers": {"watch": False, "reconcile_token_file": str(tmp_path / "token")},
            **extra,
        }
        self.cfg = write_config(tmp_path, repo, signing, **self.settings)
        self.base = "http://" + yaml.safe_load(self.cfg.read_text())["listen"]
        self.store = tmp_path / "store"
        self.log = tmp_path / "daemon.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "reconciler", "--log-format", "json", "run", "-c", str(self.cfg)],
                stderr=out,
                stdin=subprocess.DEVNULL,
            )

    def ready(self) -> bool:
        return is_ready(self.base)

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The daemon's events so far; every line of its log is one JSON object."""
        events = [json.loads(line) for line in self.log.read_text().splitlines()]
        return [e for e in events if name is None or e["event"] == name]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return cli(*args, "-c", str(self.cfg), timeout=300)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def daemon(tmp_path: Path, config_repo: ConfigRepo, signing: Signing) -> Iterator[Daemon]:
    fleet(config_repo, "one")
    d = Daemon(tmp_path, config_repo, signing)
    try:
        wait_for(d.ready, 300, "the first pass")
        yield d
    finally:
        d.close()


def test_suspend_and_reconcile_now_against_a_running_daemon(daemon: Daemon, config_repo: ConfigRepo) -> None:
    d = daemon
    wait_for(lambda: latest_version(d.store, "b-1") == 1, 60, "the first releases")
    assert latest_version(d.store, "a-1") == 1
    done = cli("suspend", "-c", str(d.cfg), "a-1")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("suspended host a-1")
    assert "event=suspend " in done.stderr and "host=a-1" in done.stderr
    # And in the event history, as the daemon records its own.
    history = cli("events", "-c", str(d.cfg), "--type", "suspended", "--json")
    assert [e["host"] for e in json.loads(history.stdout)["events"]] == ["a-1"], history.stderr
    head = fleet(config_repo, "two")

    # The daemon polls once an hour: only reconcile-now brings the new commit in.
    now = d.cli("reconcile-now")
    assert now.returncode == 0, now.stderr
    assert now.stdout.startswith("accepted")
    wait_for(lambda: latest_version(d.store, "b-1") == 2, 120, "b-1 version 2")
    assert latest_version(d.store, "a-1") == 1
    assert metric_value(d.base, "reconciler_host_suspended", {"host": "a-1"}) == 1
    assert metric_value(d.base, "reconciler_host_suspended", {"host": "b-1"}) is None
    assert metric_value(d.base, "reconciler_fleet_suspended") == 0
    assert metric_value(d.base, "reconciler_wakeups_total", {"trigger": "manual"}) == 1
    assert [e["host"] for e in d.events("host_suspended")] == ["a-1"]

    status = json.loads(d.cli("status", "--json").stdout)
    assert status["commit"] == head
    assert status["hosts"]["a-1"]["version"] == 1 and status["hosts"]["a-1"]["suspended_since"] > 0
    assert status["hosts"]["b-1"]["suspended_since"] is None
    text = d.cli("status").stdout
    assert re.search(r"^a-1: version 1 published since \S+ \S+Z; suspended since ", text, re.M), text
    assert re.search(r"^last pass: \S+ \S+Z \(\d+s ago\), success in ", text, re.M), text
    plan = d.cli("plan")
    assert plan.returncode == 0, plan.stderr
    assert "a-1: suspended: the host is suspended (reconciler resume a-1); otherwise rebuild:" in plan.stdout
    assert plan.stdout.rstrip().endswith("1 suspended, 1 unchanged")

    # Unauthenticated or wrong: 401 with the reason in one line, and no pass.
    code, body = post(d.base + "/reconcile", {})
    assert (code, body) == (401, "unauthorized: no Authorization header (send Authorization: Bearer TOKEN)\n")
    code, body = post(d.base + "/reconcile", {"Authorization": "Bearer " + TOKEN[:-1]})
    assert (code, body) == (401, "unauthorized: wrong token\n")
    assert metric_value(d.base, "reconciler_reconcile_requests_total", {"result": "unauthorized"}) == 2

    resumed = d.cli("resume", "a-1")
    assert resumed.returncode == 0 and resumed.stdout.startswith("resumed host a-1")
    code, _ = post(d.base + "/reconcile", {"Authorization": f"Bearer {TOKEN}"})
    assert code == 202
    wait_for(lambda: latest_version(d.store, "a-1") == 2, 120, "a-1 version 2 once resumed")
    wait_for(lambda: bool(d.events("host_resumed")), 10, "event=host_resumed")
    # --wait: the pass it asked for, finished, and its result as the exit code.
    waited = d.cli("reconcile-now", "--wait", "--timeout", "2m")
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert re.fullmatch(
        rf"ok: pass \d+: commit {head[:12]}: 0 published, 0 failed, 0 invalid, 0 in backoff\n", waited.stdout
    ), waited.stdout

    # A suspended fleet takes no request for a pass.
    assert d.cli("suspend").returncode == 0
    refused = d.cli("reconcile-now")
    assert refused.returncode == 1
    assert refused.stderr.strip().endswith("refused (409): the fleet is suspended: reconciler resume first")
    assert len(refused.stderr.strip().splitlines()) == 1
    assert metric_value(d.base, "reconciler_fleet_suspended") == 1
    assert "suspended: the whole fleet, since" in d.cli("status").stdout
    once = d.cli("reconcile")
    assert once.returncode == 1 and "the fleet is suspended" in once.stderr


def test_reconcile_now_says_in_one_line_what_is_missing(tmp_path: Path, signing: Signing) -> None:
    repo = ConfigRepo(tmp_path / "repo")
    cfg = write_config(tmp_path, repo, signing)
    got = cli("reconcile-now", "-c", str(cfg))
    assert got.returncode == 1
    assert got.stderr == (
        f"reconciler: error: {cfg}: triggers.reconcile_token_file: "
        "is not set, so the daemon takes no such request\n"
    )
    (tmp_path / "token").write_text(TOKEN)
    port = free_port()
    cfg = write_config(
        tmp_path,
        repo,
        signing,
        listen=f"0.0.0.0:{port}",
        triggers={"reconcile_token_file": str(tmp_path / "token")},
    )
    got = cli("reconcile-now", "-c", str(cfg))
    assert got.returncode == 1
    assert got.stderr == (
        f"reconciler: error: cannot reach http://127.0.0.1:{port}/reconcile: Connection refused\n"
    )


def test_sighup_reloads_the_config_between_passes_and_keeps_it_when_invalid(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    config_repo.write("README.md", "no hosts yet\n")
    config_repo.commit("empty fleet")
    d = Daemon(tmp_path, config_repo, signing)
    try:
        wait_for(d.ready, 300, "the first pass")
        assert metric_value(d.base, "reconciler_wakeups_total", {"trigger": "poll"}) == 0
        listen = yaml.safe_load(d.cfg.read_text())["listen"]
        d.cfg.write_text(
            yaml.safe_dump(
                {
                    **yaml.safe_load(d.cfg.read_text()),
                    "poll_interval": 1,
                    "listen": f"127.0.0.1:{free_port()}",
                }
            )
        )
        d.proc.send_signal(signal.SIGHUP)
        # Polled every second from now on, on the address it listened on already.
        wait_for(
            lambda: (metric_value(d.base, "reconciler_wakeups_total", {"trigger": "poll"}) or 0) >= 2,
            30,
            "passes at the new poll interval",
        )
        (reloaded,) = d.events("config_reloaded")
        assert reloaded["changed"] == "poll_interval" and reloaded["file"] == str(d.cfg)
        assert [e["keys"] for e in d.events("config_reload_needs_restart")] == ["listen"]
        assert listen in d.base

        good = d.cfg.read_text()
        d.cfg.write_text(good.replace("poll_interval: 1", "poll_interval: -5"))
        d.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: bool(d.events("config_reload_failed")), 30, "the refused reload")
        (failed,) = d.events("config_reload_failed")
        assert failed["level"] == "error"
        assert (failed["file"], failed["key"]) == (str(d.cfg), "poll_interval")
        assert failed["reason"] == "must be a positive number of seconds"
        # Still running, with the config it had.
        polls = metric_value(d.base, "reconciler_wakeups_total", {"trigger": "poll"}) or 0
        wait_for(
            lambda: (metric_value(d.base, "reconciler_wakeups_total", {"trigger": "poll"}) or 0) > polls + 1,
            30,
            "polls going on at one a second",
        )
        assert d.proc.poll() is None
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(60) == 0
    finally:
        d.close()
    # One JSON object per line, every line.
    assert all(isinstance(e, dict) and {"ts", "level", "event"} <= e.keys() for e in d.events())
    assert os.path.getsize(d.log) > 0


def expired_key(home: Path) -> str:
    """A key in ``home`` that expired a second after it was made."""
    home.mkdir(mode=0o700)
    gpg = ["gpg", "--homedir", str(home), "--batch"]
    subprocess.run(
        [
            *gpg,
            "--passphrase",
            "",
            "--quick-gen-key",
            "Expired <e@example.invalid>",
            "ed25519",
            "sign",
            "seconds=1",
        ],
        check=True,
        capture_output=True,
    )
    out = subprocess.run(
        [*gpg, "--with-colons", "--list-secret-keys"], check=True, capture_output=True, text=True
    )
    return next(line.split(":")[9] for line in out.stdout.splitlines() if line.startswith("fpr:"))


def test_check_says_each_thing_that_would_fail_in_one_line(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> None:
    fleet(config_repo, "one")
    cfg = write_config(tmp_path, config_repo, signing)
    base = yaml.safe_load(cfg.read_text())
    got = cli("check", "-c", str(cfg), timeout=300)
    assert got.returncode == 0, got.stdout + got.stderr
    lines = got.stdout.splitlines()
    assert [line.split(": ", 2)[:2] for line in lines] == [
        [name, "ok"] for name in ("config", "state_dir", "signing", "store", "log", "nix", "git")
    ]
    assert lines[2] == f"signing: ok: key {signing.fingerprint}, expires never, signs"
    assert lines[4] == "log: ok: no log in the store yet: the first release published starts it"
    assert lines[5] == "nix: ok: builds run in Nix's sandbox"
    assert lines[6] == f"git: ok: {config_repo.path} answers: main is at {config_repo.head}"
    # The probe object is gone again.
    assert not [p for p in (tmp_path / "store").iterdir() if p.name.startswith(".reconciler-check-")]

    (tmp_path / "a-file").write_text("not a directory\n")
    faults_home = tmp_path / "expired-gnupg"
    expired = expired_key(faults_home)
    time.sleep(2)
    signing_of = base["signing"]
    faults: list[tuple[dict[str, Any], str]] = [
        (
            {"signing": {**signing_of, "key": "ABCDEF" + "0" * 34}},
            f"signing: FAILED: {cfg}: signing.key: no secret key 'ABCDEF{'0' * 34}' in {signing.gnupghome}",
        ),
        (
            {"signing": {**signing_of, "passphrase_file": str(tmp_path / "no-passphrase")}},
            f"signing: FAILED: {cfg}: signing.passphrase_file: {tmp_path / 'no-passphrase'} does not exist",
        ),
        (
            {"signing": {**signing_of, "gnupghome": str(tmp_path / "no-gnupg")}},
            f"signing: FAILED: {cfg}: signing.gnupghome: {tmp_path / 'no-gnupg'} does not exist",
        ),
        (
            {"signing": {"gnupghome": str(faults_home), "key": expired}},
            f"signing: FAILED: {cfg}: signing.key: signing key {expired} expired on ",
        ),
        (
            {"store": {"type": "filesystem", "path": str(tmp_path / "a-file" / "store")}},
            "store: FAILED: cannot write .reconciler-check-",
        ),
        (
            {"repo": {"url": str(tmp_path / "no-repo"), "branch": "main"}},
            f"git: FAILED: cannot reach {tmp_path / 'no-repo'}: '{tmp_path / 'no-repo'}'"
            " does not appear to be a git repository",
        ),
    ]
    try:
        for change, expected in faults:
            cfg.write_text(yaml.safe_dump({**base, **change}))
            got = cli("check", "-c", str(cfg), timeout=300)
            assert got.returncode == 1, (change, got.stdout)
            lines = got.stdout.splitlines()
            assert len(lines) == 7 and "Traceback" not in got.stderr, got.stdout + got.stderr
            failed = [line for line in lines if ": FAILED: " in line]
            assert len(failed) == 1 and failed[0].startswith(expected), (failed, expected)

        # The daemon runs the same checks and does not start.
        cfg.write_text(yaml.safe_dump({**base, **faults[0][0]}))
        got = cli("run", "-c", str(cfg), timeout=300)
        assert got.returncode == 1
        assert got.stderr.splitlines()[-1] == "reconciler: error: preflight: " + faults[0][1].replace(
            ": FAILED", ""
        )
        assert "Traceback" not in got.stderr
        assert not (tmp_path / "store" / "hosts").exists()
    finally:
        stop_gpg_agent(faults_home)
