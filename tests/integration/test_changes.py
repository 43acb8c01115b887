"""Change detection with real git and Nix: exactly the hosts whose build inputs changed rebuild."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.adapters.nix import NIX_DIR, Nix
from reconciler.config import load_config
from reconciler.core.hosts import Host
from reconciler.core.model import Action, Evaluation
from reconciler.core.plan import Plan
from reconciler.core.release import parse_release
from reconciler.daemon.reconciler import Reconciler
from reconciler.wiring import open_reconciler
from tests.conftest import WEB, ConfigRepo, Signing, recorded_calls, wait_for, write_config

pytestmark = pytest.mark.integration

# web-1 and web-2 include profile `web` (which includes `base`) and use package `site`;
# worker-1 includes only `base` and uses busybox alone.
FILES = {
    "profiles/base.yaml": 'network: {gateway: 10.42.0.1}\nfiles: {etc/motd: "managed\\n"}\n',
    "profiles/web.yaml": 'include: [base]\nfiles: {etc/role: "web\\n"}\n',
    "packages/site.nix": """\
{ toolchain }:
derivation {
  name = "site";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  args = [ "sh" "-c" "${toolchain.busybox} mkdir -p $out/srv/www && echo v1 > $out/srv/www/index.html" ];
}
""",
    "hosts/web-1.yaml": WEB.format(name="web-1", address="10.42.0.11/24", port=18081).replace(
        "include: [base]", "include: [web]"
    ),
    "hosts/web-2.yaml": WEB.format(name="web-2", address="10.42.0.12/24", port=18082).replace(
        "include: [base]", "include: [web]"
    ),
    "hosts/worker-1.yaml": """\
name: worker-1
include: [base]
formats: [aci]
network: {address: 10.42.0.21/24}
services:
  tick: {exec: [bin/busybox, sh, -c, "while true; do sleep 5; done"]}
""",
}


def actions(plan: Plan) -> dict[str, tuple[str, tuple[str, ...]]]:
    return {e.host: (e.action, e.reasons) for e in plan.entries}


@pytest.fixture
def repo(config_repo: ConfigRepo) -> ConfigRepo:
    for rel, text in FILES.items():
        config_repo.write(rel, text)
    config_repo.commit("fleet")
    return config_repo


@pytest.fixture
def config(tmp_path: Path, repo: ConfigRepo, signing: Signing) -> Path:
    return write_config(tmp_path, repo, signing, jobs=2)


@pytest.fixture
def rec(config: Path) -> Iterator[Reconciler]:
    r = open_reconciler(load_config(config))
    assert r.reconcile().ok
    yield r
    r.close()


def test_host_file_edit_rebuilds_that_host_only(rec: Reconciler, repo: ConfigRepo) -> None:
    text = FILES["hosts/worker-1.yaml"].replace("10.42.0.21/24", "10.42.0.22/24")
    repo.write("hosts/worker-1.yaml", text)
    repo.commit("move worker")
    _, plan = rec.plan()
    assert actions(plan) == {
        "web-1": ("unchanged", ("inputs unchanged",)),
        "web-2": ("unchanged", ("inputs unchanged",)),
        "worker-1": ("rebuild", ("hosts/worker-1.yaml changed",)),
    }


def test_profile_edit_rebuilds_every_host_including_it_and_no_other(
    rec: Reconciler, repo: ConfigRepo
) -> None:
    repo.write("profiles/web.yaml", FILES["profiles/web.yaml"].replace("web\\n", "frontend\\n"))
    repo.commit("rename role")
    _, plan = rec.plan()
    assert actions(plan) == {
        "web-1": ("rebuild", ("profiles/web.yaml changed",)),
        "web-2": ("rebuild", ("profiles/web.yaml changed",)),
        "worker-1": ("unchanged", ("inputs unchanged",)),
    }
    # base is included by every host, directly or through web.
    repo.write("profiles/base.yaml", FILES["profiles/base.yaml"].replace("10.42.0.1", "10.42.0.254"))
    repo.commit("new gateway")
    _, plan = rec.plan()
    assert {h: a for h, (a, _) in actions(plan).items()} == {
        "web-1": "rebuild",
        "web-2": "rebuild",
        "worker-1": "rebuild",
    }
    assert actions(plan)["worker-1"][1] == ("profiles/base.yaml changed",)
    result = rec.reconcile()
    assert result.ok
    assert sorted((o.host, o.version) for o in result.outcomes) == [
        ("web-1", 2),
        ("web-2", 2),
        ("worker-1", 2),
    ]


def test_package_edit_rebuilds_the_hosts_using_it(rec: Reconciler, repo: ConfigRepo) -> None:
    repo.write("packages/site.nix", FILES["packages/site.nix"].replace("echo v1", "echo v2"))
    repo.commit("new site")
    _, plan = rec.plan()
    assert actions(plan) == {
        "web-1": ("rebuild", ("packages/site.nix changed",)),
        "web-2": ("rebuild", ("packages/site.nix changed",)),
        "worker-1": ("unchanged", ("inputs unchanged",)),
    }


def test_formatting_and_comment_changes_rebuild_nothing(rec: Reconciler, repo: ConfigRepo) -> None:
    reformatted = """\
