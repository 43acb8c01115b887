"""Change detection at fleet scale: what a plan costs against Nix itself, in one run.

Per fleet size (default 1,000 and 10,000 generated hosts sharing profiles; packages
`site` and `api` used by 95% of hosts between them, `rare` by 5%), prints:
  - a bare `nix-instantiate` of every host (the fleet file the daemon hands Nix),
    and `reconciler plan` as a user runs it (a new process) cold (a fresh state
    directory beside the daemon's clone: nothing parsed or evaluated yet) and warm
    (after a one-host commit, the daemon's ledger as its last pass left it), with
    their ratios to the bare evaluation timed beside them in each round (wall clock,
    the targets' measure, and CPU time of all processes, which the machine's other
    work moves less);
  - how many hosts a README edit, a comment-only package edit and an edit of the
    package 5% of hosts use send to Nix again;
  - a daemon pass at an unchanged head, against the same pass of the code in
    --baseline (a checkout of the commit before this work) when given;
  - with --baseline, its `reconciler plan` cold and warm too, each on a state its
    own code seeded, timed in turn with this code's and the bare evaluation (on a
    shared machine the load moves: only ratios taken side by side compare);
  - the daemon's peak RSS over its first pass of the whole fleet;
then PASS/FAIL per target. Nothing is built: the state is seeded as if every host
had been published from the first commit.

    python3 benchmarks/fleet_scale.py [--hosts 1000 10000] [--baseline DIR] [--keep DIR] [--plans-only]
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

# --code: the reconciler whose passes are timed (a baseline checkout's, for one).
ROOT = Path(os.environ.get("RECONCILER_CODE", Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(ROOT))

from reconciler.adapters.nix import Nix  # noqa: E402
from reconciler.config import load_config  # noqa: E402
from reconciler.core.hosts import Host  # noqa: E402
from reconciler.core.model import COMMIT_KEY, Evaluation  # noqa: E402
from reconciler.demo import KeyType, make_signing_key  # noqa: E402
from reconciler.wiring import open_reconciler  # noqa: E402

TOOLCHAIN_DIR = Path(os.environ.get("RECONCILER_TEST_CACHE", Path.home() / ".cache" / "reconciler-tests")) / (
    "toolchain"
)
PROFILES = 10
TARGETS = {"warm": 1.2, "cold": 2.0, "rare_share": 0.05, "idle_ratio": 0.2, "rss_mb": 150.0}

PACKAGE = """\
{{ toolchain }}:
# {comment}
derivation {{
  name = "{name}";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  args = [ "sh" "-c" "${{toolchain.busybox}} mkdir -p $out/srv/{name} &&
    echo {content} > $out/srv/{name}/index" ];
}}
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True).stdout


def commit(repo: Path, message: str) -> None:
    git(repo, "add", "-A")
    git(repo, "-c", "user.name=b", "-c", "user.email=b@example.invalid", "commit", "-qm", message)


def package_of(i: int) -> str:
    return "rare" if i % 20 == 0 else ("site" if i % 2 else "api")


def host_yaml(i: int, address_octet: int = 10) -> str:
    name = f"host-{i:05d}"
    return yaml.safe_dump(
        {
            "name": name,
            "include": [f"role-{i % PROFILES}"],
            "network": {"address": f"10.{i // 250 % 256}.{i % 250}.{address_octet}/8"},
            "services": {
                "web": {"package": package_of(i), "exec": ["bin/busybox", "httpd", "-f", "-p", "8080"]},
                "tick": {"exec": ["bin/busybox", "sh", "-c", "while true; do sleep 60; done"]},
            },
            "files": {"etc/motd": f"{name}\n"},
        }
    )


def write_package(repo: Path, name: str, comment: str = "a package", content: str = "") -> None:
    (repo / f"packages/{name}.nix").write_text(
        PACKAGE.format(name=name, comment=comment, content=content or name)
    )


def make_repo(repo: Path, hosts: int) -> None:
    for d in ("hosts", "profiles", "packages"):
        (repo / d).mkdir(parents=True)
    (repo / "README.md").write_text("# the fleet\n")
    (repo / "profiles/base.yaml").write_text("network: {gateway: 10.0.0.1, dns: [10.0.0.1]}\n")
    for p in range(PROFILES):
        (repo / f"profiles/role-{p}.yaml").write_text(
            f'include: [base]\nfiles: {{etc/role: "role-{p}\\n"}}\n'
        )
    for name in ("site", "api", "rare"):
        write_package(repo, name)
    for i in range(hosts):
        (repo / f"hosts/host-{i:05d}.yaml").write_text(host_yaml(i))
    git(repo, "init", "-q", "-b", "main")
    commit(repo, "fleet")


