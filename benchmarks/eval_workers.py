"""Evaluation of N hosts by 1 and by 2 evaluation workers (nix.eval_workers), in one run.

Generates a config repository of N hosts (default 1,000) on 8 packages and prints the
wall time of `Nix.evaluate` over all of them with each number of workers, next to one
bare `nix-instantiate` of the same hosts; then the same with one more host whose
package allocates past nix.eval_memory, which the workers must narrow down to it.
Every run's result must equal the one-worker result.

    python3 benchmarks/eval_workers.py [--hosts 1000] [--workers 1 2] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reconciler.adapters.nix import Nix  # noqa: E402
from reconciler.adapters.tree import read_tree  # noqa: E402
from reconciler.config import NixConfig  # noqa: E402
from reconciler.core.hosts import Host, parse_fleet  # noqa: E402
from reconciler.core.model import Evaluation  # noqa: E402

TOOLCHAIN_DIR = Path(os.environ.get("RECONCILER_TEST_CACHE", Path.home() / ".cache" / "reconciler-tests")) / (
    "toolchain"
)
PACKAGES = 8
MEMORY = 1 << 30

PACKAGE = """\
{{ toolchain }}:
derivation {{
  name = "{name}";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  args = [ "sh" "-c" "${{toolchain.busybox}} mkdir -p $out/srv/{name}" ];
}}
"""
HOG = """\
{ toolchain }:
derivation {
  name = "hog";
  system = "x86_64-linux";
  builder = toolchain.busybox;
  n = builtins.length (builtins.genList (x: x) 100000000);
}
"""


def make_repo(repo: Path, hosts: int, hog: bool) -> None:
    for d in ("hosts", "packages"):
        (repo / d).mkdir(parents=True, exist_ok=True)
    for p in range(PACKAGES):
        (repo / f"packages/pkg-{p}.nix").write_text(PACKAGE.format(name=f"pkg-{p}"))
    (repo / "packages/hog.nix").write_text(HOG)
    for i in range(hosts + (1 if hog else 0)):
        name = f"host-{i:05d}"
        package = "hog" if i == hosts else f"pkg-{i % PACKAGES}"
        (repo / f"hosts/{name}.yaml").write_text(
            yaml.safe_dump(
                {
                    "name": name,
                    "formats": ["aci"],
                    "network": {"address": f"10.{i // 250}.{i % 250}.10/16"},
                    "services": {"main": {"package": package, "exec": ["bin/busybox", "sleep", str(i)]}},
                }
            )
        )


def median_time(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Median wall time of ``repeat`` calls, and the median CPU time of the processes
    they ran: on a busy machine the wall time of parallel workers says little, their
    CPU time (the same for 1 and N workers if nothing is evaluated twice) does."""
    times, cpu = [], []
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(times), statistics.median(cpu)


def measure(work: Path, hosts: list[Host], repo: Path, workers: list[int], repeat: int) -> bool:
    """Print the time of each number of workers; whether all gave the same result."""
    results: dict[int, Evaluation] = {}
    for n in workers:
        nix = Nix(work / "state", NixConfig(toolchain_dir=TOOLCHAIN_DIR, eval_workers=n, eval_memory=MEMORY))

        def run(nix: Nix = nix, n: int = n) -> None:
            results[n] = nix.evaluate(hosts, repo)

        seconds, cpu = median_time(run, repeat)
        print(
            f"  {n} worker(s): {seconds:7.3f}s, Nix CPU {cpu:7.3f}s  ({len(results[n].images)} images, "
            f"{len(results[n].errors)} errors, {nix.evaluations // repeat} nix-instantiate runs)"
        )
    first = results[workers[0]]
    return all(r == first for r in results.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=1000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="reconciler-bench-eval-"))
    try:
        load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
        print(f"{os.cpu_count()} cores, load {load}; nix.eval_memory {MEMORY >> 20} MiB per worker")
        same = True
        for hog in (False, True):
            repo = work / ("repo-hog" if hog else "repo")
            make_repo(repo, args.hosts, hog)
            fleet = parse_fleet(read_tree(repo))
            hosts = list(fleet.hosts.values())
            if not hog:
                # Stage the toolchain and write every .drv once: no run pays for that.
                nix = Nix(work / "state", NixConfig(toolchain_dir=TOOLCHAIN_DIR))
                nix.evaluate(hosts, repo)
                bare, bare_cpu = median_time(
                    partial(
                        subprocess.run,
                        nix.eval_command(nix.write_fleet(hosts), repo),
                        check=True,
                        capture_output=True,
                    ),
                    args.repeat,
                )
                print(f"{len(hosts)} hosts, bare nix-instantiate: {bare:.3f}s, CPU {bare_cpu:.3f}s")
            else:
                print(f"{len(hosts)} hosts, one of them over nix.eval_memory:")
            same = measure(work, hosts, repo, args.workers, args.repeat) and same
        print(f"{'PASS' if same else 'FAIL'}  every number of workers gives the one-worker result")
        return 0 if same else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
