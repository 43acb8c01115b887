"""AppImage payload compression, measured: gzip, xz and zstd (what the runtime's
squashfuse reads), for the demo fleet's images.

For each compressor, the payload is made from the host's image root as nix/host.nix
makes it (same mksquashfs options, plus the compressor's) and put behind the staged
runtime. Figures per host and compressor:

- payload and AppImage bytes;
- start time: from exec until the host's service is up (a web host answers HTTP on
  its port, worker-1 prints its first line), mounted with FUSE and with
  APPIMAGE_EXTRACT_AND_RUN=1 (median of --repeat runs; the AppImage is stopped with
  SIGTERM after each);
- extract: seconds to unpack the whole payload (--appimage-extract), which is
  where the decompressors differ, free of the services' own start;
- zsync: the bytes an agent fetches for a one-file change (etc/motd edited), with
  the old AppImage as the seed, served by nginx with range requests.

    python3 benchmarks/appimage_compression.py [--repeat 5]
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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from reconciler.adapters.nix import Nix as NixAdapter  # noqa: E402
from reconciler.config import load_config  # noqa: E402
from reconciler.core.hosts import parse_fleet  # noqa: E402
from reconciler.demo import init  # noqa: E402
from reconciler.wiring import open_reconciler  # noqa: E402

# mksquashfs options of nix/host.nix, then each candidate's own.
MKSQUASHFS = [
    "-noappend",
    "-quiet",
    "-no-progress",
    "-all-root",
    "-no-xattrs",
    "-mkfs-time",
    "0",
    "-all-time",
    "0",
]
CANDIDATES = {
    "gzip": ["-comp", "gzip"],
    "xz": ["-comp", "xz"],
    "xz-bcj": ["-comp", "xz", "-Xbcj", "x86"],
    "zstd": ["-comp", "zstd"],
    "zstd-19": ["-comp", "zstd", "-Xcompression-level", "19"],
}
START_TIMEOUT = 30.0


def payload(root: Path, out: Path, options: list[str]) -> Path:
    subprocess.run(["mksquashfs", str(root), str(out), *MKSQUASHFS, *options], check=True)
    return out


def appimage(runtime: Path, squashfs: Path, out: Path) -> Path:
    out.write_bytes(runtime.read_bytes() + squashfs.read_bytes())
    out.chmod(0o755)
    return out


def up(proc: subprocess.Popen[bytes], port: int | None) -> None:
    """Return once the service is up: ``port`` answers HTTP, or (no port) the first
    line of output came."""
    if port is None:
        assert proc.stdout is not None
        if not proc.stdout.readline():
            raise RuntimeError("the AppImage printed nothing")
        return
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1):
                return
        except OSError:
            if proc.poll() is not None:
                raise RuntimeError("the AppImage exited") from None
            time.sleep(0.005)
    raise RuntimeError(f"nothing answered on port {port}")


def extract_seconds(image: Path, work: Path) -> float:
    target = work / "extract"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    t = time.perf_counter()
    subprocess.run([str(image), "--appimage-extract"], cwd=target, check=True, capture_output=True)
    return time.perf_counter() - t


def start_seconds(image: Path, port: int | None, extract: bool, tmp: Path) -> float:
    """Seconds from exec until the service is up, then SIGTERM."""
    env = {k: v for k, v in os.environ.items() if k != "APPIMAGE_EXTRACT_AND_RUN"}
    env["TMPDIR"] = str(tmp)
    if extract:
        env["APPIMAGE_EXTRACT_AND_RUN"] = "1"
    t = time.perf_counter()
    proc = subprocess.Popen(
        [str(image)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, start_new_session=True
    )
    try:
        up(proc, port)
        return time.perf_counter() - t
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(START_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def nginx(root: Path, work: Path) -> Iterator[str]:
    """nginx serving ``root`` on 127.0.0.1 (ranges included); its base URL."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    work.mkdir(parents=True, exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_text(
        f"daemon off;\nmaster_process off;\npid {work}/nginx.pid;\nerror_log {work}/error.log;\n"
        f"events {{}}\nhttp {{ access_log off; server {{ listen 127.0.0.1:{port}; root {root}; }} }}\n"
    )
    proc = subprocess.Popen(["nginx", "-c", str(conf), "-p", str(work)])
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait()