def timed(fn: Callable[[], object], repeat: int) -> float:
    """Median wall time of ``repeat`` calls."""
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


def write_config(
    path: Path, work: Path, repo: Path, state: str, fpr: str, port: int = 0, workers: int | str = 1
) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "repo": {"url": str(repo)},
                "store": {"type": "filesystem", "path": str(work / f"store-{state}")},
                "state_dir": str(work / state),
                "signing": {"gnupghome": str(work / "gnupg"), "key": fpr},
                # Only when not the default: the baseline's loader predates the key.
                "nix": {"toolchain_dir": str(TOOLCHAIN_DIR)}
                | ({"eval_workers": workers} if workers != 1 else {}),
                "listen": f"127.0.0.1:{port}",
                "poll_interval": 3600,
            }
        )
    )
    return path


def seed(cfg_path: Path) -> None:
    """Every host published from the head commit, as far as the ledger knows."""
    rec = open_reconciler(load_config(cfg_path))
    try:
        obs, _ = rec.plan()
        assert not obs.evaluation.errors, obs.evaluation.errors
        with rec.state.transaction():
            for name, image in obs.evaluation.images.items():
                rec.state.record_published(name, 1, image, obs.commit)
            rec.state.set_meta(COMMIT_KEY, obs.commit)
    finally:
        rec.close()


def seed_with(code: Path, cfg_path: Path) -> None:
    """seed() by the reconciler in ``code``, in a process of its own."""
    subprocess.run(
        [sys.executable, __file__, "--seed", str(cfg_path)],
        check=True,
        capture_output=True,
        env={**os.environ, "RECONCILER_CODE": str(code)},
    )


def idle_pass(cfg_path: Path, repeat: int) -> float:
    """Seed, run one pass (it signs the TUF metadata once), then the median of
    ``repeat`` passes at the same head: what every poll costs while nothing changes."""
    seed(cfg_path)
    rec = open_reconciler(load_config(cfg_path))
    try:
        rec.reconcile()
        return timed(rec.reconcile, repeat)
    finally:
        rec.close()


@dataclass(frozen=True)
class Cost:
    wall: float  # seconds
    cpu: float  # seconds of CPU, user and system, of a process and those it waited for


@dataclass(frozen=True)
class Ratios:
    """A command's cost over the bare evaluation's: medians of per-round ratios."""

    wall: float
    cpu: float
    seconds: float  # median wall time


class Counting:
    """Counts the hosts a reconciler hands Nix to evaluate."""

    def __init__(self, evaluate: Callable[[Sequence[Host], Path], Evaluation]) -> None:
        self.evaluate = evaluate
        self.hosts = 0

    def __call__(self, hosts: Sequence[Host], repo: Path) -> Evaluation:
        self.hosts += len(hosts)
        return self.evaluate(hosts, repo)


