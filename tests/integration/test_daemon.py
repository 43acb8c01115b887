"""`reconciler run`: polls the repo, publishes, serves /metrics, /healthz, /readyz."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    WEB,
    ConfigRepo,
    Signing,
    cli,
    free_port,
    reconciler_run,
    standard_fleet,
    wait_for,
    write_config,
)

pytestmark = pytest.mark.integration

SPEC_METRICS = {
    "reconciler_reconcile_runs",
    "reconciler_reconcile_duration_seconds",
    "reconciler_last_successful_reconcile_timestamp_seconds",
    "reconciler_source_info",
    "reconciler_host_builds",
    "reconciler_build_duration_seconds",
    "reconciler_artifacts_published",
    "reconciler_signing_failures",
    "reconciler_git_fetch_errors",
    "reconciler_build_queue_depth",
    "reconciler_host_published_version",
}


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
def daemon(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    standard_fleet(config_repo)
    cfg = write_config(tmp_path, config_repo, signing)
    base = "http://" + yaml.safe_load(cfg.read_text())["listen"]
    with reconciler_run(cfg, tmp_path / "daemon.log") as proc:
        yield base, proc


def test_daemon_publishes_serves_metrics_and_picks_up_new_commits(
    daemon: tuple[str, subprocess.Popen[bytes]], config_repo: ConfigRepo, tmp_path: Path
) -> None:
    base, proc = daemon

    def ready() -> bool:
        try:
            return get(base + "/readyz")[0] == 200
        except OSError:
            return False

    wait_for(ready, 300, "/readyz")
    assert get(base + "/healthz")[0] == 200
    status, text = get(base + "/metrics")
    assert status == 200
    names = {fam.name for fam in text_string_to_metric_families(text)}
    assert names >= SPEC_METRICS, SPEC_METRICS - names
    m = samples(text)
    assert m[("reconciler_reconcile_runs_total", (("result", "success"),))] >= 1
    assert m[("reconciler_host_builds_total", (("result", "success"),))] == 3
    assert m[("reconciler_artifacts_published_total", (("format", "aci"),))] == 3
    assert m[("reconciler_artifacts_published_total", (("format", "appimage"),))] == 2
    assert m[("reconciler_host_published_version", (("host", "web-1"),))] == 1
    assert m[("reconciler_signing_failures_total", ())] == 0
    assert m[("reconciler_build_queue_depth", ())] == 0
    assert m[("reconciler_last_successful_reconcile_timestamp_seconds", ())] > time.time() - 600
    for stage in ("fetch", "parse", "evaluate", "build", "sign", "publish"):
        assert m[("reconciler_stage_duration_seconds_count", (("stage", stage),))] >= 1, stage
    # Three hosts, each: a signature per blob, one embedded in its AppImage (two hosts have
    # one), one of the release, one of its attestations (provenance and SBOM, timed
    # together); one build, one publish.
    assert m[("reconciler_stage_duration_seconds_count", (("stage", "build"),))] == 3
    assert m[("reconciler_stage_duration_seconds_count", (("stage", "sign"),))] == 3 + 2 + 2 + 3 + 3
    # Each release's entry in the transparency log (its checkpoint signed there, not in sign).
    assert m[("reconciler_stage_duration_seconds_count", (("stage", "log"),))] == 3
    assert m[("reconciler_commit_to_published_seconds_count", ())] == 3
    assert m[("reconciler_commit_to_published_seconds_sum", ())] > 0
    info = [k for k in m if k[0] == "reconciler_source_info"]
    assert info and ("commit", config_repo.head) in info[0][1]

    config_repo.write("hosts/web-2.yaml", WEB.format(name="web-2", address="10.42.0.77/24", port=18082))
    new_head = config_repo.commit("move web-2")

    def published_v2() -> bool:
        return (
            samples(get(base + "/metrics")[1]).get(
                ("reconciler_host_published_version", (("host", "web-2"),))
            )
            == 2
        )

    wait_for(published_v2, 300, "web-2 version 2 on /metrics")
    m = samples(get(base + "/metrics")[1])
    assert m[("reconciler_host_published_version", (("host", "web-1"),))] == 1
    assert m[("reconciler_host_builds_total", (("result", "success"),))] == 4
    assert any(("commit", new_head) in k[1] for k in m if k[0] == "reconciler_source_info")
    assert (tmp_path / "store/hosts/web-2/releases/2.json").exists()

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0


SECRET = "ghp-S3cr3tT0k3n"


@pytest.mark.parametrize("where", ["missing path", "url with a credential"])
def test_git_fetch_errors_are_counted_and_not_ready(tmp_path: Path, signing: Signing, where: str) -> None:
    missing = ConfigRepo.__new__(ConfigRepo)
    missing.path = tmp_path / "no-such-repo"
    cfg = write_config(tmp_path, missing, signing)
    if where == "url with a credential":
        # Nothing listens there. The credential belongs in repo.credentials_file, but
        # wherever it was written, nothing shows it.
        url = f"http://alice:{SECRET}@127.0.0.1:{free_port()}/fleet.git"
        cfg = write_config(tmp_path, missing, signing, repo={"url": url, "branch": "main"})
    base = "http://" + yaml.safe_load(cfg.read_text())["listen"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "run", "-c", str(cfg)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def counted() -> bool:
            try:
                text = get(base + "/metrics")[1]
            except OSError:
                return False
            return samples(text).get(("reconciler_git_fetch_errors_total", ()), 0) >= 2

        wait_for(counted, 60, "git fetch errors on /metrics")
        code, body = get(base + "/readyz")
        assert code == 503
        assert "cannot clone" in body
        # status says so too, rather than nothing at all.
        status = cli("status", "-c", str(cfg))
        assert status.returncode == 0, status.stderr
        lines = status.stdout.splitlines()
        assert lines[0] == "commit (never reconciled)"
        assert (
            lines[1].startswith("last pass: ") and ", failure in " in lines[1] and "cannot clone" in lines[1]
        )
        assert lines[2] == "last successful pass: never"
        assert lines[3].startswith("fetch: FAILING since ") and "cannot clone" in lines[3], lines
        as_json = cli("status", "-c", str(cfg), "--json").stdout
        assert json.loads(as_json)["fetch_error"]["passes"] >= 2
        check = cli("check", "-c", str(cfg))
        shown = body + status.stdout + as_json + check.stdout + check.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "event=reconcile_failed" in err and "cannot clone" in err
    assert SECRET not in shown + err
    if where == "url with a credential":
        assert "http://127.0.0.1:" in err
