"""Change detection at fleet scale, in one run.

Generates a config repository of N hosts (default 1,000) sharing profiles and two
packages, then prints:
  - plan time (in process, and the `reconciler plan` command) against a bare
    `nix-instantiate` of the same hosts, and their ratio;
  - how many builds a one-host change triggers (must be 1);
  - the daemon's peak RSS over a pass of the whole fleet.

The store and state are seeded as if every host had been published from the first
commit (recording the evaluated image derivations), so that building 1,000 hosts
does not dominate a benchmark of change detection. The one-host change is then
reconciled for real: built, signed and published.

    python3 benchmarks/fleet_scale.py [--hosts 1000] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reconciler.adapters.tree import read_tree  # noqa: E402
from reconciler.config import load_config  # noqa: E402
from reconciler.core.hosts import parse_fleet  # noqa: E402
from reconciler.daemon.reconciler import COMMIT_KEY  # noqa: E402
from reconciler.demo import make_signing_key  # noqa: E402
from reconciler.wiring import open_reconciler  # noqa: E402

TOOLCHAIN_DIR = Path(os.environ.get("RECONCILER_TEST_CACHE", Path.home() / ".cache" / "reconciler-tests")) / (
    "toolchain"
)
PROFILES = 10
TARGETS = {"plan_seconds": 2.0, "plan_ratio": 1.2, "rss_mb": 150.0}

PACKAGE = """\
{{ toolchain }}:
derivation {{
  name = "{name}";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  args = [ "sh" "-c" "${{toolchain.busybox}} mkdir -p $out/srv/{name} &&
    echo {name} > $out/srv/{name}/index" ];
}}
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def host_yaml(i: int, address_octet: int = 10) -> str:
    name = f"host-{i:04d}"
    package = "site" if i % 2 else "api"
    return yaml.safe_dump(
        {
            "name": name,
            "include": [f"role-{i % PROFILES}"],
            "network": {"address": f"10.{i // 250}.{i % 250}.{address_octet}/16"},
            "services": {
                "web": {"package": package, "exec": ["bin/busybox", "httpd", "-f", "-p", "8080"]},
                "tick": {"exec": ["bin/busybox", "sh", "-c", "while true; do sleep 60; done"]},
            },
            "files": {"etc/motd": f"{name}\n"},
        }
    )


def make_repo(repo: Path, hosts: int) -> None:
    (repo / "hosts").mkdir(parents=True)
    (repo / "profiles").mkdir()
    (repo / "packages").mkdir()
    (repo / "profiles/base.yaml").write_text("network: {gateway: 10.0.0.1, dns: [10.0.0.1]}\n")
    for p in range(PROFILES):
        (repo / f"profiles/role-{p}.yaml").write_text(
            f'include: [base]\nfiles: {{etc/role: "role-{p}\\n"}}\n'
        )
    for name in ("site", "api"):
        (repo / f"packages/{name}.nix").write_text(PACKAGE.format(name=name))
    for i in range(hosts):
        (repo / f"hosts/host-{i:04d}.yaml").write_text(host_yaml(i))
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=bench", "-c", "user.email=bench@example.invalid", "commit", "-qm", "fleet")


def timed(fn: object, repeat: int) -> float:
    """Median wall time of ``repeat`` calls."""
    assert callable(fn)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--keep", type=Path, help="work in this directory and keep it")
    args = ap.parse_args()
    work = args.keep or Path(tempfile.mkdtemp(prefix="reconciler-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return run(work, args.hosts, args.repeat)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def run(work: Path, hosts: int, repeat: int) -> int:
    repo = work / "repo"
    t = time.perf_counter()
    make_repo(repo, hosts)
    print(f"generated {hosts} hosts, {PROFILES + 1} profiles, 2 packages in {time.perf_counter() - t:.1f}s")
    fpr = make_signing_key(work / "gnupg", name="Bench")
    cfg_path = work / "reconciler.yaml"
    cfg_path.write_text(
        yaml.safe_dump(
            {
                "repo": {"url": str(repo)},
                "store": {"type": "filesystem", "path": str(work / "store")},
                "state_dir": str(work / "state"),
                "signing": {"gnupghome": str(work / "gnupg"), "key": fpr},
                "nix": {"toolchain_dir": str(TOOLCHAIN_DIR)},
                "listen": "127.0.0.1:0",
                "poll_interval": 3600,
            }
        )
    )
    cfg = load_config(cfg_path)
    rec = open_reconciler(cfg)
    try:
        # Seed: every host published from the first commit. This first plan is cold:
        # no parsed or evaluated host is cached yet.
        t = time.perf_counter()
        obs, plan = rec.plan()
        cold = time.perf_counter() - t
        for name, image in obs.evaluation.images.items():
            rec.state.record_published(name, 1, image, obs.commit)
        rec.state.set_meta(COMMIT_KEY, obs.commit)
        assert len(obs.evaluation.images) == hosts, obs.evaluation.errors

        # A bare evaluation of the same hosts, as the daemon's fleet file gives them to Nix.
        fleet = parse_fleet(read_tree(rec.source.checkout))
        fleet_file = rec.nix.write_fleet(list(fleet.hosts.values()))
        bare_cmd = rec.nix.eval_command(fleet_file, rec.source.checkout)
        bare = timed(lambda: subprocess.run(bare_cmd, check=True, capture_output=True), repeat)

        # One host changes, in a new commit before each timed plan.
        moves = iter(range(100, 200))

        def move_host_7() -> None:
            (repo / "hosts/host-0007.yaml").write_text(host_yaml(7, address_octet=next(moves)))
            git(repo, "-c", "user.name=b", "-c", "user.email=b@example.invalid", "commit", "-qam", "move 7")

        times = []
        for _ in range(repeat):
            move_host_7()
            t = time.perf_counter()
            _, plan = rec.plan()
            times.append(time.perf_counter() - t)
        in_process = statistics.median(times)
        rebuild = [e.host for e in plan.entries if e.action == "rebuild"]
        plan_cmd = [sys.executable, "-m", "reconciler", "plan", "-c", str(cfg_path)]
        cli = timed(lambda: subprocess.run(plan_cmd, check=True, capture_output=True), repeat)
        result = rec.reconcile()
        built = int(rec.metrics.host_builds.labels("success")._value.get())
        published = [(o.host, o.version) for o in result.outcomes if o.ok]
    finally:
        rec.close()
    fleet_file.unlink(missing_ok=True)

    # The daemon's first pass parses, evaluates and plans the whole fleet.
    rss = daemon_peak_rss(cfg_path)

    ratio = in_process / bare
    print(f"bare nix-instantiate of {hosts} hosts:   {bare:.3f}s (median of {repeat})")
    print(f"plan after a one-host commit (daemon):  {in_process:.3f}s  ratio {ratio:.2f}x")
    print(f"cold plan (nothing cached, all hosts):  {cold:.3f}s  ratio {cold / bare:.2f}x")
    print(f"`reconciler plan` command (new process): {cli:.3f}s  ratio {cli / bare:.2f}x")
    print(f"one-host change plans {len(rebuild)} rebuild(s): {', '.join(rebuild)}")
    print(f"one-host change built {built} host(s), published {published}")
    print(f"daemon peak RSS over a full pass:       {rss:.1f} MB")
    checks = {
        f"plan < {TARGETS['plan_seconds']}s (also cold)": max(in_process, cold) < TARGETS["plan_seconds"],
        f"plan < {TARGETS['plan_ratio']}x bare evaluation": ratio < TARGETS["plan_ratio"],
        "one-host change builds exactly 1": built == 1 and rebuild == ["host-0007"],
        f"daemon RSS < {TARGETS['rss_mb']} MB": rss < TARGETS["rss_mb"],
    }
    for what, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {what}")
    return 0 if all(checks.values()) else 1


def daemon_peak_rss(cfg_path: Path) -> float:
    """Run `reconciler run` until its first pass is done; return its peak RSS in MB."""
    data = yaml.safe_load(cfg_path.read_text())
    data["listen"] = "127.0.0.1:19188"
    cfg_path.write_text(yaml.safe_dump(data))
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "run", "-c", str(cfg_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 1800
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen("http://127.0.0.1:19188/metrics", timeout=5) as r:
                    text = r.read().decode()
                if 'reconciler_reconcile_runs_total{result="success"} 1.0' in text or (
                    'reconciler_reconcile_runs_total{result="failure"} 1.0' in text
                ):
                    return peak_rss_mb(proc.pid)
            except OSError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {proc.returncode}")
            time.sleep(0.5)
        raise RuntimeError("the daemon's first pass did not finish in time")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


if __name__ == "__main__":
    raise SystemExit(main())