# the worker: only the ticker
name:   worker-1
services:
  tick:
    exec:
      - bin/busybox
      - sh
      - -c
      - "while true; do sleep 5; done"
network:
  address: 10.42.0.21/24   # same address, other layout
formats: [aci]
include:
  - base
"""
    repo.write("hosts/worker-1.yaml", reformatted)
    repo.write("profiles/base.yaml", "# shared\n" + FILES["profiles/base.yaml"] + "\n\n")
    repo.commit("reformat")
    _, plan = rec.plan()
    assert {h: a for h, (a, _) in actions(plan).items()} == dict.fromkeys(
        ("web-1", "web-2", "worker-1"), "unchanged"
    )
    assert actions(plan)["worker-1"][1] == (
        "hosts/worker-1.yaml changed but not its build",
        "profiles/base.yaml changed but not its build",
    )
    assert rec.reconcile().outcomes == ()


def test_deleted_host_keeps_its_store_entries_and_status_says_removed(
    rec: Reconciler, repo: ConfigRepo, tmp_path: Path
) -> None:
    repo.remove("hosts/web-2.yaml")
    repo.commit("retire web-2")
    result = rec.reconcile()
    assert result.ok and result.outcomes == ()
    assert actions(result.plan)["web-2"] == ("removed", ("hosts/web-2.yaml no longer exists",))
    assert (tmp_path / "store/hosts/web-2/latest.json").exists()
    assert (tmp_path / "store/hosts/web-2/releases/1.json").exists()
    assert rec.state.hosts()["web-2"].status == "removed"
    # The next pass does not report it again, and nothing rebuilds.
    again = rec.reconcile()
    assert "web-2" not in actions(again.plan) and again.outcomes == ()


def test_renamed_host_is_built_under_its_new_name_and_the_old_one_removed(
    rec: Reconciler, repo: ConfigRepo
) -> None:
    repo.repo.git.mv("hosts/web-2.yaml", "hosts/web-3.yaml")
    repo.write("hosts/web-3.yaml", FILES["hosts/web-2.yaml"].replace("name: web-2", "name: web-3"))
    repo.commit("rename web-2 to web-3")
    result = rec.reconcile()
    assert result.ok
    assert actions(result.plan) == {
        "web-1": ("unchanged", ("inputs unchanged",)),
        "web-2": ("removed", ("hosts/web-2.yaml no longer exists",)),
        "web-3": ("rebuild", ("new host, never published",)),
        "worker-1": ("unchanged", ("inputs unchanged",)),
    }
    assert [(o.host, o.version) for o in result.outcomes] == [("web-3", 1)]


def test_force_push_rewriting_history_rebuilds_only_what_differs(
    repo: ConfigRepo, tmp_path: Path, signing: Signing
) -> None:
    # Force-pushes are refused unless the config allows them (tests/integration/test_gate.py).
    allowed = {"url": str(repo.path), "branch": "main", "allow_force_push": True}
    rec = open_reconciler(load_config(write_config(tmp_path, repo, signing, jobs=2, repo=allowed)))
    try:
        assert rec.reconcile().ok
        repo.write("hosts/web-1.yaml", FILES["hosts/web-1.yaml"].replace("10.42.0.11/24", "10.42.0.91/24"))
        repo.commit("move web-1")
        assert [(o.host, o.version) for o in rec.reconcile().outcomes] == [("web-1", 2)]
        # Rewrite: drop that commit and make another that moves web-2 instead.
        repo.repo.git.reset("--hard", "HEAD~1")
        repo.write("hosts/web-2.yaml", FILES["hosts/web-2.yaml"].replace("10.42.0.12/24", "10.42.0.92/24"))
        rewritten = repo.commit("move web-2 instead")
        _, plan = rec.plan()
        assert plan.commit == rewritten
        # The diff is taken between trees, so the rewrite is explained file by file. web-1 goes
        # back to its first definition: a new release, version 3 (versions never go back).
        assert actions(plan) == {
            "web-1": ("rebuild", ("hosts/web-1.yaml changed",)),
            "web-2": ("rebuild", ("hosts/web-2.yaml changed",)),
            "worker-1": ("unchanged", ("inputs unchanged",)),
        }
        result = rec.reconcile()
        assert sorted((o.host, o.version) for o in result.outcomes) == [("web-1", 3), ("web-2", 2)]
    finally:
        rec.close()


def test_nix_library_change_rebuilds_every_host(rec: Reconciler, tmp_path: Path) -> None:
    nix_dir = tmp_path / "nix"
    shutil.copytree(NIX_DIR, nix_dir)
    host_nix = nix_dir / "host.nix"
    host_nix.write_text(host_nix.read_text().replace("Categories=System;", "Categories=System;Utility;"))
    rec.nix = Nix(rec.cfg.state_dir, rec.cfg.nix, nix_dir=nix_dir)
    _, plan = rec.plan()
    recipe = ("build recipe changed (nix/ library or toolchain)",)
    assert actions(plan) == dict.fromkeys(("web-1", "web-2", "worker-1"), ("rebuild", recipe))


def test_the_toolchain_sources_are_read_once_however_often_it_is_checked(
    rec: Reconciler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every evaluation checks the staged toolchain, from a thread that runs beside the
    parse: the sources it was staged from (files of this package) are read by the first
    check only, and the others read the stamp."""
    nix = Nix(rec.cfg.state_dir, rec.cfg.nix)
    read = recorded_calls(monkeypatch, Path, "read_bytes")
    staged = {nix.ensure_toolchain() for _ in range(3)}
    assert len(staged) == 1 and None not in staged
    runtime = NIX_DIR / "runtime"
    sources = sorted(p for p in runtime.iterdir() if p.is_file())
    assert sorted(p for (p,) in read if p.parent == runtime) == sources