def run(work: Path, hosts: int, repeat: int, baseline: Path | None, plans_only: bool) -> dict[str, bool]:
    print(f"\n== {hosts} hosts")
    repo = work / "repo"
    t = time.perf_counter()
    make_repo(repo, hosts)
    print(f"generated {hosts} hosts, {PROFILES + 1} profiles, 3 packages in {time.perf_counter() - t:.1f}s")
    # Ed25519, as when the README's figures were taken: an RSA 3072 signature (the
    # demo's default) makes each signed TUF file some 640 bytes larger and slower to sign.
    fpr = make_signing_key(work / "gnupg", name="Bench", key_type=KeyType.ED25519)
    cfg_path = write_config(work / "reconciler.yaml", work, repo, "state", fpr)
    seed(cfg_path)
    # The baseline's plans read a ledger its own code wrote (parse results are kept
    # per parser version).
    codes = {"this": ROOT} | ({"baseline": baseline} if baseline is not None else {})
    configs = {"this": cfg_path}
    if baseline is not None:
        configs["baseline"] = write_config(work / "baseline.yaml", work, repo, "state-base", fpr)
        seed_with(baseline, configs["baseline"])
    cfg = load_config(cfg_path)
    rec = open_reconciler(cfg)
    results: dict[str, bool] = {}
    try:
        # A bare evaluation of the same hosts, as the daemon's fleet file gives them to Nix.
        obs, _ = rec.plan()
        assert isinstance(rec.nix, Nix)
        fleet_file = rec.nix.write_fleet(list(obs.fleet.hosts.values()))
        bare_cmd = rec.nix.eval_command(fleet_file, rec.source.checkout)

        def measured(cmd: list[str], env: dict[str, str] | None = None, cwd: Path | None = None) -> Cost:
            """Wall time, and CPU time of the process and every process it waited for."""
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True, env=env, cwd=cwd)
            wall = time.perf_counter() - t
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
            return Cost(wall, cpu)

        def bare() -> Cost:
            return measured(bare_cmd)

        def plan(code: str, config: Path) -> Cost:
            env = {**os.environ, "PYTHONPATH": str(codes[code])}
            # In the code's own directory: `python -m` puts the working directory first
            # on the path, before PYTHONPATH, and a checkout there would be what ran.
            cmd = [sys.executable, "-m", "reconciler", "plan", "-c", str(config)]
            return measured(cmd, env, cwd=codes[code])

        # Cold: a state directory of its own holding only the daemon's clone.
        def cold_plan(code: str, workers: int | str) -> Cost:
            state = work / "state-cold"
            shutil.rmtree(state, ignore_errors=True)
            state.mkdir()
            shutil.copytree(work / "state/checkout", state / "checkout", symlinks=True)
            config = write_config(work / "cold.yaml", work, repo, "state-cold", fpr, workers=workers)
            return plan(code, config)

        # Each round times the bare evaluation and then each code's plan; a ratio is the
        # median over the rounds of each round's own ratio, so that it compares what ran
        # under the same load (other work on the machine moves it by a factor of 3).
        def rounds(runs: dict[str, Callable[[], Cost]]) -> dict[str, Ratios]:
            costs: dict[str, list[Cost]] = {what: [] for what in runs}
            for _ in range(repeat):
                for what, run_once in runs.items():
                    costs[what].append(run_once())
            bare_costs = costs["bare"]
            return {
                what: Ratios(
                    wall=statistics.median(c.wall / b.wall for c, b in zip(cs, bare_costs, strict=True)),
                    cpu=statistics.median(c.cpu / b.cpu for c, b in zip(cs, bare_costs, strict=True)),
                    seconds=statistics.median(c.wall for c in cs),
                )
                for what, cs in costs.items()
            }

        # eval_workers: auto parses and evaluates with one process per core.
        cold = rounds(
            {"bare": bare}
            | {code: functools.partial(cold_plan, code, 1) for code in codes}
            | {f"{code} auto": functools.partial(cold_plan, code, "auto") for code in codes}
        )

        (repo / "hosts/host-00007.yaml").write_text(host_yaml(7, address_octet=99))
        commit(repo, "move host 7")
        warm = rounds({"bare": bare} | {code: functools.partial(plan, code, configs[code]) for code in codes})
        fleet_file.unlink()
        print(
            f"bare nix-instantiate of {hosts} hosts:        {cold['bare'].seconds:.3f}s"
            f" (median of {repeat}; {warm['bare'].seconds:.3f}s beside the warm plans)"
        )
        print("ratios to the bare evaluation beside it: wall clock (CPU time of all processes)")
        cores = len(os.sched_getaffinity(0))
        for code in codes:
            which = "" if code == "this" else f" ({code}: {codes[code]})"
            print(f"`reconciler plan` (new process){which}")
            for what, r in (
                ("cold, eval_workers 1:", cold[code]),
                (f"cold, eval_workers auto ({cores}):", cold[f"{code} auto"]),
                ("warm, one-host commit:", warm[code]),
            ):
                print(f"  {what:30s} {r.seconds:7.3f}s  ratio {r.wall:.2f}x ({r.cpu:.2f}x)")
        results[f"plan command warm <= {TARGETS['warm']}x bare ({hosts} hosts)"] = (
            warm["this"].wall <= TARGETS["warm"]
        )
        results[f"plan command cold <= {TARGETS['cold']}x bare ({hosts} hosts)"] = (
            cold["this"].wall <= TARGETS["cold"]
        )
        results[f"plan command cold, eval_workers auto, <= {TARGETS['cold']}x bare ({hosts} hosts)"] = (
            cold["this auto"].wall <= TARGETS["cold"]
        )
        if plans_only:
            return results

        # Which hosts each kind of edit sends to Nix again, in the daemon's own plan.
        counting = Counting(rec.nix.evaluate)
        rec.nix.evaluate = counting  # type: ignore[method-assign]  # counts the daemon's own evaluations
        rec.plan()

        def evaluated_after(edit: Callable[[], object], what: str) -> int:
            edit()
            commit(repo, what)
            before = counting.hosts
            t = time.perf_counter()
            rec.plan()
            n = counting.hosts - before
            print(f"{what + ':':40s} {n} host(s) evaluated ({time.perf_counter() - t:.2f}s plan)")
            return n

        readme = evaluated_after(
            lambda: (repo / "README.md").write_text("# the fleet\nmore docs\n"), "README edit"
        )
        comment = evaluated_after(
            lambda: write_package(repo, "site", comment="reworded"), "comment-only package edit"
        )
        users = sum(package_of(i) == "rare" for i in range(hosts))
        rare = evaluated_after(
            lambda: write_package(repo, "rare", content="rare-2"), "edit of the package 5% use"
        )
        results[f"README edit evaluates 0 hosts ({hosts})"] = readme == 0
        results[f"comment-only package edit evaluates 0 hosts ({hosts})"] = comment == 0
        results[f"a package used by {users} hosts evaluates those {users} ({hosts})"] = rare == users
    finally:
        rec.close()

    # A pass at an unchanged head, in a process of its own per code base.
    def idle(code: Path, state: str) -> float:
        cfg = write_config(work / f"{state}.yaml", work, repo, state, fpr)
        out = subprocess.run(
            [sys.executable, __file__, "--idle-pass", str(cfg), "--repeat", str(repeat)],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "RECONCILER_CODE": str(code)},
        )
        return float(out.stdout.strip().splitlines()[-1])

    now = idle(ROOT, "state-idle")
    print(f"daemon pass at an unchanged head:         {now:.3f}s")
    if baseline is not None:
        before = idle(baseline, "state-idle-base")
        print(f"  the same pass, code of {baseline}: {before:.3f}s  ratio {now / before:.2f}x")
        results[f"unchanged-head pass <= {TARGETS['idle_ratio']}x baseline ({hosts})"] = (
            now <= TARGETS["idle_ratio"] * before
        )

    # A state of its own, seeded at the head: the first pass parses, evaluates and
    # plans the whole fleet, and builds nothing.
    rss_cfg = write_config(work / "rss.yaml", work, repo, "state-rss", fpr, port=19188)
    seed(rss_cfg)
    rss = daemon_peak_rss(rss_cfg)
    print(f"daemon peak RSS over its first pass:      {rss:.1f} MB")
    results[f"daemon RSS <= {TARGETS['rss_mb']} MB ({hosts})"] = rss <= TARGETS["rss_mb"]
    return results


