"""Build time per host and artifact sizes for the demo fleet (`reconciler init`),
with Nix's sandbox on next to off; then the store bytes a fleet of web hosts takes
with fat images next to thin ones (ACI and OCI); then the bytes an agent downloads
for a one-file change of a host, with zsync and without.

Every derivation of each host (its packages, services, image and release
artifacts) is built again from scratch with `nix-store --realise --check`, which
also proves the rebuild gives the same bytes. The toolchain import is not counted.
Each repetition builds the host once in the sandbox and once outside it, in turn,
so both see the same machine; the ratio is sandboxed over unsandboxed.

The fleet part publishes N hosts (default 100, the demo's web host with its own
address and port each) in formats aci, aci-thin and oci with one real reconcile
pass, and sums the bytes of the distinct blobs each format's artifacts take in the
store (content-addressed: a blob two hosts share is stored once). For comparison,
the OCI archives the build makes beside the artifacts (one file per host holding
every layer, which the pass does not publish).

The agent figures: the demo is published, served by nginx, and two agents of web-1
(one with `zsync: false`) install release 1; then one file of web-1 changes
(etc/motd), release 2 is published, and each agent's downloaded bytes for it (TUF
metadata, release file, zsync control file and blocks, or the whole AppImage) are
shown side by side.

The provenance part prices each release's attestations next to its build: the
demo's hosts are published by one real pass, then per host the build is timed again
from scratch (`--check`, sandboxed) beside what attesting a release adds (reading the
closure and its NAR hashes from Nix, the two statements, two gpg signatures), and the
attestations' bytes beside the artifacts'.

The log part prices each release's entry in the transparency log next to its build:
the demo's hosts are published by one real pass (its `log` stage beside its `publish`
stage, which includes it), then per host the build is timed again from scratch
(`--check`, sandboxed) beside an append of that host's release file to a log signed
with the demo's gpg key (tiles, entry bundle, inclusion proof, signed checkpoint: one
gpg signature), and the bytes the append writes beside the artifacts'.

The reproducibility gate part prices `reproducibility: {check: true}` per release next
to the plain build: two copies of the demo, one with the gate and one without, each
published once (the gated one builds the whole closure a second time then, packages
included), then, in turn, `--repeat` times: a one-file change of every host
(etc/motd of the profile they include, new bytes each time), one timed pass of each. Per release: the
pass's seconds over the hosts, of which the build and the gate's second build (the
image and artifacts derivations; the packages were reproduced in the first pass by
the same process).

    python3 benchmarks/build_demo.py [--repeat 3] [--fleet 100] [--no-provenance] [--no-log] [--no-gate]
                                     [--agent-only] [--gate-only]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reconciler.adapters.nix import NIX_OPTIONS  # noqa: E402
from reconciler.adapters.nix import Nix as NixAdapter  # noqa: E402
from reconciler.adapters.store import FilesystemStore  # noqa: E402
from reconciler.agent.config import load_agent_config  # noqa: E402
from reconciler.config import load_config  # noqa: E402
from reconciler.core.formats import PARTS, Format  # noqa: E402
from reconciler.core.hosts import parse_fleet  # noqa: E402
from reconciler.core.layout import release_path  # noqa: E402
from reconciler.core.release import parse_release  # noqa: E402
from reconciler.daemon.reconciler import Reconciler  # noqa: E402
from reconciler.demo import WEB_HOST, init  # noqa: E402
from reconciler.wiring import note_signer, note_verifier, open_agent, open_reconciler  # noqa: E402

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


def fleet_store(n: int) -> None:
    """Publish ``n`` web hosts in the fat and thin formats and print the store bytes
    of each format side by side."""
    with tempfile.TemporaryDirectory(prefix="reconciler-fleet-bench-") as tmp:
        demo = Path(tmp) / "demo"
        cfg_path = init(demo)
        repo = demo / "repo"
        for old in (repo / "hosts").iterdir():
            old.unlink()
        for i in range(n):
            address = f"10.42.{i // 200}.{i % 200 + 10}/16"
            text = WEB_HOST.format(name=f"web-{i}", address=address, port=8000 + i)
            text = text.replace("formats: [aci, appimage]", "formats: [aci, aci-thin, oci]")
            (repo / "hosts" / f"web-{i}.yaml").write_text(text)
        subprocess.run(["git", "-C", str(repo), "add", "-A"], check=True)
        subprocess.run(["git", "-C", str(repo), "commit", "-qm", f"{n} hosts"], check=True)
        cfg = load_config(cfg_path)
        rec = open_reconciler(cfg)
        try:
            t = time.perf_counter()
            result = rec.reconcile()
            seconds = time.perf_counter() - t
        finally:
            rec.close()
        if not result.ok:
            raise SystemExit(f"the pass failed: {result.outcomes}")
        store = cfg.store.path
        assert store is not None
        releases = [
            parse_release(p.read_bytes(), str(p)) for p in sorted((store / "hosts").glob("*/latest.json"))
        ]
        print(f"\n{len(releases)} hosts published in {seconds:.0f}s (one pass); store bytes per format:")
        print(f"{'format':<10} {'store bytes':>14} {'per host':>12} {'shared once':>12}  blobs")
        for fmt in (Format.ACI, Format.ACI_THIN, Format.OCI):
            blobs: dict[str, int] = {}
            users: dict[str, int] = {}
            for release in releases:
                for art in release.artifacts:
                    if art.format in PARTS[fmt]:
                        blobs[art.sha256] = art.size
                        users[art.sha256] = users.get(art.sha256, 0) + 1
            shared = sum(size for sha, size in blobs.items() if users[sha] > 1)
            own = sum(size for sha, size in blobs.items() if users[sha] == 1)
            total = shared + own
            print(f"{fmt.value:<10} {total:>14,} {own / len(releases):>12,.0f} {shared:>12,}  {len(blobs)}")
        archives = 0
        for release in releases:
            archive = cfg.state_dir / "gcroots" / release.host / f"{release.host}-{release.version}.oci.tar"
            archives += archive.stat().st_size
        per_host = archives / len(releases)
        print(f"{'oci-archive':<10} {archives:>14,} {per_host:>12,.0f} {0:>12,}  {len(releases)}")
        print("  (oci-archive: one self-contained file per host, what `skopeo copy oci-archive:` takes;")
        print("   built beside the artifacts, not published)")
        blob_bytes = sum(p.stat().st_size for p in (store / "blobs").rglob("*") if p.is_file())
        print(f"whole store blobs/ (every format, signatures too): {blob_bytes:,} bytes")
        print(json.dumps({"hosts": len(releases), "pass_seconds": round(seconds, 1)}))


def provenance_cost(repeat: int) -> None:
    """Per host of the demo: the build from scratch next to its attestations' cost, in
    seconds (median of ``repeat``) and bytes."""
    from datetime import UTC, datetime

    with tempfile.TemporaryDirectory(prefix="reconciler-provenance-bench-") as tmp:
        cfg = load_config(init(Path(tmp) / "demo"))
        rec = open_reconciler(cfg)
        try:
            if not rec.reconcile().ok:
                raise SystemExit("the demo's pass failed")
            store = cfg.store.path
            assert store is not None
            fleet = parse_fleet(rec.source.read_tree())
            print("\nprovenance per release (SLSA provenance + SPDX SBOM, each a gpg-signed DSSE envelope):")
            print(
                f"{'host':<10} {'build s':>8} {'attest s':>9} {'of it Nix s':>12} {'ratio':>6}"
                f" {'artifact bytes':>15} {'attestation bytes':>18} {'ratio':>7}  store paths"
            )
            totals = [0.0, 0.0, 0, 0]
            for name, host in sorted(fleet.hosts.items()):
                release = parse_release((store / "hosts" / name / "latest.json").read_bytes(), name)
                out = rec.build(host, release.version)
                build, attest, nix = [], [], []
                for _ in range(repeat):
                    build.append(rebuild(host_derivations(out.derivation), True))
                    t = time.perf_counter()
                    inputs = rec.nix.inputs(host, out.derivation)
                    nix.append(time.perf_counter() - t)
                    plain = replace(release, attestations=())
                    now = datetime.now(UTC)
                    t = time.perf_counter()
                    attested, _ = rec.attestations(plain, host, out, now, now)
                    attest.append(time.perf_counter() - t)
                b, a, n = statistics.median(build), statistics.median(attest), statistics.median(nix)
                art_bytes = sum(x.size for x in release.artifacts)
                att_bytes = sum(x.size for x in attested.attestations)
                totals = [totals[0] + b, totals[1] + a, totals[2] + art_bytes, totals[3] + att_bytes]
                print(
                    f"{name:<10} {b:>8.2f} {a:>9.2f} {n:>12.2f} {a / b:>6.2f}"
                    f" {art_bytes:>15,} {att_bytes:>18,} {att_bytes / art_bytes:>7.2%}  {len(inputs.closure)}"
                )
            print(
                f"{'total':<10} {totals[0]:>8.2f} {totals[1]:>9.2f} {'':>12} {totals[1] / totals[0]:>6.2f}"
                f" {int(totals[2]):>15,} {int(totals[3]):>18,} {totals[3] / totals[2]:>7.2%}"
                f"  (median of {repeat}; attest s includes Nix s)"
            )
        finally:
            rec.close()


class _CountedStore(FilesystemStore):
    """A filesystem store that counts the objects and bytes written to it."""

    writes = 0
    written = 0

    def put_bytes(self, key: str, data: bytes) -> None:
        self.writes += 1
        self.written += len(data)
        super().put_bytes(key, data)


def log_cost(repeat: int) -> None:
    """Per host of the demo: the build from scratch next to what logging its release
    costs, in seconds (median of ``repeat``) and bytes written."""
    from reconciler.daemon.tlog import TransparencyLog

    with tempfile.TemporaryDirectory(prefix="reconciler-tlog-bench-") as tmp:
        cfg = load_config(init(Path(tmp) / "demo"))
        rec = open_reconciler(cfg)
        try:
            if not rec.reconcile().ok:
                raise SystemExit("the demo's pass failed")
            store = cfg.store.path
            assert store is not None
            registry = rec.metrics.registry

            def stage(name: str) -> tuple[float, float]:
                labels = {"stage": name}
                total = registry.get_sample_value("reconciler_stage_duration_seconds_sum", labels)
                count = registry.get_sample_value("reconciler_stage_duration_seconds_count", labels)
                return total or 0.0, count or 0.0

            (pub_s, pub_n), (log_s, log_n) = stage("publish"), stage("log")
            print("\ntransparency log per release (tiles, entry bundle, inclusion proof, signed checkpoint):")
            print(
                f"in the demo's pass: {pub_n:.0f} releases published in {pub_s:.2f} s,"
                f" of it {log_n:.0f} log appends in {log_s:.2f} s ({log_s / pub_s:.0%} of publishing)"
            )
            scratch = _CountedStore(Path(tmp) / "log-store")
            signer = rec.signer
            log = TransparencyLog(
                scratch,
                lambda: note_signer(signer),
                lambda: note_verifier([signer.public_key()]),
                Path(tmp) / "log-state",
                cfg.transparency_log.origin,
            )
            # The first append reads the key and starts the log: not a release's cost.
            log.append_release("warm-up", 1, b"{}")
            fleet = parse_fleet(rec.source.read_tree())
            print(
                f"{'host':<10} {'build s':>8} {'log s':>7} {'ratio':>6}"
                f" {'artifact bytes':>15} {'log bytes':>10} {'ratio':>7}  objects written"
            )
            totals = [0.0, 0.0, 0, 0]
            for name, host in sorted(fleet.hosts.items()):
                release = parse_release((store / "hosts" / name / "latest.json").read_bytes(), name)
                meta = (store / release_path(name, release.version)).read_bytes()
                out = rec.build(host, release.version)
                build, append, written, writes = [], [], [], []
                for i in range(repeat):
                    build.append(rebuild(host_derivations(out.derivation), True))
                    before = scratch.written, scratch.writes
                    t = time.perf_counter()
                    # A new entry each time (another release number of the host).
                    log.append_release(name, release.version + i, meta)
                    append.append(time.perf_counter() - t)
                    written.append(scratch.written - before[0])
                    writes.append(scratch.writes - before[1])
                b, a = statistics.median(build), statistics.median(append)
                w = int(statistics.median(written))
                art_bytes = sum(x.size for x in release.artifacts)
                totals = [totals[0] + b, totals[1] + a, totals[2] + art_bytes, totals[3] + w]
                print(
                    f"{name:<10} {b:>8.2f} {a:>7.3f} {a / b:>6.3f}"
                    f" {art_bytes:>15,} {w:>10,} {w / art_bytes:>7.3%}  {int(statistics.median(writes))}"
                )
            print(
                f"{'total':<10} {totals[0]:>8.2f} {totals[1]:>7.3f} {totals[1] / totals[0]:>6.3f}"
                f" {int(totals[2]):>15,} {int(totals[3]):>10,} {totals[3] / totals[2]:>7.3%}"
                f"  (median of {repeat}; a log of up to {log.size} entries)"
            )
        finally:
            rec.close()


def gate_cost(repeat: int) -> None:
    """Per release of the demo's hosts: a pass with the reproducibility gate next to one
    without (median of ``repeat`` one-file changes of every host), and the first pass of each."""
    with tempfile.TemporaryDirectory(prefix="reconciler-gate-bench-") as tmp:
        recs: dict[bool, Reconciler] = {}
        profiles: dict[bool, str] = {}
        hosts: dict[bool, int] = {}
        first: dict[bool, tuple[float, float, float]] = {}
        # Both copies share one staged toolchain (the same derivations' inputs).
        toolchain = Path(tmp) / "toolchain"
        try:
            for gate in (False, True):
                path = init(Path(tmp) / f"demo-{'gate' if gate else 'plain'}")
                doc = yaml.safe_load(path.read_text())
                doc["reproducibility"] = {"check": gate}
                doc["nix"] = {"toolchain_dir": str(toolchain)}
                path.write_text(yaml.safe_dump(doc))
                repo = path.parent / "repo"
                profiles[gate] = (repo / "profiles" / "base.yaml").read_text()
                hosts[gate] = len(list((repo / "hosts").glob("*.yaml")))
                # A nonce per copy: the two build their own images, not each other's.
                release(repo, profiles[gate], f"first {uuid.uuid4()}")
                recs[gate] = open_reconciler(load_config(path))
                recs[gate].nix.recipe_digest()  # stages the toolchain, untimed
                first[gate] = timed_pass(recs[gate])
            runs: dict[bool, list[tuple[float, float, float]]] = {False: [], True: []}
            for i in range(repeat):
                for gate in (False, True):
                    repo = recs[gate].cfg.path.parent / "repo"
                    release(repo, profiles[gate], f"release {i} {uuid.uuid4()}")
                    runs[gate].append(timed_pass(recs[gate]))
        finally:
            for rec in recs.values():
                rec.close()
        n = hosts[True]
        print(
            f"\nreproducibility gate per release ({n} demo hosts per pass, jobs 2; seconds per host release):"
        )
        print(f"{'':<26} {'pass s':>8} {'build s':>8} {'gate s':>8} {'pass / plain':>13}")
        plain_pass = statistics.median(r[0] for r in runs[False])
        for label, rows in (
            ("first release, plain", [first[False]]),
            ("first release, gate", [first[True]]),
            ("one-file change, plain", runs[False]),
            ("one-file change, gate", runs[True]),
        ):
            p, b, g = (statistics.median(r[k] for r in rows) / n for k in range(3))
            ratio = f"{p * n / plain_pass:>13.2f}" if "change" in label else f"{'':>13}"
            print(f"{label:<26} {p:>8.2f} {b:>8.2f} {g:>8.2f} {ratio}")
        print(f"  (one-file change: median of {repeat} passes each; the first release's gate builds every")
        print("   derivation of the closure again, the packages included, once per daemon process)")


def release(repo: Path, profile: str, nonce: str) -> None:
    """Commit a change of one file of every host (etc/motd, from the profile they all
    include): each gets a new image."""
    text = profile.replace("managed by reconciler", f"managed by reconciler, {nonce}")
    assert text != profile
    (repo / "profiles" / "base.yaml").write_text(text)
    subprocess.run(["git", "-C", str(repo), "commit", "-qam", nonce], check=True)


def timed_pass(rec: Reconciler) -> tuple[float, float, float]:
    """One pass: its seconds, the hosts' build seconds and the gate's, summed."""
    stage = "reconciler_stage_duration_seconds_sum"
    before = rec.metrics.registry.get_sample_value(stage, {"stage": "check"}) or 0.0
    t = time.perf_counter()
    result = rec.reconcile()
    seconds = time.perf_counter() - t
    if not result.ok:
        raise SystemExit(f"the pass failed: {[o.error for o in result.outcomes if not o.ok]}")
    builds = sum(o.build_seconds or 0.0 for o in result.outcomes)
    gate = (rec.metrics.registry.get_sample_value(stage, {"stage": "check"}) or 0.0) - before
    return seconds, builds, gate


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--fleet", type=int, default=100, help="hosts in the store-bytes part (0: skip it)")
    ap.add_argument("--agent-only", action="store_true", help="only the agent's bytes with and without zsync")
    ap.add_argument(
        "--no-provenance", dest="provenance", action="store_false", help="skip the provenance part"
    )
    ap.add_argument("--no-log", dest="log", action="store_false", help="skip the transparency log part")
    ap.add_argument("--no-gate", dest="gate", action="store_false", help="skip the reproducibility gate part")
    ap.add_argument("--gate-only", action="store_true", help="only the reproducibility gate part")
    args = ap.parse_args()
    if args.gate_only:
        gate_cost(args.repeat)
        return 0
    with tempfile.TemporaryDirectory(prefix="reconciler-build-bench-") as tmp:
        try:
            if not args.agent_only:
                build_times(Path(tmp), args.repeat)
                if args.provenance:
                    provenance_cost(args.repeat)
                if args.log:
                    log_cost(args.repeat)
                if args.gate:
                    gate_cost(args.repeat)
                if args.fleet:
                    fleet_store(args.fleet)
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
        fleet = parse_fleet(rec.source.read_tree())
        t = time.perf_counter()
        assert isinstance(rec.nix, NixAdapter)
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