def test_another_nix_instantiate_evaluates_every_host_again_and_rebuilds_nothing(
    rec: Reconciler, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The evaluator is part of what the evaluation cache is keyed by, down to its
    file: a rebuilt Nix of the same version may evaluate differently. Only images that
    then differ are built."""
    rec.nix = Nix(rec.cfg.state_dir, rec.cfg.nix)
    rec.plan()
    assert rec.nix.evaluations == 0  # the same evaluator: every image from the ledger
    real = shutil.which("nix-instantiate")
    assert real is not None
    wrapped = tmp_path / "bin"
    wrapped.mkdir()
    (wrapped / "nix-instantiate").write_text(f'#!/bin/sh\nexec {real} "$@"\n')
    (wrapped / "nix-instantiate").chmod(0o755)
    monkeypatch.setenv("PATH", f"{wrapped}:{os.environ['PATH']}")
    rec.nix = Nix(rec.cfg.state_dir, rec.cfg.nix)
    _, plan = rec.plan()
    assert rec.nix.evaluations >= 1
    assert {e.action for e in plan.entries} == {Action.UNCHANGED}


def test_restart_rebuilds_nothing_already_published(rec: Reconciler, config: Path) -> None:
    rec.close()
    again = open_reconciler(load_config(config))
    try:
        result = again.reconcile()
    finally:
        again.close()
    assert result.ok and result.outcomes == ()
    assert {h: a for h, (a, _) in actions(result.plan).items()} == dict.fromkeys(
        ("web-1", "web-2", "worker-1"), "unchanged"
    )


def test_reconcile_killed_mid_pass_resumes_and_completes(
    repo: ConfigRepo, config: Path, tmp_path: Path
) -> None:
    # One host builds for seconds (a nonce keeps Nix from finding it built), so the
    # pass is still running when the others are published.
    repo.write(
        "packages/slow.nix",
        '{ toolchain }: derivation { name = "slow"; system = "x86_64-linux"; '
        f'builder = toolchain.busybox; nonce = "{uuid.uuid4().hex}"; '
        'args = [ "sh" "-c" "${toolchain.busybox} sleep 8; ${toolchain.busybox} mkdir -p $out" ]; }\n',
    )
    repo.write(
        "hosts/z-slow.yaml",
        "name: z-slow\nformats: [aci]\nservices:\n  s: {package: slow, exec: [bin/busybox, sleep, '9']}\n",
    )
    repo.commit("a slow host")
    cfg = load_config(config)
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "reconciler", "reconcile", "-c", str(config)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # Killed once a host is published and before the pass has recorded anything:
        # outcomes are recorded at the end of the pass, in one transaction.
        def published() -> list[Path]:
            return sorted(store.glob("hosts/*/latest.json"))

        wait_for(lambda: bool(published()) or proc.poll() is not None, 300, "a host's latest.json")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL, "the pass ended before it could be killed"
    first = published()[0]
    first_host = first.parent.name
    release = first.parent / "releases" / "1.json"
    # A temporary file the kill left behind is not a written blob: the restarted pass
    # removes it, which the last assertion checks.
    blobs = [p for p in store.glob("blobs/sha256/*") if not p.name.startswith(".tmp-")]
    written = {p: p.stat().st_mtime_ns for p in [release, *blobs]}

    rec = open_reconciler(cfg)
    try:
        result = rec.reconcile()
        assert result.ok, [(e.host, e.action, e.reasons) for e in result.plan.entries]
        # The host published before the kill is adopted: the same version, nothing of
        # its release written again.
        assert {o.host: o.version for o in result.outcomes}.get(first_host, 1) == 1
        assert {h: hs.version for h, hs in rec.state.hosts().items()} == {
            "web-1": 1,
            "web-2": 1,
            "worker-1": 1,
            "z-slow": 1,
        }
    finally:
        rec.close()
    assert first_host != "z-slow"
    assert {p: p.stat().st_mtime_ns for p in written} == written
    for host in ("web-1", "web-2", "worker-1", "z-slow"):
        releases = sorted(p.name for p in (store / "hosts" / host / "releases").iterdir())
        assert releases == [
            "1.inclusion.json",
            "1.json",
            "1.json.asc",
            "1.provenance.json",
            "1.sbom.json",
        ], (host, releases)
        assert json.loads((store / "hosts" / host / "latest.json").read_text())["version"] == 1
    # Whatever write the kill cut short left no temporary file behind the restarted pass.
    assert not list(store.rglob(".tmp-*"))


def test_temporary_files_of_killed_writes_go_at_the_first_pass_only(
    repo: ConfigRepo, tmp_path: Path, signing: Signing
) -> None:
    cfg = load_config(write_config(tmp_path, repo, signing))
    dead = [tmp_path / "store/hosts/web-1/releases/.tmp-dead", tmp_path / "store/blobs/sha256/.tmp-dead"]
    for path in dead:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("partial")
    rec = open_reconciler(cfg)
    try:
        # A dry-run collection changes nothing, not even leftovers.
        rec.collect_garbage(dry_run=True, on_delete=lambda key: None)
        assert all(path.exists() for path in dead)
        assert rec.reconcile().ok
        assert not any(path.exists() for path in dead)
        # Later passes of the same process leave the store's directories alone: only a
        # write of a dead process can have left a temporary file.
        dead[0].write_text("partial")
        assert rec.reconcile().ok
        assert dead[0].exists()
    finally:
        rec.close()
    again = open_reconciler(cfg)
    try:
        again.collect_garbage(dry_run=False, on_delete=lambda key: None)
        assert not dead[0].exists()
    finally:
        again.close()


def test_state_behind_the_store_adopts_the_published_release(rec: Reconciler, config: Path) -> None:
    """A crash after latest.json was written but before the state recorded it."""
    rec.close()
    (rec.cfg.state_dir / "state.db").unlink()
    for suffix in ("-wal", "-shm"):
        (rec.cfg.state_dir / f"state.db{suffix}").unlink(missing_ok=True)
    again = open_reconciler(load_config(config))
    try:
        result = again.reconcile()
        assert result.ok
        assert sorted((o.host, o.version) for o in result.outcomes) == [
            ("web-1", 1),
            ("web-2", 1),
            ("worker-1", 1),
        ]
        store = rec.cfg.store.path
        assert store is not None, "the test's store is a directory"
        assert not (store / "hosts/web-1/releases/2.json").exists()
    finally:
        again.close()


BROKEN = """\
{ toolchain }:
derivation {
  name = "broken";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  args = [ "sh" "-c" "echo the broken package fails on purpose >&2; exit 3" ];
}
"""


def test_failed_build_does_not_stop_the_others_and_backs_off(
    repo: ConfigRepo, tmp_path: Path, signing: Signing
) -> None:
    repo.write("packages/broken.nix", BROKEN)
    repo.write(
        "hosts/worker-1.yaml", FILES["hosts/worker-1.yaml"].replace("tick: {", "tick: {package: broken, ")
    )
    repo.commit("break worker-1")
    cfg = load_config(write_config(tmp_path, repo, signing, retry={"initial": "60s", "max": "10m"}))
    rec = open_reconciler(cfg)
    try:
        first = rec.reconcile()
        assert not first.ok
        outcomes = {o.host: o for o in first.outcomes}
        assert outcomes["web-1"].ok and outcomes["web-2"].ok
        assert not outcomes["worker-1"].ok
        assert "the broken package fails on purpose" in (outcomes["worker-1"].error or "")
        failed_builds = rec.metrics.registry.get_sample_value(
            "reconciler_host_builds_total", {"result": "failure"}
        )
        assert failed_builds == 1
        assert not (tmp_path / "store/hosts/worker-1").exists(), "a failed build left a partial release"
        hs = rec.state.hosts()["worker-1"]
        assert (hs.status, hs.failures) == ("failed", 1)
        assert hs.retry_at is not None and 55 < hs.retry_at - time.time() <= 60

        # The daemon waits out the backoff; an operator's one-shot pass retries at once.
        waiting = rec.reconcile()
        assert waiting.outcomes == () and not waiting.ok
        action, reasons = actions(waiting.plan)["worker-1"]
        assert action == "backoff" and reasons[0].startswith("build failed 1 time(s) in a row; next retry in")
        forced = rec.reconcile(respect_backoff=False)
        assert [(o.host, o.ok) for o in forced.outcomes] == [("worker-1", False)]
        hs = rec.state.hosts()["worker-1"]
        assert hs.failures == 2 and hs.retry_at is not None and 115 < hs.retry_at - time.time() <= 120

        # A fix is a new build: it does not wait for the old one's backoff.
        repo.write("hosts/worker-1.yaml", FILES["hosts/worker-1.yaml"])
        repo.commit("fix worker-1")
        fixed = rec.reconcile()
        assert fixed.ok and [(o.host, o.version) for o in fixed.outcomes] == [("worker-1", 1)]
        assert rec.state.hosts()["worker-1"].failures == 0
    finally:
        rec.close()


def test_only_hosts_whose_inputs_changed_are_evaluated_again(
    rec: Reconciler, repo: ConfigRepo, monkeypatch: pytest.MonkeyPatch
) -> None:
    evaluated: list[list[str]] = []
    real = rec.nix.evaluate

    def recording(hosts: list[Host], checkout: Path) -> Evaluation:
        evaluated.append(sorted(h.name for h in hosts))
        return real(hosts, checkout)

    monkeypatch.setattr(rec.nix, "evaluate", recording)
    rec.plan()
    assert evaluated == [], "everything was evaluated before: Nix is not even started"
    repo.write("hosts/web-1.yaml", FILES["hosts/web-1.yaml"].replace("10.42.0.11/24", "10.42.0.31/24"))
    repo.commit("move web-1")
    assert actions(rec.plan()[1])["web-1"][0] == "rebuild"
    assert evaluated[-1] == ["web-1"]
    # A file no package uses reaches no host: nothing is evaluated again.
    repo.write("README", "notes\n")
    repo.commit("add notes")
    _, plan = rec.plan()
    assert [h for hosts in evaluated[1:] for h in hosts] == [], evaluated
    assert {h: a for h, (a, _) in actions(plan).items()} == {
        "web-1": "rebuild",
        "web-2": "unchanged",
        "worker-1": "unchanged",
    }


def test_the_daemon_collects_garbage_under_its_pass_lock(
    repo: ConfigRepo, tmp_path: Path, signing: Signing
) -> None:
    cfg = load_config(write_config(tmp_path, repo, signing, retention={"keep": 1, "interval": 1}))
    rec = open_reconciler(cfg)
    try:
        assert rec.reconcile().ok
        first = parse_release((tmp_path / "store/hosts/worker-1/latest.json").read_bytes(), "v1")
        repo.write(
            "hosts/worker-1.yaml", FILES["hosts/worker-1.yaml"].replace("10.42.0.21/24", "10.42.0.29/24")
        )
        repo.commit("move worker")
        time.sleep(1.1)
        assert [(o.host, o.version) for o in rec.reconcile().outcomes] == [("worker-1", 2)]
        releases = sorted(p.name for p in (tmp_path / "store/hosts/worker-1/releases").iterdir())
        assert releases == ["2.inclusion.json", "2.json", "2.json.asc", "2.provenance.json", "2.sbom.json"]
        # The old release's blob went with it; the other hosts' releases stay.
        assert not (tmp_path / "store" / first.artifacts[0].blob).exists()
        assert (tmp_path / "store/hosts/web-1/releases/1.json").exists()
        deleted = rec.metrics.registry.get_sample_value("reconciler_gc_deleted_objects_total")
        assert deleted is not None and deleted >= 4
    finally:
        rec.close()
    # `reconciler gc` takes the same lock and finds nothing more to delete.
    res = subprocess.run(
        [sys.executable, "-m", "reconciler", "gc", "-c", str(cfg.path), "--dry-run"],
        capture_output=True,
        text=True,
    )
    assert res.returncode == 0 and res.stdout.strip().endswith(
        "would delete 0 objects (keeping 1 releases per host)"
    )