def daemon_peak_rss(cfg_path: Path) -> float:
    """Run `reconciler run` until its first pass is done; return its peak RSS in MB."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "reconciler", "run", "-c", str(cfg_path)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
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


def run_each(
    hosts: list[int], keep: Path | None, prefix: str, run: Callable[[Path, int], dict[str, bool]]
) -> int:
    """``run`` a fleet size, each in a work directory of its own (under ``keep``, else a
    temporary one removed after); then a PASS or FAIL line a target, and 0 if all passed."""
    results: dict[str, bool] = {}
    for n in hosts:
        work = (keep / str(n)) if keep else Path(tempfile.mkdtemp(prefix=prefix))
        work.mkdir(parents=True, exist_ok=True)
        try:
            results.update(run(work, n))
        finally:
            if keep is None:
                shutil.rmtree(work, ignore_errors=True)
    print()
    for what, ok in results.items():
        print(f"{'PASS' if ok else 'FAIL'}  {what}")
    return 0 if all(results.values()) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, nargs="+", default=[1000, 10000])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--baseline", type=Path, help="a checkout of the code to compare plans and the idle pass with"
    )
    ap.add_argument("--keep", type=Path, help="work in this directory and keep it")
    ap.add_argument("--plans-only", action="store_true", help="time the plans against Nix, nothing else")
    ap.add_argument("--idle-pass", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.seed is not None:
        seed(args.seed)
        return 0
    if args.idle_pass is not None:
        print(idle_pass(args.idle_pass, args.repeat))
        return 0
    # An installed package has its bytecode; a checkout under PYTHONDONTWRITEBYTECODE
    # would charge every new process for compiling it.
    for code in (ROOT, args.baseline):
        if code is not None:
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(code / "reconciler")], check=True)
    return run_each(
        args.hosts,
        args.keep,
        "reconciler-bench-",
        lambda work, n: run(work, n, args.repeat, args.baseline, args.plans_only),
    )


if __name__ == "__main__":
    raise SystemExit(main())
