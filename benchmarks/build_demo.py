"""Build time per host and artifact sizes for the demo fleet (`reconciler init`).

Every derivation of each host (its packages, services, image and release
artifacts) is built again from scratch with `nix-store --realise --check`, which
also proves the rebuild gives the same bytes. The toolchain import is not counted.

    python3 benchmarks/build_demo.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reconciler.config import load_config  # noqa: E402
from reconciler.daemon import Reconciler  # noqa: E402
from reconciler.demo import init  # noqa: E402
from reconciler.hosts import parse_fleet, read_tree  # noqa: E402
from reconciler.nix import NIX_OPTIONS  # noqa: E402


def host_derivations(artifacts_drv: str) -> list[str]:
    """The host's own derivations: everything in the closure but the toolchain import."""
    closure = subprocess.run(
        ["nix-store", "--query", "--requisites", artifacts_drv], check=True, capture_output=True, text=True
    ).stdout.split()
    return [p for p in closure if p.endswith(".drv")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="reconciler-build-bench-") as tmp:
        cfg = load_config(init(Path(tmp) / "demo"))
        rec = Reconciler(cfg)
        try:
            rec.source.fetch()
            fleet = parse_fleet(read_tree(rec.source.checkout))
            t = time.perf_counter()
            rec.nix.ensure_toolchain()
            print(f"toolchain ready in {time.perf_counter() - t:.1f}s (staged once, then content-addressed)")
            print(f"{'host':<10} {'build s':>8} {'ACI bytes':>12} {'AppImage bytes':>15}  derivations")
            total = 0.0
            for name, host in sorted(fleet.hosts.items()):
                out = rec.build(host, 1)
                drvs = host_derivations(out.derivation)
                times = []
                for _ in range(args.repeat):
                    t = time.perf_counter()
                    check = ["nix-store", "--realise", "--check", *drvs, *NIX_OPTIONS]
                    subprocess.run(check, check=True, capture_output=True)
                    times.append(time.perf_counter() - t)
                seconds = statistics.median(times)
                total += seconds
                sizes = {fmt: path.stat().st_size for fmt, path in out.files.items()}
                print(
                    f"{name:<10} {seconds:>8.2f} {sizes.get('aci', 0):>12,} {sizes.get('appimage', 0):>15,}"
                    f"  {len(drvs)}"
                )
            print(f"{'total':<10} {total:>8.2f}  (median of {args.repeat} rebuilds per host, one at a time)")
        finally:
            rec.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
