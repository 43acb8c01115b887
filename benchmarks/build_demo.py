"""Build time per host and artifact sizes for the demo fleet (`reconciler init`),
with Nix's sandbox on next to off; then the bytes an agent downloads for a one-file
change of a host, with zsync and without.

Every derivation of each host (its packages, services, image and release
artifacts) is built again from scratch with `nix-store --realise --check`, which
also proves the rebuild gives the same bytes. The toolchain import is not counted.
Each repetition builds the host once in the sandbox and once outside it, in turn,
so both see the same machine; the ratio is sandboxed over unsandboxed.

The agent figures: the demo is published, served by nginx, and two agents of web-1
(one with `zsync: false`) install release 1; then one file of web-1 changes
(etc/motd), release 2 is published, and each agent's downloaded bytes for it (TUF
metadata, release file, zsync control file and blocks, or the whole AppImage) are
shown side by side.

    python3 benchmarks/build_demo.py [--repeat 3] [--agent-only]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reconciler.adapters.nix import NIX_OPTIONS  # noqa: E402
from reconciler.adapters.tree import read_tree  # noqa: E402
from reconciler.agent.config import load_agent_config  # noqa: E402
from reconciler.config import load_config  # noqa: E402
from reconciler.core.hosts import parse_fleet  # noqa: E402
from reconciler.demo import init  # noqa: E402
from reconciler.wiring import open_agent, open_reconciler  # noqa: E402

sys.path.insert(0, str(ROOT / "benchmarks"))
from appimage_compression import nginx  # noqa: E402


def host_derivations(artifacts_drv: str) -> list[str]:
    """The host's own derivations: everything in the closure but the toolchain import."""
    closure = subprocess.run(
        ["nix-store", "--query", "--requisites", artifacts_drv], check=True, capture_output=True, text=True
    ).stdout.split()
    return [p for p in closure if p.endswith(".drv")]


def rebuild(drvs: list[str], sandbox: bool) -> float:
    """Seconds to build ``drvs`` again from scratch, checking the bytes are the same."""
    t = time.perf_counter()
    check = [
        "nix-store",
        "--realise",
        "--check",
        *drvs,
        *NIX_OPTIONS,
        "--option",
        "sandbox",
        str(sandbox).lower(),
    ]
    subprocess.run(check, check=True, capture_output=True)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--agent-only", action="store_true", help="only the agent's bytes with and without zsync")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="reconciler-build-bench-") as tmp:
        try:
            if not args.agent_only:
                build_times(Path(tmp), args.repeat)
            agent_bytes(Path(tmp))
        finally:
            subprocess.run(["gpgconf", "--homedir", str(Path(tmp) / "demo" / "gnupg"), "--kill", "all"])
    return 0


def agent_bytes(tmp: Path) -> None:
    """The bytes an agent downloads for a one-file change of web-1, with zsync and without."""
    demo = tmp / "demo"
    if not (demo / "reconciler.yaml").exists():
        init(demo)
    cfg = load_config(demo / "reconciler.yaml")
    assert cfg.store.path is not None

    def publish() -> None:
        rec = open_reconciler(cfg)
        try:
            if not rec.reconcile().ok:
                raise RuntimeError("the demo did not publish")
        finally:
            rec.close()

    publish()
    with nginx(cfg.store.path, tmp / "nginx") as url:
        agents = {}
        for method in ("zsync", "full"):
            conf = tmp / f"agent-{method}.yaml"
            conf.write_text(
                yaml.safe_dump(
                    {
                        "host": "web-1",
                        "store": url,
                        "keys": [str(cfg.store.path / "keys" / "publisher.asc")],
                        "state_dir": str(tmp / f"agent-{method}"),
                        "zsync": method == "zsync",
                    }
                )
            )
            agents[method] = open_agent(load_agent_config(conf))
            if agents[method].poll() != "updated":
                raise RuntimeError("the agent did not install release 1")
        host = demo / "repo" / "hosts" / "web-1.yaml"
        host.write_text(host.read_text() + 'files: {etc/motd: "changed for the benchmark\\n"}\n')
        subprocess.run(["git", "-C", str(demo / "repo"), "commit", "-qam", "web-1: motd"], check=True)
        publish()
        got = {}
        for method, agent in agents.items():
            before = agent.metrics.registry.get_sample_value("reconciler_agent_downloaded_bytes_total") or 0
            if agent.poll() != "updated":
                raise RuntimeError("the agent did not install release 2")
            after = agent.metrics.registry.get_sample_value("reconciler_agent_downloaded_bytes_total") or 0
            got[method] = after - before
        size = agents["zsync"].artifact(2).stat().st_size
        print(
            f"agent bytes for a one-file change of web-1 (etc/motd), AppImage of {size:,} bytes:"
            f" {got['zsync']:,.0f} with zsync, {got['full']:,.0f} without"
            f" ({got['zsync'] / got['full']:.1%})"
        )


def build_times(tmp: Path, repeat: int) -> None:
    """Build time per host, sandbox on and off, and artifact sizes."""
    cfg = load_config(init(tmp / "demo"))
    rec = open_reconciler(cfg)
    try:
        rec.source.fetch()
        fleet = parse_fleet(read_tree(rec.source.checkout))
        t = time.perf_counter()
        rec.nix.ensure_toolchain()
        print(f"toolchain ready in {time.perf_counter() - t:.1f}s (staged once, then content-addressed)")
        print(
            f"{'host':<10} {'sandbox s':>10} {'no sandbox s':>13} {'ratio':>6} {'ACI bytes':>12}"
            f" {'AppImage bytes':>15}  derivations"
        )
        totals = {True: 0.0, False: 0.0}
        for name, host in sorted(fleet.hosts.items()):
            out = rec.build(host, 1)
            drvs = host_derivations(out.derivation)
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(repeat):
                for sandbox in (True, False):
                    times[sandbox].append(rebuild(drvs, sandbox))
            seconds = {sandbox: statistics.median(t) for sandbox, t in times.items()}
            for sandbox in totals:
                totals[sandbox] += seconds[sandbox]
            sizes = {fmt: path.stat().st_size for fmt, path in out.files.items()}
            ratio = seconds[True] / seconds[False]
            print(
                f"{name:<10} {seconds[True]:>10.2f} {seconds[False]:>13.2f} {ratio:>6.2f}"
                f" {sizes.get('aci', 0):>12,} {sizes.get('appimage', 0):>15,}  {len(drvs)}"
            )
        ratio = totals[True] / totals[False]
        print(
            f"{'total':<10} {totals[True]:>10.2f} {totals[False]:>13.2f} {ratio:>6.2f}"
            f"  (median of {repeat} rebuilds per host and mode, one at a time)"
        )
        print(f"sandbox probe at start: builds sandboxed = {rec.nix.sandboxed}")
    finally:
        rec.close()


if __name__ == "__main__":
    raise SystemExit(main())