def zsync_fetched(old: Path, new: Path, served: Path, base: str, work: Path) -> int:
    """Bytes zsync fetches to make ``new`` from ``old``."""
    name = new.name
    shutil.copyfile(new, served / name)
    subprocess.run(
        ["zsyncmake", "-u", name, "-o", str(served / f"{name}.zsync"), str(served / name)], check=True
    )
    out = work / f"{name}.out"
    got = subprocess.run(
        ["zsync", "-i", str(old), "-o", str(out), f"{base}/{name}.zsync"],
        check=True,
        capture_output=True,
        text=True,
        cwd=work,
        stdin=subprocess.DEVNULL,
    )
    if out.read_bytes() != new.read_bytes():
        raise RuntimeError("zsync made other bytes")
    for line in got.stdout.splitlines():
        if line.startswith("used ") and ", fetched " in line:
            return int(line.rsplit(" ", 1)[1])
    raise RuntimeError(f"no byte count in zsync's output: {got.stdout[-200:]!r}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="reconciler-comp-bench-") as tmp_name:
        tmp = Path(tmp_name)
        cfg = load_config(init(tmp / "demo"))
        rec = open_reconciler(cfg)
        try:
            rec.source.fetch()
            fleet = parse_fleet(rec.source.read_tree())
            assert isinstance(rec.nix, NixAdapter)
            rec.nix.ensure_toolchain()
            runtime = rec.nix.toolchain_dir / "runtime" / "runtime"
            roots: dict[str, tuple[Path, int | None]] = {}
            for name, host in sorted(fleet.hosts.items()):
                out = rec.build(host, 1)
                if "appimage" in out.files:
                    root = out.files["appimage"].resolve().parent / "root"
                    exec_ = host.services[0].exec
                    port = int(exec_[exec_.index("-p") + 1]) if "httpd" in exec_ else None
                    roots[name] = (root, port)
        finally:
            rec.close()
            # init's key made gpg start an agent for the demo keyring.
            subprocess.run(
                ["gpgconf", "--homedir", str(tmp / "demo" / "gnupg"), "--kill", "all"], check=False
            )
        served = tmp / "served"
        served.mkdir()
        print(
            f"{'host':<9} {'compression':<11} {'payload':>10} {'AppImage':>10} {'FUSE start s':>13}"
            f" {'extract start s':>16} {'extract s':>10} {'zsync bytes':>12}"
        )
        with nginx(served, tmp / "nginx") as base:
            for name, (root, port) in roots.items():
                changed = tmp / f"{name}-changed"
                shutil.copytree(root, changed, symlinks=True)
                (changed / "etc" / "motd").chmod(0o644)
                (changed / "etc" / "motd").write_text("edited by the benchmark\n")
                for comp, options in CANDIDATES.items():
                    work = tmp / f"{name}-{comp}"
                    work.mkdir()
                    old = appimage(runtime, payload(root, work / "old.sqfs", options), work / "old.AppImage")
                    new = appimage(
                        runtime,
                        payload(changed, work / "new.sqfs", options),
                        work / f"{name}-{comp}.AppImage",
                    )
                    run_tmp = work / "tmp"
                    run_tmp.mkdir()
                    fuse = statistics.median(
                        start_seconds(old, port, False, run_tmp) for _ in range(args.repeat)
                    )
                    extract = statistics.median(
                        start_seconds(old, port, True, run_tmp) for _ in range(args.repeat)
                    )
                    unpack = statistics.median(extract_seconds(old, work) for _ in range(args.repeat))
                    fetched = zsync_fetched(old, new, served, base, work)
                    print(
                        f"{name:<9} {comp:<11} {(work / 'old.sqfs').stat().st_size:>10,}"
                        f" {old.stat().st_size:>10,} {fuse:>13.3f} {extract:>16.3f} {unpack:>10.3f}"
                        f" {fetched:>12,}"
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
