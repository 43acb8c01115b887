"""Host builds per minute with 0, 1 and 2 Nix remote builders, side by side.

Each builder is this machine again: an sshd on 127.0.0.1 whose root runs
`nix-daemon --stdio` over a Nix store of its own (`remote-store=local?root=...`),
so on a small machine the figure that matters is that builds really ran on each
builder, counted per builder (reconciler_builder_builds_total), not the speed-up.
With builders, nix.local_builds is false: every build goes to a builder. Every
configuration builds the same number of tiny ACI-only hosts, new to every store
(a nonce per run), in one `reconcile` pass with `jobs` parallel host builds.

    RECONCILER_TEST_CACHE=/tmp/cache-x python3 benchmarks/build_throughput.py [--hosts 8] [--jobs 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from reconciler.config import load_config  # noqa: E402
from reconciler.demo import KeyType, make_signing_key  # noqa: E402
from reconciler.wiring import open_reconciler  # noqa: E402
from tests.conftest import ConfigRepo, Signing, write_config  # noqa: E402
from tests.integration.test_builders import second_store  # noqa: E402
from tests.integration.test_sources import Sshd  # noqa: E402


def fleet(repo: ConfigRepo, hosts: int) -> None:
    nonce = uuid.uuid4()
    for i in range(hosts):
        repo.write(
            f"hosts/h{i}.yaml",
            f"name: h{i}\nformats: [aci]\nfiles: {{etc/nonce: '{nonce}-{i}'}}\n"
            "services:\n  idle: {exec: [bin/busybox, sleep, '3600']}\n",
        )
    repo.commit(f"fleet {nonce}")


@dataclass(frozen=True)
class Throughput:
    hosts: int
    seconds: float
    per_builder: dict[str, int]  # builds by builder name ("local": this machine)


def run(
    base: Path, repo: ConfigRepo, signing: Signing, builders: list[dict[str, object]], jobs: int
) -> Throughput:
    cfg_path = write_config(base, repo, signing, builders=builders, jobs=jobs)
    data = yaml.safe_load(cfg_path.read_text())
    data["nix"]["local_builds"] = not builders
    cfg_path.write_text(yaml.safe_dump(data))
    rec = open_reconciler(load_config(cfg_path))
    try:
        rec.check_sandbox()  # the probe build is not a host build
        t = time.perf_counter()
        result = rec.reconcile()
        seconds = time.perf_counter() - t
        failed = [o.error for o in result.outcomes if not o.ok]
        if failed:
            raise SystemExit(f"builds failed: {failed[0]}")
        reg = rec.metrics.registry
        names = ["local", *(str(b["name"]) for b in builders)]
        per = {
            n: int(
                reg.get_sample_value("reconciler_builder_builds_total", {"builder": n, "result": "success"})
                or 0
            )
            for n in names
        }
        return Throughput(len(result.outcomes), seconds, per)
    finally:
        rec.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hosts", type=int, default=8)
    ap.add_argument("--jobs", type=int, default=4, help="parallel host builds (the config's jobs)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="build-throughput-") as tmp:
        work = Path(tmp)
        home = work / "gnupg"
        home.mkdir(mode=0o700)
        # Ed25519, as when the README's figures were taken: an RSA 3072 signature (the
        # demo's default) makes each signed TUF file some 640 bytes larger and slower to sign.
        fpr = make_signing_key(home, name="Benchmark", key_type=KeyType.ED25519)
        signing = Signing(home, fpr, home / "unused.asc")
        sshd = Sshd(work / "ssh")
        try:
            host_key = (work / "ssh/host.pub").read_text().strip()

            def builder(i: int) -> dict[str, object]:
                store = second_store(work / f"builder-{i}")
                return {
                    "name": f"b{i}",
                    "uri": f"ssh-ng://root@127.0.0.1:{sshd.port}?remote-store={store}",
                    "ssh_key": str(sshd.key),
                    "host_key": host_key,
                    "max_jobs": 2,
                }

            b1, b2 = builder(1), builder(2)
            rows = []
            for label, builders in (("0 builders", []), ("1 builder", [b1]), ("2 builders", [b1, b2])):
                repo = ConfigRepo(work / label.replace(" ", "-") / "repo")
                fleet(repo, args.hosts)
                row = run(work / label.replace(" ", "-"), repo, signing, builders, args.jobs)
                rows.append((label, row))
                print(f"{label}: {row.hosts} hosts in {row.seconds:.1f}s", flush=True)
        finally:
            sshd.stop()
    print(f"\n{'':12} {'hosts':>5} {'seconds':>8} {'hosts/min':>9}  built per builder")
    for label, row in rows:
        per = ", ".join(f"{n} {c}" for n, c in row.per_builder.items())
        rate = row.hosts / row.seconds * 60
        print(f"{label:12} {row.hosts:>5} {row.seconds:>8.1f} {rate:>9.1f}  {per}")
    # The one check: with builders, every build ran on one, and each built some.
    for label, row in rows[1:]:
        built = row.per_builder
        assert built["local"] == 0, f"{label}: {built['local']} builds ran locally"
        assert all(built[n] > 0 for n in built if n != "local"), f"{label}: a builder built nothing: {built}"
    return 0


if __name__ == "__main__":
    sys.exit(main())
